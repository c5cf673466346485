"""Benchmark: what one worker pays to start on a large data set, before vs after the shard-reading sources
(issue 24; not a test).

Writes a manifest of ``--rows`` JSONL rows (10^6 by default; ``--rows 10000000`` for 10^7) and the same
rows as one Parquet file (row groups of 65,536), builds the driver's indexes once (timed apart: that is
planning, not a worker), then runs each variant in a fresh child process, which imports kscale, opens the
source, reads the first shard (16 samples) and a shard at the end, and reports the time from opening the
source to the first shard and its peak RSS (``VmHWM``, imports included; the child's RSS after
imports is printed too, so the data's share can be read off):

- ``manifest before``: the ManifestSource kscale had before this change (copied below,
  :class:`BeforeManifestSource`: every worker reads and decodes the whole JSONL and, with ``id_field``,
  parses every row to find duplicate ids);
- ``manifest after``: ``open_source(dspec, index_dir)`` as a worker opens it (the planner's index,
  memory-mapped);
- ``parquet before``: reading the whole file as a worker would without row-group addressing
  (``pyarrow.parquet.read_table``); ``parquet after``: ``open_source`` of ``data.source: parquet``.

Each with and without ``data.id_field``. Results (10^6 and 10^7 rows, under load) are in docs/data.md. On a
shared machine the times follow the load: read the ratios of
one run, side by side.

    python bench/data_scale.py [--rows 1000000] [--dir /tmp/kscale_data_scale] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BEFORE = '''
import json
from pathlib import Path


class BeforeManifestSource:
    """kscale's ManifestSource before the byte-offset index (records.py at a8ea3fc), reading only."""

    def __init__(self, path, id_field):
        self.path, self.id_field = Path(path), id_field
        self.lines, self.undecodable = [], {}
        for raw in self.path.read_bytes().splitlines():
            if not raw.strip():
                continue
            try:
                self.lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                self.undecodable[len(self.lines)] = str(e)
                self.lines.append("")
        self._first_of = None

    def __len__(self):
        return len(self.lines)

    def _row(self, i):
        if i in self.undecodable:
            return self.undecodable[i]
        try:
            row = json.loads(self.lines[i])
        except json.JSONDecodeError as e:
            return f"invalid JSON ({e.msg})"
        return row if isinstance(row, dict) else "expected a JSON object"

    def first_of(self):
        if self.id_field is None:
            return None
        if self._first_of is None:
            firsts = {}
            for i in range(len(self.lines)):
                row = self._row(i)
                if isinstance(row, dict):
                    firsts.setdefault(str(row.get(self.id_field, i)), i)
            self._first_of = firsts
        return self._first_of

    def get(self, i):
        row, firsts = self._row(i), self.first_of()
        return row, (firsts or {}).get(str(row.get(self.id_field, i)) if self.id_field else None)
'''

CHILD = '''
import json, resource, sys, time
t_import = time.perf_counter()
import kscale.data, kscale.data.rows, kscale.data.lineindex, kscale.data.parquet  # noqa: F401,E401  (a worker has these loaded)
import pyarrow.parquet  # noqa: F401  (loaded by both Parquet variants: counted in the baseline, not the first shard)
from kscale.data import open_source
from kscale.spec import DataSpec
def hwm_mb():  # VmHWM, not ru_maxrss: ru_maxrss is inherited from the parent across fork + exec
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024
base_rss = hwm_mb()
variant, path, idx, id_field, n = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] or None, int(sys.argv[5])
t0 = time.perf_counter()
if variant == "manifest before":
    src = BeforeManifestSource(path, id_field)
    first = [src.get(i) for i in range(16)]
elif variant == "parquet before":
    import pyarrow.parquet as pq
    table = pq.read_table(path)
    first = table.slice(0, 16).to_pylist()
else:
    source = "manifest" if variant.startswith("manifest") else "parquet"
    src = open_source(DataSpec(source=source, path=path, id_field=id_field), __import__("pathlib").Path(idx))
    first = [src.get(i) for i in range(16)]
    assert all(r.error is None for r in first), first[0].error
t_first = time.perf_counter() - t0
if variant != "parquet before":
    last = [src.get(i) for i in range(n - 16, n)]
print(json.dumps({"first_shard_s": t_first, "peak_rss_mb": hwm_mb(),
                  "rss_after_imports_mb": base_rss}))
'''


def write_data(folder: Path, rows: int) -> tuple[Path, Path]:
    """A manifest and a Parquet file of the same text-only rows (~110 bytes a line)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    m, p = folder / f"m{rows}.jsonl", folder / f"m{rows}.parquet"
    if not m.exists():
        with open(m, "w") as f:
            for i in range(rows):
                f.write(json.dumps({"id": f"r{i}", "image": None, "text": f"question {i} about the picture",
                                    "answer": "an answer"}) + "\n")
    if not p.exists():
        writer = None
        for start in range(0, rows, 65536):
            n = min(65536, rows - start)
            t = pa.table({"id": [f"r{i}" for i in range(start, start + n)], "image": pa.nulls(n, pa.string()),
                          "text": [f"question {i} about the picture" for i in range(start, start + n)],
                          "answer": ["an answer"] * n})
            writer = writer or pq.ParquetWriter(p, t.schema)
            writer.write_table(t, row_group_size=65536)
        writer.close()
    return m, p


def plan(path: Path, source: str, idx: Path, id_field: str | None) -> float:
    """The driver's one-time index build (timed; not part of any worker's start)."""
    from kscale.data import open_source
    from kscale.spec import DataSpec

    t0 = time.perf_counter()
    open_source(DataSpec(source=source, path=str(path), id_field=id_field), idx, plan=True)
    return time.perf_counter() - t0


def child(variant: str, path: Path, idx: Path, id_field: str | None, rows: int) -> dict:
    code = BEFORE + textwrap.dedent(CHILD)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code, variant, str(path), str(idx), id_field or "", str(rows)],
                         capture_output=True, text=True, env=env, check=True, timeout=3600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dir", default="/tmp/kscale_data_scale")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    folder = Path(args.dir)
    t0 = time.perf_counter()
    m, p = write_data(folder, args.rows)
    print(f"{args.rows} rows: manifest {m.stat().st_size / 1e6:.0f} MB, parquet {p.stat().st_size / 1e6:.0f} MB "
          f"(written in {time.perf_counter() - t0:.0f} s)")
    results = []
    for id_field in (None, "id"):
        idx = folder / "index"
        shutil.rmtree(idx, ignore_errors=True)  # planning timed from scratch
        planning = {"manifest": plan(m, "manifest", idx, id_field), "parquet": plan(p, "parquet", idx, id_field)}
        for variant, path in (("manifest before", m), ("manifest after", m), ("parquet before", p),
                              ("parquet after", p)):
            r = {"variant": variant, "id_field": id_field, **child(variant, path, idx, id_field, args.rows),
                 "planning_s": planning[variant.split()[0]] if variant.endswith("after") else None}
            results.append(r)
            print(f"{variant:16s} id_field={str(id_field):4s}  first shard {r['first_shard_s']:7.2f} s   "
                  f"peak RSS {r['peak_rss_mb']:7.0f} MB (after imports {r['rss_after_imports_mb']:.0f})"
                  + (f"   [planning, once: {r['planning_s']:.1f} s]" if r["planning_s"] is not None else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": args.rows, "results": results}, indent=1))


if __name__ == "__main__":
    main()
