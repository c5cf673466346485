"""Parquet files as a source: rows addressed by row group, so a worker reads only the groups of its shards.

``data.path`` names one file, a glob or a folder (:func:`kscale.data.files.data_files`, sorted). Sample ``i``
is the i-th row of the files in that order. The index (``parquet-<key>.json`` in the job's index folder,
made once at planning from the files' footers) holds each file's row-group sizes and the SHA-256 of its
footer; ``get(i)`` finds the row group by a binary search over the cumulative counts and reads that group
alone with pyarrow (one group cached at a time: memory is one row group, whatever the data size).

Images: a path (relative to the Parquet file's folder), raw bytes, or the Hugging Face ``{"bytes", "path"}``
struct; a list of them, or several columns (``data.image_field`` as a list, MMMU's ``image_1`` ..).

Identity (:mod:`kscale.data.identity`): per file, its name, size and footer hash. The footer holds every
row group's offsets, sizes and statistics, so a rewritten file is seen without reading terabytes of data;
an in-place edit that keeps every byte count and statistic is not (see docs/data.md).
"""

from __future__ import annotations

import bisect
import hashlib
from pathlib import Path

from kscale.data.files import data_files, duplicates_index, json_index
from kscale.data.lineindex import index_key
from kscale.data.records import Record, _record


def footer_sha256(path: Path) -> str:
    """SHA-256 of a Parquet file's footer (the metadata after the data, before ``<len>PAR1``)."""
    with open(path, "rb") as f:
        f.seek(-8, 2)
        tail = f.read(8)
        if tail[4:] != b"PAR1":
            raise ValueError(f"{str(path)!r} is not a Parquet file (no PAR1 magic at its end)")
        n = int.from_bytes(tail[:4], "little")
        f.seek(-8 - n, 2)
        return hashlib.sha256(f.read(n)).hexdigest()


def build_index(files: list[Path]) -> dict:
    import pyarrow.parquet as pq

    out = []
    for f in files:
        meta = pq.ParquetFile(f).metadata
        out.append({"file": str(f.resolve()), "bytes": f.stat().st_size, "footer_sha256": footer_sha256(f),
                    "row_groups": [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]})
    return {"files": out}


def parquet_index(dspec, folder: Path | None, plan: bool) -> dict:
    files = data_files(dspec.path, ".parquet")
    return json_index(folder, f"parquet-{index_key(dspec.path)}.json", files, lambda: build_index(files), plan,
                      f"the Parquet files of {dspec.path!r}")


class ParquetSource:
    def __init__(self, dspec, index_dir: Path | None = None, plan: bool = False):
        self.dspec = dspec
        self.index = parquet_index(dspec, index_dir, plan)
        self.groups: list[tuple[int, int, int]] = []  # (first row, file number, group number)
        self.starts: list[int] = []
        n = 0
        for k, f in enumerate(self.index["files"]):
            for g, rows in enumerate(f["row_groups"]):
                if rows:
                    self.starts.append(n)
                    self.groups.append((n, k, g))
                    n += rows
        self.n = n
        self._cached: tuple[int, object] | None = None  # (group position, its Arrow table)
        self.duplicate_of: dict[int, int] | None = None
        if dspec.id_field is not None:
            name = f"parquet-{index_key(dspec.path, dspec.id_field)}.dups.json"
            self.duplicate_of = duplicates_index(index_dir, name, data_files(dspec.path, ".parquet"), self._ids, plan,
                                                 f"the Parquet files of {dspec.path!r}")

    def _ids(self):
        """(row, id) of every row, reading only the id column, one row group at a time."""
        import pyarrow.parquet as pq

        for first, k, g in self.groups:
            f = pq.ParquetFile(self.index["files"][k]["file"])
            if self.dspec.id_field not in f.schema_arrow.names:
                return  # ids are row numbers: no duplicates
            column = f.read_row_group(g, columns=[self.dspec.id_field]).column(0).to_pylist()
            yield from ((first + j, v) for j, v in enumerate(column))

    def __len__(self) -> int:
        return self.n

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cached": None}

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self.n:
            raise IndexError(f"row {i} of {self.n}")
        pos = bisect.bisect_right(self.starts, i) - 1
        return pos, i - self.starts[pos]

    def _row(self, pos: int, j: int) -> dict:
        """Row ``j`` of row group ``pos`` (the group is read once, kept in Arrow form, rows converted one by one)."""
        if self._cached is None or self._cached[0] != pos:
            import pyarrow.parquet as pq

            _, k, g = self.groups[pos]
            self._cached = (pos, pq.ParquetFile(self.index["files"][k]["file"]).read_row_group(g))
        return self._cached[1].slice(j, 1).to_pylist()[0]

    def raw(self, i: int) -> dict:
        return self._row(*self._locate(i))

    def get(self, i: int) -> Record:
        pos, j = self._locate(i)
        _, k, g = self.groups[pos]
        file = Path(self.index["files"][k]["file"])
        row_in_file = j + sum(self.index["files"][k]["row_groups"][:g])
        return _record(i, self._row(pos, j), self.dspec, file.parent, f"{file.name} row {row_in_file}",
                       self.duplicate_of)
