"""The ``train:`` section of a ``kind: train`` job (loaded by :func:`kscale.spec.load_spec`).

Nested sections: ``malora`` (the adapter, :class:`~kscale.spec.malora.MaLoRAConfig`), ``align``
(the key-alignment term of the objective), ``deepspeed`` (ZeRO stage, offload, precision) and ``eval``
(the before/after table). The model, data, run directory and workers come from the job's ``model``,
``data``, ``output`` and ``resources`` sections. See docs/malora.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from kscale.spec.fields import doc as _doc  # one field helper for every spec section
from kscale.spec.malora import MaLoRAConfig


@dataclass(frozen=True, kw_only=True, slots=True)
class AlignConfig:
    loss: Literal["mmd", "coral", "mean", "none"] = _doc(
        "alignment of image keys to text keys: random-feature MMD, CORAL (covariance), mean matching, or off", "mmd")
    weight: float = _doc("lambda: total loss = LM loss on answer tokens + weight x alignment loss", 1.0, ge=0)
    layers: Literal["all"] | list[int] = _doc("language-model layers whose k_proj outputs are aligned", "all")
    text_reference: Literal["stopgrad", "frozen"] = _doc(
        "text side: this forward's text keys with stop-gradient, or the frozen base model's (one extra "
        "no-grad forward per micro-batch)", "stopgrad")
    mmd_features: int = _doc("random Fourier features per KV head for the MMD estimate", 256, ge=1)
    mmd_bandwidth: float | None = _doc(
        "Gaussian kernel bandwidth for MMD; None: median pairwise distance of the batch's keys", None, gt=0)
    seed: int = _doc("seed of the random features (fixed for the whole run)", 0)


# DeepSpeed settings that change how checkpoints are read on resume: another reader (the universal
# checkpoint's per-file torch.load, the fast/decoupled/DataStates/Nebula engines), other files (node-local
# storage, every rank's partition). kscale saves and loads its checkpoints itself, weights only
# (kscale.train.safe_load), so `train.deepspeed.extra` may not set them.
CHECKPOINT_LOADING_EXTRA = ("checkpoint", "datastates_ckpt", "nebula", "zero_optimization.elastic_checkpoint",
                            "zero_optimization.pipeline_loading_checkpoint")


def _set_paths(value: Any, path: str) -> list[str]:
    """The dotted paths of the values set under ``value`` (``path`` itself for a scalar or an empty dict)."""
    if isinstance(value, dict) and value:
        return [p for k, v in value.items() for p in _set_paths(v, f"{path}.{k}")]
    return [path]


def checkpoint_loading_extra(extra: dict[str, Any]) -> list[str]:
    """The dotted paths (under ``extra``) of the settings of ``extra`` in :data:`CHECKPOINT_LOADING_EXTRA`."""
    found = []
    for ref in CHECKPOINT_LOADING_EXTRA:
        node: Any = extra
        for part in ref.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            found += _set_paths(node, ref)
    return found


@dataclass(frozen=True, kw_only=True, slots=True)
class DeepSpeedConfig:
    zero_stage: Literal[2, 3] = _doc("ZeRO stage: 2 shards optimizer state and gradients, 3 also parameters", 2)
    offload_optimizer: bool = _doc("keep optimizer state in CPU memory (DeepSpeed CPU Adam)", False)
    offload_params: bool = _doc("keep partitioned parameters in CPU memory (ZeRO-3 only)", False)
    bf16: bool = _doc("bfloat16 weights and activations (fp32 master weights in the optimizer)", True)
    partitioned_load: bool = _doc(
        "ZeRO-3: build the model partitioned as it loads (zero.Init), so no rank holds all of it; false: every "
        "rank loads the full model first, then DeepSpeed partitions it", True)
    extra: dict[str, Any] = _doc(
        "merged last into the generated DeepSpeed config (expert knobs); settings that change how checkpoints "
        "are loaded (checkpoint.*, datastates_ckpt, nebula, zero_optimization.elastic_checkpoint / "
        "pipeline_loading_checkpoint) are refused: kscale loads checkpoints itself, weights only", factory=dict)

    def validate(self) -> list[tuple[str, str]]:
        problems = [(f"extra.{path}", "changes how DeepSpeed loads checkpoints; kscale saves and loads them itself, "
                     "weights only (a crafted checkpoint could otherwise run code on resume): remove it")
                    for path in checkpoint_loading_extra(self.extra)]
        if self.offload_params and self.zero_stage != 3:
            problems.append(("offload_params", "parameter offload needs zero_stage 3"))
        return problems


@dataclass(frozen=True, kw_only=True, slots=True)
class EvalConfig:
    heldout_fraction: float = _doc("share of the data held out from training for the before/after table", 0.1,
                                   gt=0, lt=1)
    max_samples: int = _doc("at most this many held-out samples are evaluated", 64, ge=1)
    batch_size: int = _doc("samples per evaluation forward", 4)
    at_end: bool = _doc("write the before/after table (eval.json, eval.md) when training finishes", True)


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    method: Literal["malora", "lora"] = _doc(
        "malora: the modality-aware adapter (gated image and text branches); lora: a plain LoRA baseline (PEFT's "
        "LoRA layers: one update on every token, no gate) with train.malora's rank, alpha, dropout, init, "
        "target_modules and layers", "malora")
    malora: MaLoRAConfig = _doc("the adapter: rank, targets, gate, branches", factory=MaLoRAConfig)
    align: AlignConfig = _doc("the key-alignment term of the objective", factory=AlignConfig)
    deepspeed: DeepSpeedConfig = _doc("ZeRO stage, offload and precision", factory=DeepSpeedConfig)
    eval: EvalConfig = _doc("held-out before/after evaluation", factory=EvalConfig)
    max_steps: int = _doc("optimizer steps to train", 100, ge=1)
    micro_batch_size: int = _doc("samples per forward on each rank", 1, ge=1)
    max_seq_len: int = _doc("longest training sequence in tokens (prompt, image tokens, answer); longer samples "
                            "are skipped and listed in errors.json", 4096, ge=8)
    grad_accum: int = _doc("micro-batches accumulated per optimizer step on each rank", 1, ge=1)
    lr: float = _doc("AdamW learning rate of the adapter parameters", 2e-4, gt=0)
    weight_decay: float = _doc("AdamW weight decay", 0.0)
    warmup_steps: int = _doc("linear learning-rate warmup from 0, then constant", 0)
    clip_grad: float = _doc("global gradient-norm clipping (0: off)", 1.0, ge=0)
    activation_checkpointing: bool = _doc("recompute decoder layers in the backward pass (non-reentrant)", True)
    checkpoint_every: int = _doc("save a resumable checkpoint every N optimizer steps (0: only at the end)", 50, ge=0)
    keep_checkpoints: int = _doc("resumable checkpoints kept on disk (older ones are deleted)", 2, ge=1)
    log_every: int = _doc("write loss terms and gate values every N steps to metrics.jsonl", 1, ge=1)
    seed: int = _doc("seed of adapter init, data order and dropout", 0)
    report_to: list[Literal["tensorboard", "wandb"]] = _doc(
        "where the logged curves also go besides metrics.jsonl and report.html: tensorboard (event files in "
        "<output>/tensorboard), wandb (needs `pip install wandb`); [] for none", factory=list)

    def validate(self) -> list[tuple[str, str]]:
        if self.method == "lora" and not (self.malora.image_branch and self.malora.text_branch):
            return [("method", "lora applies one update to every token; train.malora.image_branch and text_branch "
                     "(a per-modality choice) only apply to method malora: leave them true")]
        return []

