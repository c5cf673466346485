"""Launcher entry for multi-process training: ``torchrun --nproc_per_node N -m kscale.train job.yaml``
(or ``deepspeed --num_gpus N --module kscale.train job.yaml``). Each rank loads the spec and calls
:func:`kscale.train.run.run_train`; the launcher's environment describes the process group."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> None:
    from kscale.spec import load_spec
    from kscale.train.run import run_train

    args = [a for a in argv if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    if len(args) != 1:
        raise SystemExit("usage: python -m kscale.train JOB.yaml")
    spec = load_spec(args[0])
    if spec.kind != "train":
        raise SystemExit(f"{args[0]}: kind is {spec.kind!r}, expected 'train'")
    run_train(spec)


if __name__ == "__main__":
    main(sys.argv[1:])
