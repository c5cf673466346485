"""``datasets.load_dataset`` as a source (``data.source: hf``).

``load_dataset(data.path, data.config, split=data.split or "train", revision=data.revision)``: a hub id
(read from the local cache when ``HF_HUB_OFFLINE=1``, downloaded where the hub is reachable) or a local
folder of data files. The result is Arrow files memory-mapped from the datasets cache, so every worker
opens the same rows in the same order (sample ``i`` is row ``i``) and reads only the rows it asks for. The
planner's ``load_dataset`` prepares the cache once; workers reuse it.

Rows are read in Arrow form and converted one at a time, so images arrive undecoded (the ``{"bytes",
"path"}`` struct of the ``Image`` feature) and pass the pixel limit before decoding.

Identity (:mod:`kscale.data.identity`): the dataset's Arrow fingerprint and the names and sizes of its
cache files. Duplicate ids: one pass over the id column at planning, kept in the index folder.
"""

from __future__ import annotations

from pathlib import Path

from kscale.data.files import duplicates_index
from kscale.data.lineindex import index_key
from kscale.data.records import Record, _record

_LOADED: dict[tuple, object] = {}  # one load_dataset per process and (path, config, split, revision)


def _local_stats(path: str) -> tuple:
    """Sizes and mtimes of a local dataset folder's files (so a changed file is loaded again)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return ()
    return tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(p.rglob("*")) if f.is_file())


def _cache_dir(stats: tuple) -> str | None:
    """The datasets cache to use, read when called (``HF_DATASETS_CACHE`` set after ``datasets`` was imported
    still counts). A local folder gets a cache of its own named by its files' sizes and mtimes: datasets keys
    the cache of a folder whose README declares ``configs`` by that card, not by the files, so an edited
    file would otherwise be read from the stale Arrow cache."""
    import os

    import datasets

    root = os.environ.get("HF_DATASETS_CACHE") or str(datasets.config.HF_DATASETS_CACHE)
    return os.path.join(root, "kscale-local", index_key(*stats)) if stats else os.environ.get("HF_DATASETS_CACHE")


def load(dspec):
    key = (dspec.path, dspec.config, dspec.split or "train", dspec.revision, _local_stats(dspec.path))
    if key not in _LOADED:
        from datasets import load_dataset

        try:
            _LOADED[key] = load_dataset(dspec.path, dspec.config, split=dspec.split or "train",
                                        revision=dspec.revision, cache_dir=_cache_dir(key[-1]))
        except ValueError as e:  # an unknown split or config: say which field
            raise ValueError(f"data: load_dataset({dspec.path!r}, {dspec.config!r}, split="
                             f"{dspec.split or 'train'!r}) failed: {e}") from e
    return _LOADED[key]


def identity(dspec) -> dict:
    ds = load(dspec)
    files = [[Path(f["filename"]).name, Path(f["filename"]).stat().st_size] for f in ds.cache_files]
    out = {"source": "hf", "path": dspec.path, "config": dspec.config, "split": dspec.split or "train",
           "revision": dspec.revision, "fingerprint": ds._fingerprint, "files": files}
    local = Path(dspec.path).expanduser()
    if local.is_dir():  # a local folder: its own files' content (the fingerprint follows the card, not the files)
        from kscale.data.identity import file_sha256
        from kscale.data.parquet import footer_sha256

        out["local_files"] = [[str(f.relative_to(local)), f.stat().st_size,
                               footer_sha256(f) if f.suffix == ".parquet" else file_sha256(f)]
                              for f in sorted(local.rglob("*")) if f.is_file()]
    return out


class HubSource:
    def __init__(self, dspec, index_dir: Path | None = None, plan: bool = False):
        self.dspec = dspec
        self.ds = load(dspec)
        self.rows = self.ds.with_format("arrow")
        self.duplicate_of: dict[int, int] | None = None
        if dspec.id_field is not None:
            files = [Path(f["filename"]) for f in self.ds.cache_files]
            self.duplicate_of = duplicates_index(
                index_dir, f"hf-{index_key(self.ds._fingerprint, dspec.id_field)}.dups.json", files, self._ids, plan,
                f"the dataset {dspec.path!r}")

    def __len__(self) -> int:
        return len(self.ds)

    def __getstate__(self) -> dict:  # the dataset reopens from the cache where unpickled
        return {"dspec": self.dspec, "duplicate_of": self.duplicate_of}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.ds = load(self.dspec)
        self.rows = self.ds.with_format("arrow")

    def _ids(self):
        from kscale.data.records import row_ids

        return row_ids(self.ds, self.dspec.id_field)

    def raw(self, i: int) -> dict:
        return self.rows[i].to_pylist()[0]

    def get(self, i: int) -> Record:
        return _record(i, self.raw(i), self.dspec, None, f"{self.dspec.path} row {i}", self.duplicate_of)
