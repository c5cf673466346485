"""Scale benchmark of the key store (not a test): ``python bench/scale.py [--shards 1000 10000] [--v1 1000]``.

Writes synthetic stores through the real writer at the Qwen2.5-VL-7B shape (28 layers, 4 KV heads,
128 dims, float16; ``--tokens`` text and image tokens per shard, few so that 10,000 shards fit a small
disk): ``--unique`` shards are written by the writer, the rest are copies whose keys files are hard
links (writing 10,000 shards takes ~an hour on a loaded 2-core machine; reads don't care whether two
files share an inode) with their own markers and token tables (their own sample ids: the analysis
needs every sample in one place). It prints one JSON line per store: files per shard (and for 2
layers), seconds to open (index read), to build ``keys(layer, modality)``, to stream one modality's
sample ids in coarse blocks (``column_rows``) and per chunk (``token_column``), for ``summary()`` and
for ``kscale info`` (a fresh process), and the analysis of one layer (random-feature MMD,
``kscale.analysis.run.analyze`` of this checkout) with the driver's peak RSS. For format 2 it measures
the read path both ways in the same run (issue 26): ``read_paths`` times one analysis pass's reads (one
layer's keys and the sample ids of both modalities in coarse blocks) through zarr-python (today's path
before) and through ``kscale.store.decode`` (``reader.DIRECT_READS``), and through tensorstore where it
imports (not a dependency: put it on ``PYTHONPATH``), with ratios and an identity check; the analysis
runs twice, zarr then direct, with both times, their ratio and ``rows_identical`` (``results.csv`` byte
for byte); then once more with the passes unfused (``analysis_passes``: the direction sums in a pass of their
own, as before they rode along the MMD's: ``run._FUSE_PASSES``) beside the direct run, with the ratio and
whether ``results.csv`` and ``directions.csv`` are identical (``--passes-only``: only that comparison,
separate then fused). ``--v1`` writes the same
store with the frozen format-1 writer (``tests/store_v1.py``) for the "before" column.
Targets (issue 10): open + index + keys graph <= 2 s and ``kscale info`` <= 2 s at 10,000 shards.
Timings on a shared 2-core machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/store_v1.py: the frozen v1 writer

L, H, D, R = 28, 4, 128, 3


def _attrs(n_shards: int, version: int, n_layers: int) -> dict:
    from kscale.store.layout import STORE_FORMAT

    return {"format": STORE_FORMAT, "version": version, "layers": list(range(n_layers)), "heads": list(range(H)),
            "head_dim": D, "key_dtype": "float16", "rope_rows": R, "plan": {"n_shards": n_shards},
            "model": {"path": "synthetic", "family": "qwen2_5_vl"}}


def _write_shards(args: tuple[str, int, int, int, int, int]) -> None:
    store, a, b, tokens, n_layers, version = args
    from kscale.store.writer import ShardWriter
    from tests.store_v1 import ShardWriterV1

    writer = ShardWriter if version == 2 else ShardWriterV1
    rng = np.random.default_rng(a)
    keys = rng.standard_normal((n_layers, tokens, H, D)).astype("float16")
    for s in range(a, b):
        w = writer(store, f"s{s:06d}", n_layers=n_layers, n_heads=H, head_dim=D, rope_rows=R, key_dtype="float16",
                   chunk_tokens=tokens)  # v1 pads a short shard's chunks to chunk_tokens rows: keep them equal
        for m, shift in (("text", 0.0), ("image", 0.5)):
            sid = np.repeat(np.arange(4 * s, 4 * s + 4), tokens // 4 + 1)[:tokens].astype("int64")
            w.append(m, keys + np.float16(shift), {
                "sample_id": sid, "position": np.arange(tokens, dtype="int32"),
                "rope_pos": np.zeros((tokens, R), "int32"), "token_id": np.arange(tokens, dtype="int32"),
                "image_index": np.zeros(tokens, "int16")})
        w.commit({"shard": f"s{s:06d}", "start": 4 * s, "stop": 4 * s + 4, "n_samples": 4, "n_samples_ok": 4,
                  "n_errors": 0}, [])


def _link_copies(args: tuple[str, int, int, int]) -> None:
    """Shards ``a..b`` as hard-linked copies of the ``unique`` written ones, each with its own marker and
    its own token table (sample ids ``4 s ..``: the analysis needs every sample's rows in one place and
    ids increasing, so only the keys files are shared)."""
    import zarr

    from kscale.store.layout import marker_path, shard_dir

    store, unique, a, b = args
    path = Path(store)
    for s in range(a, b):
        src, dst = shard_dir(path, f"s{s % unique:06d}"), shard_dir(path, f"s{s:06d}")
        for dirpath, _, names in os.walk(src):
            out = dst / Path(dirpath).relative_to(src)
            out.mkdir(parents=True, exist_ok=True)
            for n in names:
                if not (Path(dirpath).name in ("tokens", "sample_id") and n.startswith("c")):
                    os.link(Path(dirpath) / n, out / n)
        m = json.loads(marker_path(path, src.name).read_text())
        for mod in ("text", "image"):
            ids = "tokens" if m.get("layout") == 2 else "sample_id"  # v2: field 0 of tokens; v1: its own array
            table = zarr.open_array(str(src / mod / ids), mode="r")[:]
            if table.ndim == 2:
                table[:, 0] += 4 * (s - s % unique)
            else:
                table += 4 * (s - s % unique)
            zarr.open_array(str(dst / mod / ids), mode="r+")[:] = table
            if "files" in m:
                for f in (dst / mod / ids).glob("c.*"):
                    m["files"][f"{mod}/{ids}/{f.name}"] = f.stat().st_size
        m.update(shard=dst.name, start=4 * s, stop=4 * s + 4)
        marker_path(path, dst.name).write_text(json.dumps(m))


def write_store(path: Path, n_shards: int, tokens: int, version: int = 2, n_layers: int = L,
                procs: int = 2, unique: int = 100) -> float:
    import zarr

    from kscale.store.index import write_index

    t0 = time.perf_counter()
    zarr.open_group(str(path), mode="w").attrs.update(_attrs(n_shards, version, n_layers))
    (path / "shards").mkdir(exist_ok=True)
    unique = min(unique, n_shards)
    step = max(1, unique // procs)
    jobs = [(str(path), a, min(unique, a + step), tokens, n_layers, version) for a in range(0, unique, step)]
    with ProcessPoolExecutor(procs) as pool:
        list(pool.map(_write_shards, jobs))
        step = max(1, -(-(n_shards - unique) // procs))
        list(pool.map(_link_copies, [(str(path), unique, a, min(n_shards, a + step))
                                     for a in range(unique, n_shards, step)]))
    if version == 2:
        write_index(path)  # as the end of an extraction job does
    return time.perf_counter() - t0


def files_per_shard(path: Path) -> float:
    shards = [p for p in (path / "shards").iterdir() if p.is_dir()]
    n = sum(1 for p in shards[0].rglob("*") if p.is_file())
    return n + 1  # + the marker


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - t0, 3)


def stream_sample_ids(ks, block_rows: int = 1 << 16, window: int = 4) -> int:
    """One modality's sample ids block by block, never all in memory: v2 in coarse blocks of
    ``block_rows`` rows (``column_rows``: one task reads a run of shards, as the analysis does), ``window``
    tasks at a time; v1: ``tokens()``."""
    import dask

    if hasattr(ks, "column_rows"):
        n, total = ks.n_tokens()["image"], 0
        blocks = [(lo, min(n, lo + block_rows)) for lo in range(0, n, block_rows)]
        for i in range(0, len(blocks), window):
            parts = dask.compute(*[ks.column_rows("image", "sample_id", a, b) for a, b in blocks[i:i + window]])
            total += sum(int(p.sum()) for p in parts)
        return total
    return int(ks.tokens("image")["sample_id"].sum())


def stream_sample_ids_per_chunk(ks) -> int:
    """The same through ``token_column`` (one task per shard and ``chunk_tokens`` rows)."""
    col = ks.token_column("image", "sample_id")
    return sum(int(col.blocks[i:i + 256].sum().compute()) for i in range(0, col.numblocks[0], 256))


ANALYZE = """
import json, resource, sys, time
from kscale.spec.analyze import AnalyzeConfig, MMDConfig, SignificanceConfig, DaskConfig
from kscale.analysis.run import analyze
import kscale.store.reader
kscale.store.reader.DIRECT_READS = sys.argv[3] == "direct"  # the read path under test (zarr: today's)
import kscale.analysis.run
kscale.analysis.run._FUSE_PASSES = sys.argv[4] == "fused"  # separate: the direction sums in a pass of their own
cfg = AnalyzeConfig(stores=[sys.argv[1]], layers=[0], heads=[0], pooled=False, comparisons=["cross"],
                    estimators=["mmd_rf"], mmd=MMDConfig(n_features=256), embed=__import__(
                    "kscale.spec.analyze", fromlist=["EmbedConfig"]).EmbedConfig(methods=[]),
                    dask=DaskConfig(scheduler="threads", n_workers=2))
t0, c0 = time.perf_counter(), time.process_time()
analyze(cfg, sys.argv[2])
print(json.dumps({"seconds": round(time.perf_counter() - t0, 2), "cpu_s": round(time.process_time() - c0, 2),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def analysis(path: Path, out: Path, reads: str = "direct", passes: str = "fused") -> dict:
    """``kscale.analysis.run.analyze`` of one layer in a fresh process, reading through ``reads``: "direct"
    (``kscale.store.decode``, the default) or "zarr" (zarr-python, the path before issue 26); ``passes``
    "fused" (the direction sums in the MMD's pass, the default) or "separate" (in a pass of their own)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    load = os.getloadavg()[0]
    p = subprocess.run([sys.executable, "-c", ANALYZE, str(path), str(out), reads, passes], capture_output=True,
                       text=True, env=env)
    if p.returncode:
        return {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"}
    # the machine's 1-minute load average when the run started and ended: a wall ratio of two runs is only
    # a speed ratio when their loads were alike (CPU seconds are the steadier number)
    return {**json.loads(p.stdout.strip().splitlines()[-1]), "load_avg": [round(load, 1), round(os.getloadavg()[0], 1)]}


def analysis_both(path: Path) -> dict:
    """The analysis of one layer through zarr-python (today's path before issue 26) and through the direct
    decoder, one after the other on the same store, with their ratio and whether the rows are identical
    (``results.csv`` byte for byte)."""
    out = {}
    for reads in ("zarr", "direct"):
        folder = path.parent / f"analysis-{path.name}-{reads}"
        shutil.rmtree(folder, ignore_errors=True)
        out[reads] = analysis(path, folder, reads)
    a, b = (path.parent / f"analysis-{path.name}-{r}" / "results.csv" for r in ("zarr", "direct"))
    out["rows_identical"] = a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes()
    if "seconds" in out["zarr"] and "seconds" in out["direct"]:
        out["ratio_wall"] = round(out["zarr"]["seconds"] / out["direct"]["seconds"], 2)
        out["ratio_cpu"] = round(out["zarr"]["cpu_s"] / out["direct"]["cpu_s"], 2)
    return out


def analysis_passes(path: Path, fused: dict | None = None) -> dict:
    """The analysis of one layer (direct reads) with the passes unfused (before) and fused (now), side by side:
    both times, their ratios, and whether ``results.csv`` and ``directions.csv`` are identical byte for byte.
    ``fused``: the fused run just made by :func:`analysis_both` (its folder ``analysis-<store>-direct``);
    without it, separate then fused here."""
    folders = {"separate": path.parent / f"analysis-{path.name}-separate",
               "fused": path.parent / f"analysis-{path.name}-{'direct' if fused else 'fused'}"}
    out = {}
    for passes in ("separate", "fused"):
        if passes == "fused" and fused is not None:
            out[passes] = fused
            continue
        shutil.rmtree(folders[passes], ignore_errors=True)
        out[passes] = analysis(path, folders[passes], "direct", passes)
    for name in ("results.csv", "directions.csv"):
        a, b = (folders[p] / name for p in ("separate", "fused"))
        out[f"{name.split('.')[0]}_identical"] = a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes()
    if "seconds" in out["separate"] and "seconds" in out["fused"]:
        out["ratio_wall"] = round(out["separate"]["seconds"] / out["fused"]["seconds"], 2)
        out["ratio_cpu"] = round(out["separate"]["cpu_s"] / out["fused"]["cpu_s"], 2)
    return out


def _cpu() -> float:
    return time.process_time()


def read_pass(ks, reads: str, block_rows: int = 1 << 16) -> tuple[list, float, float]:
    """The reads of one analysis pass over one layer, without its arithmetic: both modalities' keys (layer 0,
    head 0) and sample ids in coarse blocks (``keys_rows`` / ``column_rows``, one task over a run of shards,
    as ``kscale.analysis`` streams them), synchronously. Returns the arrays, wall and CPU seconds."""
    import dask

    import kscale.store.reader as reader

    reader.DIRECT_READS, before = reads == "direct", reader.DIRECT_READS
    t0, c0 = time.perf_counter(), _cpu()
    try:
        got = []
        for m in ("text", "image"):
            n = ks.n_tokens()[m]
            for lo in range(0, n, block_rows):
                hi = min(n, lo + block_rows)
                got += dask.compute(ks.keys_rows(0, m, lo, hi, heads=[0]), ks.column_rows(m, "sample_id", lo, hi),
                                    scheduler="sync")
    finally:
        reader.DIRECT_READS = before
    return got, time.perf_counter() - t0, _cpu() - c0


def read_pass_tensorstore(ks) -> tuple[list, float, float] | None:
    """The same reads through tensorstore (an independent Zarr v3 implementation; not a dependency of kscale:
    measured only where it imports), every (shard, array) of a block opened and read concurrently."""
    try:
        import tensorstore as ts
    except ImportError:
        return None
    ctx = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
    t0, c0 = time.perf_counter(), _cpu()
    got = []
    for m in ("text", "image"):
        spans = ks.spans(m, 0, ks.n_tokens()[m])
        for array, sel in (("keys", lambda t, s: t[0, s.a:s.b, 0:1]), ("tokens", lambda t, s: t[s.a:s.b, 0])):
            opened = [ts.open({"driver": "zarr3", "kvstore": {"driver": "file",
                                                              "path": f"{ks.path}/shards/{s.shard}/{m}/{array}"}},
                              read=True, context=ctx) for s in spans]
            reads = [sel(o.result(), s).read() for o, s in zip(opened, spans)]
            got.append(np.concatenate([r.result() for r in reads]))
    return got, time.perf_counter() - t0, _cpu() - c0


def read_paths(ks) -> dict:
    """One analysis pass's reads through zarr-python, the direct decoder and (where installed) tensorstore,
    side by side in one run: seconds (wall and CPU), ratios, and whether every array is identical."""
    zarr_, tz, cz = read_pass(ks, "zarr")
    direct, td, cd = read_pass(ks, "direct")
    same = len(zarr_) == len(direct) and all(a.tobytes() == b.tobytes() for a, b in zip(zarr_, direct))
    out = {"zarr_s": round(tz, 2), "zarr_cpu_s": round(cz, 2), "direct_s": round(td, 2), "direct_cpu_s": round(cd, 2),
           "ratio_wall": round(tz / td, 1), "ratio_cpu": round(cz / cd, 1), "identical": same,
           "bytes": int(sum(a.nbytes for a in direct))}
    got = read_pass_tensorstore(ks)
    if got is not None:
        arrays, t, c = got
        per_mod = [a for m in ("text", "image") for a in direct_mod(direct, ks, m)]
        out.update(tensorstore_s=round(t, 2), tensorstore_cpu_s=round(c, 2),
                   tensorstore_identical=all(np.asarray(a).reshape(-1).tobytes() == b.reshape(-1).tobytes()
                                             for a, b in zip(arrays, per_mod)))
    return out


def direct_mod(got: list, ks, m: str) -> list:
    """The keys and the sample ids of modality ``m`` from ``read_pass``'s list (blocks alternate keys, ids)."""
    blocks = -(-ks.n_tokens()["text"] // (1 << 16))
    part = got[:2 * blocks] if m == "text" else got[2 * blocks:]
    return [np.concatenate(part[0::2]), np.concatenate(part[1::2])]


def kscale_info(path: Path) -> float:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kscale.cli", "info", "--json", str(path)], check=True, env=env,
                   capture_output=True)
    return round(time.perf_counter() - t0, 3)


def measure(path: Path, n_shards: int, tokens: int, version: int, write_s: float, files_2_layers: float | None,
            run_analysis: bool, passes_only: bool = False) -> dict:
    import kscale.store.reader  # imported before timing: zarr + dask take seconds to import on a loaded machine

    ks, t_open = _timed(lambda: kscale.store.reader.open_store(path))
    keys, t_keys = _timed(lambda: ks.keys(0, "image"))
    _, t_ids = _timed(lambda: stream_sample_ids(ks))
    _, t_summary = _timed(ks.summary)
    row = {"format": version, "shards": n_shards, "tokens_per_modality_per_shard": tokens,
           "layers": L, "kv_heads": H, "head_dim": D, "write_s_incl_links": round(write_s, 1),
           "files_per_shard": files_per_shard(path), "files_per_shard_2_layers": files_2_layers,
           "open_s": t_open, "keys_graph_s": t_keys, "open_plus_keys_s": round(t_open + t_keys, 3),
           "graph_tasks": len(keys.__dask_graph__()), "stream_sample_ids_s": t_ids,
           "stream_sample_ids_per_chunk_s": _timed(lambda: stream_sample_ids_per_chunk(ks))[1] if version == 2 else None,
           "summary_s": t_summary,
           "kscale_info_s": kscale_info(path)}
    if version == 2:
        from kscale.store.index import build_index

        _, row["index_rebuild_s"] = _timed(lambda: build_index(path))
    if version == 2:
        row["read_paths"] = read_paths(ks)
    if run_analysis and passes_only:
        row["analysis_passes"] = analysis_passes(path)
    elif run_analysis:
        row["analysis_one_layer"] = (analysis_both(path) if version == 2 else
                                     analysis(path, path.parent / f"analysis-{path.name}", "zarr"))
        if version == 2:
            row["analysis_passes"] = analysis_passes(path, row["analysis_one_layer"]["direct"])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--v1", type=int, nargs="*", default=[1000], help="sizes also written in format 1 (before)")
    ap.add_argument("--tokens", type=int, default=16, help="tokens per modality (text, image) per shard")
    ap.add_argument("--unique", type=int, default=100, help="shards written by the writer; the rest are linked")
    ap.add_argument("--dir", default=None, help="where to write the stores (default: a temp dir, removed)")
    ap.add_argument("--no-analysis", action="store_true")
    ap.add_argument("--no-v1-analysis", action="store_true", help="measure the analysis on format-2 stores only")
    ap.add_argument("--analysis-max", type=int, default=None, help="skip the analysis above this many shards")
    ap.add_argument("--keep", action="store_true", help="keep the stores; with --dir, a later run reuses them")
    ap.add_argument("--passes-only", action="store_true",
                    help="analysis: only the passes separate vs fused (direct reads), not zarr vs direct")
    a = ap.parse_args()
    base = Path(a.dir or tempfile.mkdtemp(prefix="kscale-scale-"))
    base.mkdir(parents=True, exist_ok=True)
    try:
        small = base / "two-layers"
        if not (small / "shards").is_dir():
            write_store(small, 2, a.tokens, n_layers=2, procs=1)
        files_2 = files_per_shard(small)
        for version, sizes in ((1, a.v1), (2, a.shards)):
            for n in sizes:
                path = base / f"v{version}-{n}"
                reuse = a.keep and (path / "shards").is_dir()
                write_s = float("nan") if reuse else write_store(path, n, a.tokens, version, unique=a.unique)
                analyse = not a.no_analysis and not (version == 1 and a.no_v1_analysis) and (
                    a.analysis_max is None or n <= a.analysis_max)
                print(json.dumps(measure(path, n, a.tokens, version, write_s, files_2 if version == 2 else None,
                                         analyse, a.passes_only and version == 2)), flush=True)
                if not a.keep:
                    shutil.rmtree(path)
    finally:
        if not a.keep and a.dir is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
