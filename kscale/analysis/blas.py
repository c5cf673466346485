"""BLAS threads of the analysis driver: one, except where the exact rows' bits depend on the count.

The analysis already runs its parallel work on dask's threads (``dask.n_workers``), and numpy's OpenBLAS
adds its own threads to every product: after each call they spin-wait for the next, so a driver that
alternates small products with elementwise work keeps a second core busy for nothing and takes it from
dask's other thread and from the t-SNE helper. Measured on the demo (under load, 2 cores, CPU seconds of the
driver): 30-32 s with OpenBLAS's default threads, 19.5 s with one thread everywhere, 23-25 s with the exact
rows' exception below (docs/analysis.md).

:func:`single_thread` (around ``run.analyze``) sets every BLAS library loaded in the process to one thread.
The products of the streamed random features, linear and histogram sums, plans, probes and directions give
the same bits with one thread as with several (the demo's ``results.csv`` and ``directions.csv`` compared).
The distance blocks of the exact and paper MMD² rows do not: OpenBLAS computes some shapes (557 x 16 by
16 x 557, the demo's cross comparison) with another kernel on one thread, which moves a few laplacian rows
by ~1e-13 (the square root of a near-zero squared distance). :func:`as_started` gives those computations
the thread counts the process had before :func:`single_thread`, so the exact rows are the bits they always
were (``tests/unit/analysis/test_analysis_blas.py``).

:func:`one_thread` holds BLAS to one thread for a stretch of work that runs its own threads (dask's local
tasks, ``kscale.analysis.stream``; the fast random-feature path's pool, ``kscale.analysis.features``): the
tasks' products are small, and OpenBLAS's threads on top of those threads oversubscribe the cores (their
spin-waits cost 10-25x a tile product's CPU on a loaded machine: docs/scale.md). It restores what was set
before it, so inside :func:`single_thread` it changes nothing.

All are process-wide, as BLAS's thread count is: meant for one analysis at a time in a process (the
stage's). Without threadpoolctl (a dependency of kscale, and of scikit-learn) both are no-ops.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

_STARTED: list[list[tuple[object, int]]] = []  # per active single_thread(): (library controller, its threads)


def _blas_libraries() -> list:
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return []
    return list(ThreadpoolController().select(user_api="blas").lib_controllers)


@contextmanager
def single_thread() -> Iterator[None]:
    """Every BLAS library loaded now runs on one thread inside; their thread counts are restored after."""
    libs = [(lib, lib.num_threads) for lib in _blas_libraries()]
    for lib, _ in libs:
        lib.set_num_threads(1)
    _STARTED.append(libs)
    try:
        yield
    finally:
        _STARTED.pop()
        for lib, n in libs:
            lib.set_num_threads(n)


@contextmanager
def as_started() -> Iterator[None]:
    """Inside :func:`single_thread`: the BLAS thread counts the process had before it (elsewhere a no-op)."""
    libs = _STARTED[-1] if _STARTED else []
    for lib, n in libs:
        lib.set_num_threads(n)
    try:
        yield
    finally:
        for lib, _ in libs:
            lib.set_num_threads(1)


def one_thread():
    """A context manager: BLAS on one thread inside, the previous counts restored after (threadpoolctl's
    ``threadpool_limits``); a no-op without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return nullcontext()
    return threadpool_limits(1, user_api="blas")
