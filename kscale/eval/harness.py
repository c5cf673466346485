"""One call into lmms-eval: tasks in, its results dict out (what :mod:`kscale.eval.run` calls per variant).

:func:`evaluate` runs ``lmms_eval.evaluator.simple_evaluate`` with a :class:`~kscale.eval.lmms_model.KscaleLMM`
instance, the tasks of lmms-eval's registry and of ``include_path`` folders, seeded. Offline use: set
``HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1`` with the datasets already in the Hugging Face cache
(``HF_HOME``), or point a task YAML's ``dataset_path`` at a local folder / files (``dataset_path: json`` or
``parquet`` with ``dataset_kwargs.data_files``), as the tests do.
"""

from __future__ import annotations

from typing import Any


def _filelock_compat() -> None:
    """lmms-eval 0.7.3 patches ``filelock._api.FileLockMeta`` on every evaluation; filelock >= 4.3 has no
    ``_api`` module (the venv pins transformers' filelock), so the import fails. The patch only shares
    lock instances between filelock's and datasets' lock classes (a deadlock guard for parallel task
    loading); without ``_api`` it is skipped, and tasks load one by one (``process_docs_parallel=1``)."""
    import importlib.util

    from lmms_eval import evaluator

    if importlib.util.find_spec("filelock._api") is None:
        evaluator._enable_reentrant_filelocks._patched = True


def evaluate(model: Any, tasks: list[str], include_path: list[str] | None = None, limit: int | None = None,
             batch_size: int = 4, bootstrap_iters: int = 1000, seed: int = 0) -> dict[str, Any] | None:
    """lmms-eval's results dict (``results``, ``n-samples``, ``samples``, ``configs``, ...) for ``model``.

    In a process group of N ranks (``torchrun -m kscale.eval``: WORLD_SIZE, RANK, MASTER_* set) lmms-eval
    gives each rank every N-th document of each task and gathers the per-document results on rank 0, which
    gets the dict; the other ranks get None."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    _filelock_compat()
    manager = TaskManager(include_path=list(include_path) if include_path else None)
    out = simple_evaluate(model=model, tasks=list(tasks), task_manager=manager, limit=limit, batch_size=batch_size,
                          bootstrap_iters=bootstrap_iters, log_samples=True, random_seed=seed,
                          numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                          process_docs_parallel=1, distributed_executor_backend="torchrun")  # gloo/nccl, no accelerate
    return out  # None on the ranks > 0 of a distributed run: lmms-eval gathers the results on rank 0
