"""WebDataset tar shards as a source (``data.source: webdataset``), read with the standard library.

A sample is the members of one tar that share a key (``dir/name`` up to the first dot of the file name):
``{key}.jpg|png|...`` images, ``{key}.json`` fields, ``{key}.txt`` text. ``data.path`` names the tars (a
file, a glob or a folder; sorted). Sample ``i`` is the i-th sample of the tars in that order.

Each tar is indexed once, at planning, as webdataset's indexed datasets (``wids``) do: the members of each
sample with the byte offset and size of their data (``wds-<key>.json`` in the job's index folder, with the
tars' sizes and mtimes). ``get(i)`` finds the tar from the per-tar counts and reads the sample's members
by seeking, so any sample, and any shard, can be read (and redone) alone. Only uncompressed tars can be
addressed this way (a ``.tar.gz`` must be read from its start): they are refused.

The row a sample becomes: the JSON member's fields, ``txt`` (the text member), and each other member's
bytes under its extension (``jpg``, ``png``, ...). ``data.text_field`` falls back to ``txt`` and the
default ``data.image_field`` (``image``) to the first image member; the record's ``source_id`` is the key
unless ``data.id_field`` names a JSON field.

Identity (:mod:`kscale.data.identity`): per tar, its name, size and the SHA-256 of its member index.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import tarfile
from pathlib import Path

from kscale.data.files import data_files, duplicates_index, json_index
from kscale.data.lineindex import index_key
from kscale.data.records import Record, _record

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


def split_name(name: str) -> tuple[str, str]:
    """``a/b/000123.seg.jpg`` -> (``a/b/000123``, ``seg.jpg``): key up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def index_tar(path: Path) -> dict:
    """``{"samples": [[key, {ext: [offset, size]}], ...], "sha256": hash of that list}`` in member order."""
    samples: list[list] = []
    where: dict[str, int] = {}
    with open(path, "rb") as f:
        if f.read(2) == b"\x1f\x8b":
            raise ValueError(f"{str(path)!r} is compressed: WebDataset shards must be plain .tar to be indexed")
    with tarfile.open(path, "r:") as tar:
        for m in tar:
            if not m.isfile():
                continue
            key, ext = split_name(m.name)
            if not ext:
                continue
            if key not in where:
                where[key] = len(samples)
                samples.append([key, {}])
            samples[where[key]][1][ext] = [m.offset_data, m.size]
    sha = hashlib.sha256(json.dumps(samples).encode()).hexdigest()
    return {"samples": samples, "sha256": sha}


class WebDatasetSource:
    def __init__(self, dspec, index_dir: Path | None = None, plan: bool = False):
        self.dspec = dspec
        tars = data_files(dspec.path, ".tar")
        what = f"the tar shards of {dspec.path!r}"
        self.folder = index_dir
        self._members: dict[int, list] = {}  # tar number -> its samples' members (one tar kept at a time)
        self.index = json_index(index_dir, f"wds-{index_key(dspec.path)}.json", tars, lambda: self._build(tars), plan,
                                what)
        self.starts: list[int] = []
        n = 0
        for t in self.index["tars"]:
            self.starts.append(n)
            n += t["samples"]
        self.n = n
        self._file: tuple[int, object] | None = None
        self.duplicate_of: dict[int, int] | None = None
        if dspec.id_field is not None:
            self.duplicate_of = duplicates_index(index_dir, f"wds-{index_key(dspec.path, dspec.id_field)}.dups.json",
                                                 tars, self._ids, plan, what)

    def __len__(self) -> int:
        return self.n

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None, "_members": self._members if self.folder is None else {}}

    def _build(self, tars: list[Path]) -> dict:
        """Index every tar; each tar's members go to their own file (``wds-members-<sha>.json``, named by
        content), so a worker loads only the member lists of the tars it reads."""
        from kscale.data.lineindex import write_atomic

        out = []
        for k, t in enumerate(tars):
            ix = index_tar(t)
            if self.folder is None:
                self._members[k] = ix["samples"]
            else:
                self.folder.mkdir(parents=True, exist_ok=True)
                write_atomic(self.folder / f"wds-members-{ix['sha256'][:32]}.json",
                             lambda f, ix=ix: f.write(json.dumps(ix["samples"]).encode()))
            out.append({"file": str(t.resolve()), "bytes": t.stat().st_size, "samples": len(ix["samples"]),
                        "sha256": ix["sha256"]})
        return {"tars": out}

    def members(self, k: int) -> list:
        if k not in self._members:
            text = (self.folder / f"wds-members-{self.index['tars'][k]['sha256'][:32]}.json").read_text()
            self._members = {k: json.loads(text)}
        return self._members[k]

    def _ids(self):
        for i in range(self.n):
            yield i, self.raw(i).get(self.dspec.id_field, i)

    def _locate(self, i: int) -> tuple[int, list]:
        if not 0 <= i < self.n:
            raise IndexError(f"sample {i} of {self.n}")
        k = bisect.bisect_right(self.starts, i) - 1
        return k, self.members(k)[i - self.starts[k]]

    def _read(self, k: int, offset: int, size: int) -> bytes:
        if self._file is None or self._file[0] != k:
            if self._file is not None:
                self._file[1].close()
            self._file = (k, open(self.index["tars"][k]["file"], "rb"))
        f = self._file[1]
        f.seek(offset)
        return f.read(size)

    def raw(self, i: int) -> dict:
        """The sample's row (see module docstring); a JSON member that is not an object is kept as bytes."""
        k, (key, members) = self._locate(i)
        row: dict = {"__key__": key}
        for ext, (offset, size) in members.items():
            data = self._read(k, offset, size)
            if ext == "json":
                try:
                    value = json.loads(data.decode("utf-8"))
                except (ValueError, RecursionError):
                    value = None
                if isinstance(value, dict):
                    row = {**value, **row}
                    continue
            if ext == "txt":
                row["txt"] = data.decode("utf-8", errors="replace")
            else:
                row[ext] = data
        return row

    def get(self, i: int) -> Record:
        row = self.raw(i)
        k = bisect.bisect_right(self.starts, i) - 1
        where = f"{Path(self.index['tars'][k]['file']).name} sample {row['__key__']!r}"
        if self.dspec.text_field not in row and "txt" in row:
            row[self.dspec.text_field] = row["txt"]
        if self.dspec.image_field == "image" and "image" not in row:
            row["image"] = next((row[e] for e in IMAGE_EXTENSIONS if e in row), None)
        rec = _record(i, row, self.dspec, None, where, self.duplicate_of)
        if self.dspec.id_field is None:
            rec.source_id = row["__key__"]
        rec.meta = {k: v for k, v in rec.meta.items() if not isinstance(v, bytes) and k != "__key__"}
        return rec
