"""Training on a Ray cluster: Ray Train's ``TorchTrainer`` runs :func:`kscale.train.run.run_train` on
every worker. Ray creates the process group (gloo on CPU workers, NCCL on GPUs) and sets
RANK/WORLD_SIZE/LOCAL_RANK, so each worker runs exactly what a ``torchrun`` rank runs with the same spec.

Workers and their devices come from the job's ``resources`` section (``workers``, ``gpus_per_worker``,
``cpus_per_worker``). The run directory (``output.path``) must be on storage every worker sees: ranks
write DeepSpeed checkpoint shards there and rank 0 writes logs, the adapter and the evaluation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kscale.results import TrainResult
from kscale.spec import JobSpec


def run_train_on_ray(spec: JobSpec) -> TrainResult:
    """Fit on the connected Ray cluster (``ray.init`` done by the caller); returns rank 0's summary."""
    try:
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer
    except ImportError as e:
        raise ImportError("training on Ray needs Ray Train: pip install 'ray[train]'") from e

    res = spec.resources
    use_gpu = res.gpus_per_worker > 0
    resources = {"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if use_gpu else {})}
    from kscale.train.run import claim_run_dir

    trainer = TorchTrainer(
        _worker,
        train_loop_config={"spec": spec, "output_claimed": True},
        scaling_config=ScalingConfig(num_workers=res.workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=spec.name, storage_path=str(Path(spec.output.path).resolve() / "ray")),
    )
    with claim_run_dir(spec):  # the driver holds the run directory for its workers (lock + policy)
        result = trainer.fit()
    metrics = result.metrics or {}
    return TrainResult(run_dir=str(Path(spec.output.path)), steps=spec.train.max_steps,
                       resumed_from=metrics.get("resumed_from", 0),
                       last={k: metrics[k] for k in ("loss", "lm", "align") if metrics.get(k) is not None},
                       adapter_checkpoint=result.checkpoint.path if result.checkpoint else None)


def _worker(config: dict[str, Any]) -> None:
    import os

    import ray.train

    from kscale.train.run import run_train

    if ray.train.get_context().get_world_size() > 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # gloo ranks sharing a host: avoid oversubscription
    summary = run_train(config["spec"], output_claimed=config["output_claimed"])
    metrics = {"loss": summary.last.get("loss"), "lm": summary.last.get("lm"),
               "align": summary.last.get("align"), "resumed_from": summary.resumed_from}
    # Ray Train keeps metrics only with a checkpoint: rank 0 registers the saved adapter as one.
    checkpoint = None
    if ray.train.get_context().get_world_rank() == 0:
        from kscale.train.layout import ADAPTER_DIR

        checkpoint = ray.train.Checkpoint.from_directory(str(Path(summary.run_dir) / ADAPTER_DIR))
    ray.train.report(metrics, checkpoint=checkpoint)
