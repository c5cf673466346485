"""``run_train(spec)``: the one public entry of the training stage (``kind: train``).

It runs in whatever process group it finds: a lone process, every rank of ``torchrun`` / the
``deepspeed`` launcher, or every worker of Ray Train's ``TorchTrainer`` (:mod:`kscale.train.ray_train`).
Each rank loads the model (under ZeRO-3 partitioned as it loads: no rank ever holds all of it, see
:func:`kscale.train.engine.partitioned_loading`), injects MaLoRA with the same seed, wraps the
:class:`~kscale.train.objective.MaLoRAObjective` in a DeepSpeed engine, resumes from the newest
checkpoint in the run directory, and trains. Run directory (``output.path``; names in
:mod:`kscale.train.layout`)::

    kscale.json          kind marker (a train run), written when the directory is created
    metrics.jsonl        one line per logged step: loss terms, lr, grad norm, gate values
    errors.json          samples skipped in this run with their reason (longer than train.max_seq_len)
    ranks/rankR.json     each rank's share of the parameters right after loading and at the first step
    checkpoints/stepN/   resumable DeepSpeed state (adapter + optimizer), newest ``keep_checkpoints``
    adapter/             the final adapter (safetensors + adapter_config.json)
    eval.json, eval.md   the before/after table on held-out data (:mod:`kscale.train.evaluate`)
    report.html          loss, alignment term, gates per layer, key gap before/after (:mod:`kscale.train.report`)
    tensorboard/         event files when ``train.report_to`` has tensorboard (:mod:`kscale.train.loggers`)

Rank 0 claims the directory for the whole run (:func:`claim_run_dir`: an exclusive lock, then
``output.if_exists``); a folder that is not a train run is never written into or deleted.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from kscale.output import (RUN_MARKER, OutputError, OutputKind, claim_output, recorded_spec, run_marker,
                           run_marker_reader, write_json_atomic)
from kscale.results import TrainResult
from kscale.spec import JobSpec
from kscale.train import engine as ds
from kscale.spec.train import TrainConfig
from kscale.train.data import MicroBatchPlan, collate, sequence_check, split_indices
from kscale.train.layout import ADAPTER_DIR, CHECKPOINTS, ERRORS, METRICS, SPLIT
from kscale.adapters import MaLoRAModel
from kscale.train.objective import MaLoRAObjective



def stage_entry(spec: JobSpec, ctx) -> TrainResult:
    """The stage table's entry (``kscale.spec.STAGES``): with the Ray executor, Ray Train's TorchTrainer
    hosts the DeepSpeed workers; otherwise training runs here."""
    if spec.resources.executor == "ray":
        from kscale.train.ray_train import run_train_on_ray

        with ctx.ray(spec):
            return run_train_on_ray(spec)
    return run_train(spec)


def run_train(spec: JobSpec, output_claimed: bool = False) -> TrainResult:
    """Train MaLoRA as ``spec.train`` says; returns a summary (final losses, paths) on every rank.
    ``output_claimed``: the caller (Ray Train's driver) holds the run directory's claim already. What is
    printed meanwhile (DeepSpeed's notices included) goes to stderr: stdout carries the summary line."""
    import contextlib
    import sys

    with contextlib.redirect_stdout(sys.stderr):
        return _run_train(spec, output_claimed)


def _run_train(spec: JobSpec, output_claimed: bool) -> TrainResult:
    from kscale.models.registry import load_model, pick_device

    run_dir = Path(spec.output.path)
    cfg: TrainConfig = spec.train
    rank, world = ds.ensure_process_group(pick_device(spec.model.device))
    if cfg.deepspeed.zero_stage == 3 and cfg.deepspeed.partitioned_load:
        with ds.partitioned_loading(ds.deepspeed_config(cfg, world)):
            loaded = load_model(spec.model)
    else:
        loaded = load_model(spec.model)
    with _claimed(spec, rank, output_claimed):
        return _train(spec, loaded, run_dir, rank, world)


def _train(spec: Any, loaded: Any, run_dir: Path, rank: int, world: int) -> TrainResult:
    import torch.distributed as dist

    from kscale.data import open_source

    cfg: TrainConfig = spec.train
    ds.write_partition_report(loaded.model, run_dir, rank, world, "loaded")
    torch.manual_seed(cfg.seed)  # the same adapter init on every rank
    malora = build_adapter(loaded.model, cfg)
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
        _keep_metrics_until(run_dir / METRICS, start)
        if start:
            print(f"train: resumed from step {start} ({run_dir / CHECKPOINTS})", flush=True)
        (run_dir / SPLIT).write_text(json.dumps({"train": split.train, "heldout": split.heldout}))
    loggers = _loggers(spec, run_dir) if rank == 0 else None
    last = train_loop(engine, objective, plan, loaded, cfg, run_dir, start, rank, world, loggers,
                      job=getattr(spec, "name", "train"))
    write_errors(plan, run_dir, rank, world)
    state = ds.gathered_adapter_state(engine, malora.adapter_parameters())
    if rank == 0:
        malora.save_pretrained(run_dir / ADAPTER_DIR, state=state)
    dist.barrier()
    table = None
    if cfg.eval.at_end and rank == 0:
        from kscale.train.evaluate import evaluate_run

        table = evaluate_run(spec)
        if loggers is not None:
            loggers.log_eval(table, cfg.max_steps)
    if rank == 0:
        from kscale.train.report import build_report

        build_report(run_dir)
        if loggers is not None:
            loggers.close()
    dist.barrier()
    return TrainResult(run_dir=str(run_dir), steps=cfg.max_steps, resumed_from=start, last=last, eval=table)


def build_adapter(model: Any, cfg: TrainConfig) -> Any:
    """``train.method``'s adapter injected into ``model``: MaLoRA, or the plain-LoRA baseline (PEFT's layers,
    :class:`kscale.train.lora.LoRAModel`) with the same rank, alpha, dropout, init, targets and layers."""
    if cfg.method == "lora":
        from kscale.train.lora import LoRAModel

        return LoRAModel(model, cfg.malora)
    return MaLoRAModel(model, cfg.malora)


def write_errors(plan: MicroBatchPlan, run_dir: Path, rank: int, world: int) -> None:
    """``errors.json`` (rank 0): every sample a rank skipped in this run, with its reason (e.g. too long)."""
    import torch.distributed as dist

    found: list[dict[int, str]] = [{} for _ in range(world)]
    dist.all_gather_object(found, plan.errors)
    if rank == 0:
        merged = {sid: reason for part in found for sid, reason in part.items()}
        rows = [{"sample_id": sid, "reason": merged[sid]} for sid in sorted(merged)]
        (run_dir / ERRORS).write_text(json.dumps(rows, indent=1))


def _loggers(spec: Any, run_dir: Path) -> Any:
    """TensorBoard / W&B views of the logged records (``train.report_to``), or None."""
    if not spec.train.report_to:
        return None
    import dataclasses

    from kscale.train.loggers import RunLoggers

    return RunLoggers(list(spec.train.report_to), run_dir, getattr(spec, "name", "train"),
                      {"train": dataclasses.asdict(spec.train), "model": spec.model.path})


TRAIN_KIND = OutputKind("train run", run_marker_reader("train"))  # resume: same spec and same data only


def claim_run_dir(spec: Any) -> Any:
    """The run directory's claim (:mod:`kscale.output`): locked, and only ever a train run (``kscale.json``).
    ``resume`` continues from the newest checkpoint of a run of the same spec and data (a changed dataset is
    refused with ``DataChanged``, a changed spec field such as ``train.lr`` with ``OutputExists``, each
    saying what changed: a checkpoint of another run is never continued), ``fail`` refuses, ``overwrite``
    starts from empty."""

    from kscale.data.identity import data_identity
    from kscale.spec import to_dict

    data = data_identity(spec.data)
    fields = recorded_spec(to_dict(spec))  # no cluster section: its env may hold secrets

    def create(tmp: Path) -> None:
        write_json_atomic(tmp / RUN_MARKER, run_marker("train", spec.fingerprint(), data, fields))

    return claim_output(spec.output.path, spec.output.if_exists, TRAIN_KIND, spec.fingerprint(), create, data=data,
                        spec=fields)


@contextmanager
def _claimed(spec: Any, rank: int, already: bool) -> Iterator[None]:
    """Rank 0 claims the run directory for the whole run; every rank learns whether it was refused."""
    import torch.distributed as dist

    if already:
        yield
        return
    with ExitStack() as stack:
        refused: list[str | None] = [None]
        if rank == 0:
            try:
                stack.enter_context(claim_run_dir(spec))
            except OutputError as e:
                refused[0] = str(e)
                dist.broadcast_object_list(refused, src=0)
                raise
        dist.broadcast_object_list(refused, src=0)
        if refused[0] is not None:
            raise OutputError(refused[0])
        yield


def _keep_metrics_until(path: Path, step: int) -> None:
    """Drop logged steps after ``step`` (logged before a kill, redone after the resume): one line per step."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)  # a line torn by the kill has no newline: dropped
    kept = [line for line in lines if line.endswith("\n") and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


def blank_image_inputs(loaded: Any) -> dict[str, torch.Tensor]:
    """Pixel inputs of one small blank image: fed to the vision tower on micro-batches without images."""
    from PIL import Image

    pixels, _ = loaded.adapter.image_inputs(loaded, [Image.new("RGB", (56, 56))])
    return pixels


def train_loop(engine: Any, objective: MaLoRAObjective, plan: MicroBatchPlan, loaded: Any, cfg: TrainConfig,
               run_dir: Path, start: int, rank: int, world: int, loggers: Any = None, job: str = "train",
               ) -> dict[str, float]:
    """Optimizer steps ``start .. max_steps``: forward/backward per micro-batch, log, checkpoint. Rank 0 shows
    step, loss terms and tokens/s (its own tokens x world size) on a bar and in ``_progress.json``."""
    from kscale.executors.progress import StageBar

    engine.train()
    bar = StageBar(run_dir, job, "train", "step", total=cfg.max_steps, initial=start) if rank == 0 else None
    last: dict[str, float] = {}
    for step in range(start, cfg.max_steps):
        t0 = time.perf_counter()
        sums: dict[str, torch.Tensor] = {}
        tokens = 0
        for micro in range(cfg.grad_accum):
            batch = collate(loaded, plan.records(step, micro, rank))
            tokens += int(batch.inputs["attention_mask"].sum())
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
                if loggers is not None:
                    loggers.log(record)
        if bar is not None:
            bar.advance(1, tokens=tokens * world, detail=f"loss {last['loss']:.4f}, align {last['align']:.4f}", loss=f"{last['loss']:.4f}",
                        lm=f"{last['lm']:.4f}", align=f"{last['align']:.4f}")
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.max_steps:
            ds.save_checkpoint(engine, run_dir, step + 1, cfg.keep_checkpoints)
    if bar is not None:
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
