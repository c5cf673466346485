"""Benchmark: where the time of an analysis job goes, per phase, in wall and CPU seconds (not a test).

Runs ``analysis.run.analyze`` on a job's ``analyze:`` section with timers around its phases: the
layer plans (subsample, bandwidths, bins), the streamed sums, random-feature rows and their jackknife,
permutation p-values, exact and paper MMD rows, classifier probes, all pictures (with the wait for the
t-SNE maps, computed beside the analysis in a helper process: ``maps_helper.MapsHelper``), the attention figure
and report.html. CPU is user + sys of this process (every thread; not the helper's), so on a machine
shared with others it is the steadier number; wall follows the load. Phases nest (the wait for the maps
is inside pictures; rows inside the layer work), so the lines do not add up to the total. Prints a table
and writes JSON.

    python bench/analysis_phases.py jobs/demo_analyze.yaml /tmp/analysis_run [--json phases.json]

The output folder is deleted and rewritten: never point it at a run you want to keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

T0_WALL, T0_CPU = time.perf_counter(), time.process_time()

import kscale.analysis.embed as E  # noqa: E402
import kscale.analysis.figures as FIG  # noqa: E402
from kscale.analysis import report, run  # noqa: E402
from kscale.analysis import rows as R  # noqa: E402
from kscale.spec import load_spec  # noqa: E402

PHASES = [  # (module, function, label)
    (run, "_layer_context", "plans (subsample, bandwidths, bins)"),
    (run, "_stream_sums", "streamed RF / linear / histogram + direction sums"),
    (R, "rf_rows", "RF rows (jackknife, cross-MMD p)"),
    (R, "permutation_row_update", "permutation p"),
    (R, "exact_rows", "exact MMD rows"),
    (R, "paper_rows", "paper MMD rows"),
    (run, "probe_rows", "classifier probes"),
    (run, "_direction_rows", "directions' MMD pass (where the gap lives)"),
    (run, "queries_beside_gap", "query-visible gap"),
    (E, "resolved", "waiting for t-SNE maps (helper process)"),
    (FIG, "write_pictures", "pictures"),
    (run, "attention_beside_gap", "attention figure"),
    (report, "build_report", "report.html"),
]


def timed(acc: dict, label: str, fn):
    def wrapper(*a, **k):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return fn(*a, **k)
        finally:
            d = acc.setdefault(label, [0.0, 0.0])
            d[0] += time.perf_counter() - wall
            d[1] += time.process_time() - cpu
    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("job")
    ap.add_argument("out")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    acc = {"imports": [time.perf_counter() - T0_WALL, time.process_time() - T0_CPU]}
    for mod, name, label in PHASES:
        setattr(mod, name, timed(acc, label, getattr(mod, name)))
    spec = load_spec(a.job)
    shutil.rmtree(a.out, ignore_errors=True)
    wall, cpu = time.perf_counter(), time.process_time()
    run.analyze(spec.analyze, a.out)
    acc["analyze total"] = [time.perf_counter() - wall, time.process_time() - cpu]
    t = os.times()
    acc["process total"] = [time.perf_counter() - T0_WALL, t.user + t.system]
    for label, (w, c) in acc.items():
        print(f"{label:42s} wall {w:7.2f} s   cpu {c:7.2f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({k: {"wall_s": round(w, 2), "cpu_s": round(c, 2)} for k, (w, c) in acc.items()}, f, indent=1)


if __name__ == "__main__":
    main()
