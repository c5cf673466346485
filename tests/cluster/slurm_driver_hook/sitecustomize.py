"""Put first on ``PYTHONPATH`` by ``tests/cluster/test_slurm_nodes.py`` (sbatch passes the environment to the
job and every ``srun`` step): Python imports this module at start-up in every process of the job.

It acts only in the job's driver, the ``kscale submit`` that ``python -m kscale.targets.records driver`` starts
(the one process with ``KSCALE_SUBMISSION_ID`` set), and only when ``KSCALE_TEST_EXTRACT_WORKER`` names a
module: the extraction's shard pool then runs that module (``kscale.extract.run.WORKER_MODULE``) instead of
``kscale.extract.worker``. The test names ``tests.cluster.all_workers_stage``, the real extraction worker
whose shards wait until every worker is set up; the Ray executor, its ``SPREAD`` scheduling and the sbatch body
are the product's, unchanged.
"""

import os

if os.environ.get("KSCALE_SUBMISSION_ID") and os.environ.get("KSCALE_TEST_EXTRACT_WORKER"):
    import kscale.extract.run

    kscale.extract.run.WORKER_MODULE = os.environ["KSCALE_TEST_EXTRACT_WORKER"]
