"""Launcher entry for one task shard per worker: ``torchrun --nproc_per_node N -m kscale.eval job.yaml``.
Each rank loads the spec and calls :func:`kscale.eval.run.run_eval`; the launcher's environment describes the
process group, lmms-eval splits each task's documents across the ranks and gathers them on rank 0."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> None:
    from kscale.eval.run import run_eval
    from kscale.spec import STAGES, load_spec

    if len(argv) != 1:
        raise SystemExit("usage: python -m kscale.eval JOB.yaml")
    spec = load_spec(argv[0])
    if STAGES[spec.kind].entry != "kscale.eval.run:stage_entry":  # the launcher runs the eval stage only
        raise SystemExit(f"{argv[0]}: kind is {spec.kind!r}; this launcher runs the eval stage only")
    result = run_eval(spec)
    if result.rows:
        print(result.summary_line(), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
