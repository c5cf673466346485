"""Stable entry name of the cluster-side driver wrapper: ``python -m kscale.executors.progress_files driver``.

Rendered sbatch scripts, RayJobs and Jobs API entrypoints (and clusters running them) call this name;
the code is :mod:`kscale.targets.records`."""

import sys

from kscale.targets.records import main

if __name__ == "__main__":
    sys.exit(main())
