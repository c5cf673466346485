"""Model variants of a bias job: the base model, base + a saved adapter, and checkpoints of train runs.

How it connects: :func:`enumerate_variants` (driver side) turns ``bias.include_base``, ``bias.adapter``
and ``bias.train_runs`` into :class:`Variant` records, each carried by the shards that score it; before a
shard the worker's :class:`VariantSlot` (``slot.apply(variant)``) injects MaLoRA into its loaded base model
(:class:`kscale.adapters.MaLoRAModel`) and loads that variant's adapter weights, or removes the
adapter for ``base``. Only the small adapter tensors change between variants; the base stays loaded.
``bias.adapter`` may also be a PEFT LoRA (a PEFT adapter directory, or a ``kind: train`` run with
``train.method: lora``; the kind is read from its ``adapter_config.json``): the slot applies it with
:func:`kscale.adapters.apply_adapter`, the function the extract and eval stages use, and removes it again
(PEFT's ``unload``) before the next variant.

A train run directory (:mod:`kscale.train.layout`) holds ``checkpoints/stepNNNNNNNN/`` (DeepSpeed state:
the trainable parameters under ``module`` with the prefix ``malora.model.``, the ZeRO stage in
``ds_config``) and ``adapter/adapter_config.json`` (how the adapter was built; the same for every
checkpoint of the run). ZeRO-3 checkpoints keep parameters partitioned: they are gathered with
DeepSpeed's ``zero_to_fp32``. Only the adapter library (:mod:`kscale.adapters`) and the run
directory's names (:mod:`kscale.train.layout`) are used here, never the training stage's code.

``fingerprint`` (file sizes and modification times) marks which weights a committed shard was scored
with: a checkpoint rewritten by a resumed training is scored again, never mixed.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from kscale.adapters import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, AppliedAdapter, MaLoRAModel, adapter_files,
                             apply_adapter, load_adapter_config)
from kscale.spec.adapter import adapter_dir, adapter_problems, found_kind
from kscale.train.layout import ADAPTER_DIR, CHECKPOINT_PREFIX, CHECKPOINTS, STEP_DIR
# ZeRO-0/1/2 write mp_rank_00_model_states.pt, ZeRO-3 zero_pp_rank_0_mp_rank_00_model_states.pt
MODEL_STATES = "*mp_rank_*_model_states.pt"


@dataclass(frozen=True)
class Variant:
    name: str  # base | adapter | <label>@<step>
    kind: str  # base | adapter | checkpoint
    path: str = ""  # adapter directory or checkpoint directory
    config_dir: str = ""  # directory holding adapter_config.json
    run: str = ""  # train run label ("" outside train runs)
    step: int = -1  # checkpoint step (-1 outside train runs)
    fingerprint: str = "base"
    method: str = "malora"  # the adapter's kind: malora, or lora (a PEFT LoRA; bias.adapter only)

    @property
    def slug(self) -> str:
        """File-name-safe form of the name (``malora@50`` -> ``malora-50``)."""
        return re.sub(r"[^A-Za-z0-9_.-]", "-", self.name)


def _files_fingerprint(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def adapter_variant(directory: str) -> Variant:
    """Variant ``adapter``: a MaLoRA or PEFT LoRA adapter directory, or a train run's ``adapter/``."""
    problems = adapter_problems(directory)
    if problems:
        raise ValueError(f"bias.adapter: {problems[0][1]}")
    d = adapter_dir(directory)
    method = found_kind(d)[0]
    if method == "malora" and not (d / ADAPTER_WEIGHTS).is_file():
        raise ValueError(f"bias.adapter: {str(d)!r} is not a saved MaLoRA adapter "
                         f"(needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    return Variant("adapter", "adapter", str(d), str(d), fingerprint=_files_fingerprint(adapter_files(d)),
                   method=str(method))


def checkpoint_variants(label: str, run_dir: str, steps: str | list[int]) -> list[Variant]:
    """One variant per checkpoint of a train run (ascending steps), filtered by ``steps``."""
    run = Path(run_dir).expanduser()
    where = f"bias.train_runs.{label}"
    cfg_dir = run / ADAPTER_DIR
    if not (cfg_dir / ADAPTER_CONFIG).is_file():
        raise ValueError(f"{where}: {str(cfg_dir / ADAPTER_CONFIG)!r} is missing (is {str(run)!r} a finished "
                         "`kind: train` run directory?)")
    found = {}
    for p in (run / CHECKPOINTS).glob("step*"):
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and any(p.glob(MODEL_STATES)):
            found[int(m.group(1))] = p
    if not found:
        raise ValueError(f"{where}: no checkpoints in {str(run / CHECKPOINTS)!r}")
    if steps != "all":
        missing = sorted(set(steps) - set(found))
        if missing:
            raise ValueError(f"bias.checkpoint_steps: steps {missing} not in {where} (has {sorted(found)})")
        found = {s: found[s] for s in steps}
    return [Variant(f"{label}@{s}", "checkpoint", str(p), str(cfg_dir), label, s,
                    _files_fingerprint([f for f in p.iterdir() if f.is_file()] + [cfg_dir / ADAPTER_CONFIG]))
            for s, p in sorted(found.items())]


def enumerate_variants(cfg) -> list[Variant]:
    out = [Variant("base", "base")] if cfg.include_base else []
    if cfg.adapter:
        out.append(adapter_variant(cfg.adapter))
    for label, run_dir in cfg.train_runs.items():
        out += checkpoint_variants(label, run_dir, cfg.checkpoint_steps)
    return out


def checkpoint_adapter_state(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """Adapter tensors (names as ``MaLoRAModel.adapter_parameters``) from a DeepSpeed checkpoint directory."""
    d = Path(checkpoint_dir)
    states = sorted(d.glob(MODEL_STATES))
    meta = torch.load(states[0], map_location="cpu", weights_only=True)
    stage = (meta.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0)
    if stage == 3:
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        except ImportError as e:
            raise ImportError(f"{d}: a ZeRO-3 checkpoint needs DeepSpeed to gather: pip install 'kscale[train]'") from e
        module = get_fp32_state_dict_from_zero_checkpoint(str(d.parent), tag=d.name, exclude_frozen_parameters=True)
    else:
        module = meta["module"]
    state = {k[len(CHECKPOINT_PREFIX):]: v for k, v in module.items() if k.startswith(CHECKPOINT_PREFIX)}
    if not state:
        raise ValueError(f"{d}: no MaLoRA parameters (keys starting with {CHECKPOINT_PREFIX!r}) in the checkpoint")
    return state


def variant_weights(variant: Variant) -> dict[str, torch.Tensor]:
    if variant.kind == "adapter":
        from safetensors.torch import load_file

        return load_file(str(Path(variant.path) / ADAPTER_WEIGHTS))
    return checkpoint_adapter_state(variant.path)


class VariantSlot:
    """The adapter currently injected into a worker's base model (at most one): MaLoRA (re-injected on a config
    change, else only its weights reloaded) or a PEFT LoRA (applied, and removed before any other variant)."""

    def __init__(self, loaded: Any):
        self.loaded = loaded
        self.malora: MaLoRAModel | None = None
        self.lora: AppliedAdapter | None = None
        self.current: str | None = None

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    def apply(self, variant: Variant) -> None:
        key = f"{variant.name}:{variant.fingerprint}"
        if key == self.current:
            return
        if self.lora is not None:  # PEFT's layers out first: a MaLoRA or the base model comes next
            self.loaded.model = self.lora.remove()
            self.lora = None
        config = None if variant.kind == "base" or variant.method == "lora" else load_adapter_config(variant.config_dir)
        if self.malora is not None and (config is None or config != self.malora.malora_config):
            self.malora.unload()
            self.malora = None
        if variant.method == "lora" and variant.kind != "base":
            self.lora = apply_adapter(self.loaded, SimpleNamespace(kind="lora", path=variant.path, merge=False))
        elif config is not None:
            if self.malora is None:
                self.malora = MaLoRAModel(self.model, config)
            self.malora.load_adapter_state_dict(variant_weights(variant))
            self.malora.eval()
        self.current = key
