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
             batch_size: int = 4, bootstrap_iters: int = 1000, seed: int = 0) -> dict[str, Any]:
    """lmms-eval's results dict (``results``, ``n-samples``, ``samples``, ``configs``, ...) for ``model``."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    _filelock_compat()
    manager = TaskManager(include_path=list(include_path) if include_path else None)
    out = simple_evaluate(model=model, tasks=list(tasks), task_manager=manager, limit=limit, batch_size=batch_size,
                          bootstrap_iters=bootstrap_iters, log_samples=True, random_seed=seed,
                          numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                          process_docs_parallel=1)
    if out is None:
        raise RuntimeError("lmms-eval returned no results (a non-zero rank of a distributed run?)")
    return out
