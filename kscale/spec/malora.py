"""MaLoRA configuration: one frozen dataclass, shared by the spec (``train.malora``) and the tuner.

It lives with the spec sections (the spec imports no stage); the tuner package re-exports it as
``kscale.train.malora.MaLoRAConfig``, beside its layer and model. The same object is written next to the
adapter weights as ``adapter_config.json``, so a saved adapter records exactly how it was built (see
:mod:`kscale.train.malora.model`). Bounds and choices are declared on the fields (checked by
``load_spec``, and by :func:`kscale.spec.section_problems` for a config read back from an adapter);
``validate`` holds the cross-field rules.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from kscale.models.facts import MALORA_TARGET_NAMES as KNOWN_TARGETS  # per family: kscale.models MALORA_TARGETS
from kscale.spec.fields import doc

TargetName = Literal[KNOWN_TARGETS]  # type: ignore[valid-type]  (the names come from kscale.models)


@dataclass(frozen=True, kw_only=True, slots=True)
class MaLoRAConfig:
    """Modality-aware LoRA: a separate low-rank update for image tokens and for text tokens."""

    rank: int = doc("rank r of each branch's A (r x in) and B (out x r)", 16, ge=1)
    alpha: float = doc("scaling numerator: the update is multiplied by alpha / rank", 32.0, gt=0)
    dropout: float = doc("dropout on the layer input before A (shared by both branches)", 0.0, ge=0, lt=1)
    init: Literal["kaiming", "gaussian", "random"] = doc(
        "A init (kaiming-uniform as PEFT, or normal(0, 1/r)); B is zero except with 'random'", "kaiming")
    target_modules: list[TargetName] = doc(
        f"projections of the language model to adapt, among {', '.join(KNOWN_TARGETS)}", factory=lambda: ["k_proj"])
    layers: Literal["all"] | list[int] = doc("decoder layers of the language model to adapt ('all' or indices)", "all")
    gate: Literal["scalar", "token", "fixed"] = doc(
        "branch gate: learnable per-layer value, token-conditioned sigmoid(w.x+b), or fixed 1", "scalar")
    gate_init: float | None = doc("initial gate value (default 1.0 for 'scalar', 0.5 for 'token')", None)
    image_branch: bool = doc("train an update for image (and video) tokens", True)
    text_branch: bool = doc("train an update for text tokens", True)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def initial_gate(self) -> float:
        if self.gate_init is not None:
            return self.gate_init
        return 0.5 if self.gate == "token" else 1.0

    def validate(self) -> list[tuple[str, str]]:
        errors: list[tuple[str, str]] = []
        if not self.target_modules:
            errors.append(("target_modules", "is empty: name at least one projection"))
        if not (self.image_branch or self.text_branch):
            errors.append(("image_branch", "both branches are off: nothing to train"))
        if self.gate == "token" and self.gate_init is not None and not 0.0 < self.gate_init < 1.0:
            errors.append(("gate_init", f"a sigmoid gate starts in (0, 1), got {self.gate_init}"))
        return errors

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MaLoRAConfig:
        return cls(**data)
