"""``run_train(spec)``: the one public entry of the training stage (``kind: train``).

It runs in whatever process group it finds: a lone process, every rank of ``torchrun`` / the
``deepspeed`` launcher, or every worker of Ray Train's ``TorchTrainer`` (:mod:`kscale.train.ray_train`).
Each rank loads the model (under ZeRO-3 partitioned as it loads: no rank ever holds all of it, see
:func:`kscale.train.engine.partitioned_loading`), injects MaLoRA with the same seed, wraps the
:class:`~kscale.train.objective.MaLoRAObjective` in a DeepSpeed engine, resumes from the newest
checkpoint in the run directory, and trains. Run directory (``output.path``)::

    metrics.jsonl        one line per logged step: loss terms, lr, grad norm, gate values
    errors.json          samples skipped in this run with their reason (longer than train.max_seq_len)
    ranks/rankR.json     each rank's share of the parameters right after loading and at the first step
    checkpoints/stepN/   resumable DeepSpeed state (adapter + optimizer), newest ``keep_checkpoints``
    adapter/             the final adapter (safetensors + adapter_config.json)
    eval.json, eval.md   the before/after table on held-out data (:mod:`kscale.train.evaluate`)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from kscale.train import engine as ds
from kscale.train.config import TrainConfig
from kscale.train.data import MicroBatchPlan, collate, sequence_check, split_indices
from kscale.train.malora import MaLoRAModel
from kscale.train.objective import MaLoRAObjective

METRICS = "metrics.jsonl"
ADAPTER_DIR = "adapter"


def run_train(spec: Any) -> dict[str, Any]:
    """Train MaLoRA as ``spec.train`` says; returns a summary (final losses, paths) on every rank."""
    import torch.distributed as dist

    from kscale.data import open_source
    from kscale.models.registry import load_model, pick_device

    cfg: TrainConfig = spec.train
    run_dir = Path(spec.output.path)
    rank, world = ds.ensure_process_group(pick_device(spec.model.device))
    if cfg.deepspeed.zero_stage == 3 and cfg.deepspeed.partitioned_load:
        with ds.partitioned_loading(ds.deepspeed_config(cfg, world)):
            loaded = load_model(spec.model)
    else:
        loaded = load_model(spec.model)
    _prepare_run_dir(run_dir, spec.output.if_exists, rank)
    ds.write_partition_report(loaded.model, run_dir, rank, world, "loaded")
    torch.manual_seed(cfg.seed)  # the same adapter init on every rank
    malora = MaLoRAModel(loaded.model, cfg.malora)
    if cfg.activation_checkpointing:
        malora.enable_activation_checkpointing()
    objective = MaLoRAObjective(malora, cfg.align, dummy_pixels=blank_image_inputs(loaded))
    source = open_source(spec.data)
    split = split_indices(len(source), cfg.eval.heldout_fraction, cfg.eval.max_samples, cfg.seed)
    plan = MicroBatchPlan(source, split.train, cfg.micro_batch_size, cfg.grad_accum, world, cfg.seed,
                          too_long=sequence_check(loaded, cfg.max_seq_len))
    engine = ds.build_engine(objective, cfg, world)
    ds.write_partition_report(engine.module, run_dir, rank, world, "first_step")
    start = ds.load_latest_checkpoint(engine, run_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "split.json").write_text(json.dumps({"train": split.train, "heldout": split.heldout}))
    last = train_loop(engine, objective, plan, loaded, cfg, run_dir, start, rank, world)
    write_errors(plan, run_dir, rank, world)
    state = ds.gathered_adapter_state(engine, malora.adapter_parameters())
    if rank == 0:
        malora.save_pretrained(run_dir / ADAPTER_DIR, state=state)
    dist.barrier()
    summary = {"run_dir": str(run_dir), "steps": cfg.max_steps, "resumed_from": start, "last": last}
    if cfg.eval.at_end and rank == 0:
        from kscale.train.evaluate import evaluate_run

        summary["eval"] = evaluate_run(spec)
    dist.barrier()
    return summary


def write_errors(plan: MicroBatchPlan, run_dir: Path, rank: int, world: int) -> None:
    """``errors.json`` (rank 0): every sample a rank skipped in this run, with its reason (e.g. too long)."""
    import torch.distributed as dist

    found: list[dict[int, str]] = [{} for _ in range(world)]
    dist.all_gather_object(found, plan.errors)
    if rank == 0:
        merged = {sid: reason for part in found for sid, reason in part.items()}
        rows = [{"sample_id": sid, "reason": merged[sid]} for sid in sorted(merged)]
        (run_dir / "errors.json").write_text(json.dumps(rows, indent=1))


def _prepare_run_dir(run_dir: Path, if_exists: str, rank: int) -> None:
    """``output.if_exists``: resume from the newest checkpoint, fail, or start over (rank 0 deletes)."""
    import shutil

    import torch.distributed as dist

    started = (run_dir / ds.CHECKPOINTS).exists()
    if started and if_exists == "fail":
        raise FileExistsError(f"output.path: {run_dir} already holds a run and output.if_exists is 'fail'")
    if started and if_exists == "overwrite" and rank == 0:
        shutil.rmtree(run_dir)
    dist.barrier()


def blank_image_inputs(loaded: Any) -> dict[str, torch.Tensor]:
    """Pixel inputs of one small blank image: fed to the vision tower on micro-batches without images."""
    from PIL import Image

    pixels, _ = loaded.adapter.image_inputs(loaded, [Image.new("RGB", (56, 56))])
    return pixels


def train_loop(engine: Any, objective: MaLoRAObjective, plan: MicroBatchPlan, loaded: Any, cfg: TrainConfig,
               run_dir: Path, start: int, rank: int, world: int) -> dict[str, float]:
    """Optimizer steps ``start .. max_steps``: forward/backward per micro-batch, log, checkpoint."""
    from tqdm.auto import tqdm

    engine.train()
    bar = tqdm(total=cfg.max_steps, initial=start, desc="train", disable=rank != 0, dynamic_ncols=True)
    last: dict[str, float] = {}
    for step in range(start, cfg.max_steps):
        t0 = time.perf_counter()
        sums: dict[str, torch.Tensor] = {}
        for micro in range(cfg.grad_accum):
            batch = collate(loaded, plan.records(step, micro, rank))
            loss, terms = engine(_to(batch.inputs, engine.device), batch.answer_mask_BT.to(engine.device),
                                 batch.modality_BT.to(engine.device))
            engine.backward(loss)
            engine.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.float() / cfg.grad_accum
        last = _reduce_mean(sums, world)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps:
            record = _log_record(engine, objective, step + 1, last, time.perf_counter() - t0)
            if rank == 0:
                with open(run_dir / METRICS, "a") as f:
                    f.write(json.dumps(record) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{last['loss']:.4f}", lm=f"{last['lm']:.4f}", align=f"{last['align']:.4f}")
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.max_steps:
            ds.save_checkpoint(engine, run_dir, step + 1, cfg.keep_checkpoints)
    bar.close()
    if start < cfg.max_steps:
        ds.save_checkpoint(engine, run_dir, cfg.max_steps, cfg.keep_checkpoints)
    return last


def _to(inputs: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in inputs.items()}


def _reduce_mean(terms: dict[str, torch.Tensor], world: int) -> dict[str, float]:
    import torch.distributed as dist

    names = sorted(terms)
    stacked = torch.stack([torch.as_tensor(terms[k], dtype=torch.float32) for k in names])
    if world > 1:
        dist.all_reduce(stacked)
        stacked /= world
    return {k: float(v) for k, v in zip(names, stacked.tolist())}


def _log_record(engine: Any, objective: MaLoRAObjective, step: int, terms: dict[str, float],
                seconds: float) -> dict[str, Any]:
    deepspeed = ds.require_deepspeed()
    gates = [p for n, p in objective.malora.adapter_parameters().items() if "gate" in n]
    with deepspeed.zero.GatheredParameters(gates, modifier_rank=None):  # every rank joins under ZeRO-3
        gate_values = objective.malora.gate_values()
    grad_norm = engine.get_global_grad_norm()
    return {"step": step, **terms, "lr": engine.get_lr()[0],
            "grad_norm": None if grad_norm is None else float(grad_norm), "step_seconds": round(seconds, 4),
            "gates": gate_values}
