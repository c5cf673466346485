"""DeepSpeed plumbing for MaLoRA: process group, engine config, checkpoints.

The training loop in :mod:`kscale.train.run` only sees a DeepSpeed engine wrapping a
:class:`~kscale.train.objective.MaLoRAObjective`. This module turns a
:class:`~kscale.spec.train.TrainConfig` into the DeepSpeed config (ZeRO 2/3, offload, bf16, gradient
accumulation, clipping), joins or creates the process group (torchrun / the deepspeed launcher / Ray
Train create it; a lone process gets a one-rank gloo group backed by a file in the run directory), and
saves/loads resumable checkpoints (adapter parameters and optimizer state only: the frozen base is
excluded).

Under ZeRO-3 the model is built partitioned (:func:`partitioned_loading`): ``from_pretrained`` creates
every parameter inside ``deepspeed.zero.Init``, so each rank holds 1/world of it from the start, and
copies the checkpoint in module by module (rank 0 reads, a gather/re-partition per module). No rank ever
holds the whole model, and MaLoRA's new parameters are partitioned by ``deepspeed.initialize``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from kscale.output import LockLost, fence
from kscale.spec.train import TrainConfig
from kscale.train.layout import CHECKPOINTS, checkpoint_tag


def require_deepspeed() -> Any:
    try:
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
        import deepspeed
    except ImportError as e:
        raise ImportError("training needs DeepSpeed: pip install 'kscale[train]'") from e
    return deepspeed


def ensure_process_group(device: torch.device) -> tuple[int, int]:
    """Join the launcher's process group, or describe a lone process as rank 0 of 1; returns (rank, world).

    torchrun, the deepspeed launcher and Ray Train set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; DeepSpeed
    insists on LOCAL_RANK even for one process, so a lone process gets those variables with a free port.
    """
    import torch.distributed as dist

    deepspeed = require_deepspeed()
    if not dist.is_initialized() and "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(_free_port())})
    os.environ.setdefault("LOCAL_RANK", os.environ.get("RANK", "0") if not dist.is_initialized() else "0")
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.clip_grad,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer:  # DeepSpeed's CPU Adam needs the optimizer from the config
        config["optimizer"] = {"type": "AdamW", "params": {"lr": cfg.lr, "weight_decay": cfg.weight_decay}}
    return _merge(config, ds.extra)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@contextmanager
def partitioned_loading(config: dict[str, Any]) -> Iterator[None]:
    """While open, ``from_pretrained`` builds models partitioned as ``config`` (a ZeRO-3 DeepSpeed config) says.

    transformers finds the config through a weak reference: the ``HfDeepSpeedConfig`` must stay alive
    across ``from_pretrained``, which this block guarantees. On exit the reference is dropped, so a later
    plain load (rank 0's evaluation) is not partitioned."""
    require_deepspeed()
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    if not torch.cuda.is_available():
        _return_freed_host_memory()
    keep = HfDeepSpeedConfig(config)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del keep


def _return_freed_host_memory() -> None:
    """On CPU the partitions live in host memory: make glibc serve large blocks with mmap, so a module's
    full tensors, freed once partitioned, go back to the system instead of staying in the heap (measured
    by bench/zero3_load.py: peak 1.05x -> 0.68x of the model per rank). Elsewhere than glibc: nothing."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name and "libc.so" in name:
        M_MMAP_THRESHOLD = -3
        ctypes.CDLL(name).mallopt(M_MMAP_THRESHOLD, 128 * 1024)  # glibc's default start value, now fixed


def partition_report(module: torch.nn.Module) -> dict[str, int]:
    """How much of ``module`` this rank holds: full and local element counts, all parameters and the
    trainable ones (a ZeRO-3 parameter's local part is its ``ds_tensor``; any other is held whole)."""
    out = {}
    for kind, params in (("all", list(module.parameters())),
                         ("trainable", [p for p in module.parameters() if p.requires_grad])):
        out[f"{kind}_full"] = sum(int(getattr(p, "ds_numel", p.numel())) for p in params)
        out[f"{kind}_local"] = sum(int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else p.numel() for p in params)
    return out


def write_partition_report(module: torch.nn.Module, run_dir: Path, rank: int, world: int, when: str) -> None:
    """Add ``when`` (e.g. "loaded", "first_step") to ``ranks/rank<r>.json``: this rank's share of the model."""
    from kscale.train.layout import RANKS

    path = run_dir / RANKS / f"rank{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    report = json.loads(path.read_text()) if path.exists() else {"rank": rank, "world": world}
    report[when] = partition_report(module)
    path.write_text(json.dumps(report))


def lr_lambda(warmup_steps: int):
    """Linear warmup from 0 to the base learning rate, then constant."""
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def build_engine(module: torch.nn.Module, cfg: TrainConfig, world_size: int) -> Any:
    """``deepspeed.initialize`` over the trainable (adapter) parameters; returns the engine."""
    deepspeed = require_deepspeed()
    params = [p for p in module.parameters() if p.requires_grad]
    config = deepspeed_config(cfg, world_size)
    optimizer = None
    if "optimizer" not in config:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, model_parameters=params, config=config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps)),
    )
    return engine


def fence_all_ranks(run_dir: Path) -> None:
    """Raise :class:`~kscale.output.LockLost` on every rank when rank 0 (which holds the run's lock) finds it
    taken over (:func:`kscale.output.fence`): all ranks stop together, none is left in the next collective."""
    import torch.distributed as dist

    why: list[str | None] = [None]
    if dist.get_rank() == 0:
        try:
            fence(run_dir)
        except LockLost as err:
            why[0] = str(err)
    dist.broadcast_object_list(why, src=0)
    if why[0] is not None:
        raise LockLost(why[0])


def save_checkpoint(engine: Any, run_dir: Path, step: int, keep: int) -> None:
    """Resumable state at ``step`` (adapter + optimizer + scheduler), keeping the newest ``keep``."""
    import torch.distributed as dist

    fence_all_ranks(run_dir)
    root = run_dir / CHECKPOINTS
    engine.save_checkpoint(str(root), tag=checkpoint_tag(step), client_state={"step": step},
                           exclude_frozen_parameters=True)
    dist.barrier()
    if dist.get_rank() == 0:
        tags = sorted(p for p in root.glob("step*") if p.is_dir())
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_latest_checkpoint(engine: Any, run_dir: Path) -> int:
    """Restore the newest checkpoint if there is one; returns the number of steps already done."""
    from kscale.train.safe_load import checkpoint_tag_to_load, weights_only_checkpoints

    root = run_dir / CHECKPOINTS
    tag = checkpoint_tag_to_load(root)  # only a stepNNNNNNNN folder of this run
    if tag is None:
        return 0
    with weights_only_checkpoints(engine):  # never unpickle code from the run folder (kscale.train.safe_load)
        _, client_state = engine.load_checkpoint(str(root), tag=tag, load_module_strict=False)
    return int(client_state["step"])


def gathered_adapter_state(engine: Any, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor] | None:
    """Full adapter tensors on rank 0 (gathering ZeRO-3 partitions on every rank); None elsewhere."""
    import torch.distributed as dist

    deepspeed = require_deepspeed()
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        if dist.get_rank() != 0:
            return None
        return {name: p.detach().float().cpu().clone() for name, p in params.items()}
