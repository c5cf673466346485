"""Stable entry name of the helpers the sbatch body calls: ``python -m kscale.executors.slurm wait-ray|wait-dask``.

Rendered sbatch scripts (and jobs already queued) call this name; the code is :mod:`kscale.targets.slurm`."""

import sys

from kscale.targets.slurm import main

if __name__ == "__main__":
    sys.exit(main())
