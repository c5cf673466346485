"""The ``bias:`` section of a ``kind: bias`` job (loaded by :func:`kscale.spec.load_spec`).

A bias job scores the correct answer (and, where the record has them, distractors and the text's
contradicting claim) of every (image, question, answer) record under image counterfactuals, under
visual/text token dropping, and for every model variant: the base model, a saved adapter (MaLoRA or PEFT LoRA), and
each checkpoint of ``kind: train`` runs. See docs/bias.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from kscale.spec.fields import doc as _doc  # one field helper for every spec section

Condition = Literal["real", "blank", "noise", "swapped", "none"]
DropOrder = Literal["random", "least_attended", "most_attended", "text"]
CONDITIONS: tuple[str, ...] = get_args(Condition)
DROP_ORDERS: tuple[str, ...] = get_args(DropOrder)


@dataclass(frozen=True, kw_only=True, slots=True)
class DroppingConfig:
    enabled: bool = _doc("Measure answer log-likelihood while a growing fraction of tokens is dropped.", True)
    fractions: list[float] = _doc("Fractions of the visual (or text context) tokens dropped; 0 is the real "
                                  "image and always included.", factory=lambda: [0.25, 0.5, 0.75, 1.0], gt=0, le=1)
    orders: list[DropOrder] = _doc("Which tokens go first: random, least_attended, most_attended (image tokens ranked "
                             "by attention received) and text (random text context tokens, the comparison).",
                             factory=lambda: list(DROP_ORDERS))
    attention_layers: Literal["all"] | list[int] = _doc(
        "Language-model layers whose attention ranks image tokens (averaged over layers and heads).", "all")
    queries: Literal["after_image", "answer", "last_k"] = _doc(
        "Query tokens whose attention is summed: text after the image, the answer span, or the last k.", "after_image")
    last_k: int = _doc("k for `queries: last_k`.", 8, ge=1)

    def validate(self) -> list[tuple[str, str]]:
        out = []
        if sorted(set(self.fractions)) != list(self.fractions):
            out.append(("fractions", f"must be increasing without repeats, got {self.fractions}"))
        if self.enabled and not self.orders:
            out.append(("orders", "is empty while dropping is enabled"))
        return out


@dataclass(frozen=True, kw_only=True, slots=True)
class BiasConfig:
    conditions: list[Condition] = _doc("Image conditions: real, blank (constant colour), noise (uniform pixels), swapped "
                                 "(another sample's image, a seeded derangement) and none (no image: the blind "
                                 "baseline). `real` is required.", factory=lambda: list(CONDITIONS))
    blank_rgb: list[int] = _doc("Colour of the blank image.", factory=lambda: [128, 128, 128], ge=0, le=255)
    seed: int = _doc("Seed of noise images, the swap derangement, random dropping and the bootstrap.", 0)
    batch_size: int = _doc("Rows (sample x candidate answer) per forward pass.", 4, ge=1)
    max_seq_len: int = _doc("Longer samples are recorded as errors and skipped.", 4096, ge=8)
    distractor_field: str | None = _doc(
        "Record field with a wrong answer or a list of them: the record becomes multiple choice (the answer "
        "is chosen among answer + distractors by log-likelihood).", "distractor")
    claim_field: str | None = _doc(
        "Record field with what the text asserts when it contradicts the image (evidence conflict; generated "
        "`conflict` records carry it as text_claim).", "text_claim")
    choice_score: Literal["mean", "sum"] = _doc(
        "How candidates are compared: mean per-token log-likelihood (length-fair) or the sum.", "mean")
    dropping: DroppingConfig = _doc("Token dropping (redundancy, the data factor).", factory=DroppingConfig)
    include_base: bool = _doc("Score the base model (variant `base`).", True)
    adapter: str | None = _doc("A saved adapter: a MaLoRA or PEFT LoRA adapter directory, or a `kind: train` run "
                               "directory (its adapter/, MaLoRA or train.method: lora; the kind is read from "
                               "adapter_config.json): adds variant `adapter` (base + adapter).", None)
    train_runs: dict[str, str] = _doc(
        "Label -> `kind: train` run directory; every checkpoint there (and its final adapter) becomes a variant "
        "`<label>@<step>`, for trends along training (e.g. {lora: runs/no_align, malora: runs/mmd}).", factory=dict)
    checkpoint_steps: Literal["all"] | list[int] = _doc("Which checkpoint steps of the train runs to score.", "all")
    bootstrap: int = _doc("Bootstrap replicates (resampling samples) for the intervals.", 1000, ge=10)
    confidence: float = _doc("Coverage of the percentile intervals.", 0.95, ge=0.5, lt=1)

    def validate(self) -> list[tuple[str, str]]:
        out = []
        if "real" not in self.conditions:
            out.append(("conditions", f"must include 'real', got {self.conditions}"))
        if len(set(self.conditions)) != len(self.conditions):
            out.append(("conditions", f"duplicate entries in {self.conditions}"))
        if len(self.blank_rgb) != 3:
            out.append(("blank_rgb", f"must be 3 values in 0..255, got {self.blank_rgb}"))
        if not (self.include_base or self.adapter or self.train_runs):
            out.append(("include_base", "no model variant to score: set include_base, adapter or train_runs"))
        for label in self.train_runs:
            if not label or any(ch in label for ch in "@/ "):
                out.append((f"train_runs.{label}", "labels must be non-empty without '@', '/' or spaces"))
        return out  # the loader (or kscale.spec.section_problems) checks the nested dropping section
