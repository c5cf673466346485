"""MaLoRA configuration: one frozen dataclass, shared by the spec (``train.malora``) and the tuner.

The same object is written next to the adapter weights as ``adapter_config.json``, so a saved adapter
records exactly how it was built (see :mod:`kscale.train.malora.model`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from kscale.models.facts import MALORA_TARGET_NAMES as KNOWN_TARGETS  # per family: kscale.models MALORA_TARGETS


@dataclass(frozen=True, kw_only=True, slots=True)
class MaLoRAConfig:
    """Modality-aware LoRA: a separate low-rank update for image tokens and for text tokens."""

    rank: int = field(default=16, metadata={"doc": "rank r of each branch's A (r x in) and B (out x r)"})
    alpha: float = field(default=32.0, metadata={"doc": "scaling numerator: the update is multiplied by alpha / rank"})
    dropout: float = field(default=0.0, metadata={"doc": "dropout on the layer input before A (shared by both branches)"})
    init: Literal["kaiming", "gaussian", "random"] = field(
        default="kaiming",
        metadata={"doc": "A init (kaiming-uniform as PEFT, or normal(0, 1/r)); B is zero except with 'random'"},
    )
    target_modules: list[str] = field(
        default_factory=lambda: ["k_proj"],
        metadata={"doc": f"projections of the language model to adapt, among {', '.join(KNOWN_TARGETS)}"},
    )
    layers: Literal["all"] | list[int] = field(
        default="all", metadata={"doc": "decoder layers of the language model to adapt ('all' or indices)"}
    )
    gate: Literal["scalar", "token", "fixed"] = field(
        default="scalar",
        metadata={"doc": "branch gate: learnable per-layer value, token-conditioned sigmoid(w.x+b), or fixed 1"},
    )
    gate_init: float | None = field(
        default=None, metadata={"doc": "initial gate value (default 1.0 for 'scalar', 0.5 for 'token')"}
    )
    image_branch: bool = field(default=True, metadata={"doc": "train an update for image (and video) tokens"})
    text_branch: bool = field(default=True, metadata={"doc": "train an update for text tokens"})

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
        if self.rank < 1:
            errors.append(("rank", f"must be >= 1, got {self.rank}"))
        if self.alpha <= 0:
            errors.append(("alpha", f"must be > 0, got {self.alpha}"))
        if not 0.0 <= self.dropout < 1.0:
            errors.append(("dropout", f"must be in [0, 1), got {self.dropout}"))
        for i, name in enumerate(self.target_modules):
            if name not in KNOWN_TARGETS:
                errors.append((f"target_modules[{i}]", f"unknown module {name!r} (known: {', '.join(KNOWN_TARGETS)})"))
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
