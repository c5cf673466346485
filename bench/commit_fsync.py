"""Benchmark: what the commit's fsyncs cost (not a test). Extraction of jobs/demo.yaml (local executor)
with and without them, interleaved; prints end-to-end times and the wall time of ``ShardWriter._files``
(list, checksum and fsync every file and folder of a shard).

    python bench/commit_fsync.py /tmp/fsync-bench 5

Measured under load (2 cores shared by several jobs), 5 pairs, 40 shard commits each way: the fsync phase
took 2.04 s in all with fsyncs against 0.41 s without (~41 ms more per commit of ~80 small files; one fsync
after another it was ~340 ms per commit). End-to-end ratios (1.1x-1.6x) were noise of the load: runs of
one mode varied 2x among themselves.
"""
import sys, time, shutil
from pathlib import Path
import yaml
import kscale.store.writer as W
from kscale.runner import run_job
from kscale.spec import spec_from_dict

raw = yaml.safe_load(open("jobs/demo.yaml"))
raw["resources"] = {"executor": "local"}
real = W.fsync_path
out = Path(sys.argv[1])
times = {"fsync": [], "none": []}
count = {"n": 0, "s": 0.0}
def counting(p):
    count["n"] += 1
    t0 = time.perf_counter()
    real(p)
    count["s"] += time.perf_counter() - t0
real_files = W.ShardWriter._files
walls = {"fsync": 0.0, "none": 0.0}
mode_now = ["none"]
def timed_files(self):
    t0 = time.perf_counter()
    try:
        return real_files(self)
    finally:
        walls[mode_now[0]] += time.perf_counter() - t0
W.ShardWriter._files = timed_files
for i in range(int(sys.argv[2])):
    for mode in ("none", "fsync") if i % 2 else ("fsync", "none"):
        mode_now[0] = mode
        W.fsync_path = counting if mode == "fsync" else (lambda p: None)
        raw["output"] = {"path": str(out / f"{mode}{i}"), "if_exists": "overwrite"}
        t = time.perf_counter()
        run_job(spec_from_dict(raw), show_bar=False)
        times[mode].append(time.perf_counter() - t)
        print(mode, i, round(times[mode][-1], 2), flush=True)
print("fsync calls in commits:", count["n"], "seconds inside them:", round(count["s"], 2))
for m, v in times.items():
    print(m, [round(x, 2) for x in v], "median", round(sorted(v)[len(v) // 2], 2))
print("wall seconds listing+fsyncing shard files (all runs):", {k: round(v, 2) for k, v in walls.items()})
print("ratio fsync/none (sum):", round(sum(times["fsync"]) / sum(times["none"]), 3))
