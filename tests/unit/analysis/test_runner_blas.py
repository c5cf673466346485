"""Local dask tasks of the analysis run with BLAS held to one thread (``stream.one_blas_thread``): OpenBLAS's
own threads on top of dask's worker threads oversubscribe the cores, which made the small products of the
random-feature tiles cost 10-25x their CPU on a loaded machine (docs/scale.md). The limit is the driver's,
entered around a whole compute and restored after it."""

import pytest

from kscale.analysis.stream import Runner
from kscale.spec.analyze import DaskConfig
from tests.testing_utils import require_module

threadpoolctl = require_module("threadpoolctl", "pip install threadpoolctl")


def blas_threads() -> list[int]:
    return [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]


def seen(item, shared) -> list[list[int]]:
    return [blas_threads()]


@pytest.mark.parametrize("scheduler", ["threads", "sync"])
def test_local_tasks_see_one_blas_thread_and_the_limit_is_restored(scheduler):
    if not blas_threads():
        pytest.skip("numpy reports no BLAS library to threadpoolctl")
    with threadpoolctl.threadpool_limits(2, user_api="blas"):  # as on a machine of 2 cores or more
        assert set(blas_threads()) == {2}
        with Runner(DaskConfig(scheduler=scheduler, n_workers=2)) as runner:
            got = runner.map_reduce(seen, list(range(6)), None, lambda a, b: a + b)
            (direct,) = runner.compute(__import__("dask").delayed(blas_threads, pure=False)())
        assert len(got) == 6 and all(set(g) == {1} for g in got) and set(direct) == {1}, (got, direct)
        assert set(blas_threads()) == {2}  # restored for the driver's own work (exact MMD, pictures)
