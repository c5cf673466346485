"""The ``eval:`` section of a ``kind: eval`` job (loaded by :func:`kscale.spec.load_spec`).

An eval job runs lmms-eval tasks (MMStar, MMBench, POPE, ... or a local task folder) on each model
variant -- the base model, a MaLoRA adapter (gated, or with its text branch merged), a PEFT LoRA -- through
:class:`kscale.eval.lmms_model.KscaleLMM`, and, with ``blind``, once more with every image removed (the
blind baseline as MMStar defines it). See docs/malora.md "Evaluating an adapter".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kscale.spec.fields import doc as _doc

VariantKind = Literal["base", "malora", "lora"]


@dataclass(frozen=True, kw_only=True, slots=True)
class EvalVariant:
    name: str = _doc("The variant's name in the result table.")
    kind: VariantKind = _doc("base (the model as loaded), malora (a kscale MaLoRA adapter) or lora (a PEFT LoRA "
                             "adapter directory).", "base")
    path: str | None = _doc("malora: a saved adapter directory or a `kind: train` run directory (its adapter/); "
                            "lora: a PEFT adapter directory (adapter_config.json + weights) or a `kind: train` run "
                            "directory with train.method: lora.", None)
    merge: bool = _doc("malora: fold the text branch into the base weights (the image branch stays gated); "
                       "lora: merge_and_unload. Scores equal the unmerged adapter's up to rounding.", False)
    analysis_run: str | None = _doc(
        "The referee's table (report.html): an analysis run directory (kind: analyze over a store extracted "
        "with this variant's model on the benchmark's images, extract.attention on, extract.queries for the "
        "query gap) whose key MMD, attention mass/efficiency and query gap per layer are shown for this variant.",
        None)
    bias_run: str | None = _doc("The referee's table: a bias run directory whose visual dependency "
                                "(dependency_* rows) is shown for this variant.", None)
    bias_variant: str | None = _doc("The variant's label inside bias_run (default: this variant's name).", None)

    def validate(self) -> list[tuple[str, str]]:
        out = []
        if self.kind == "base" and self.path is not None:
            out.append(("path", "a base variant takes no adapter path"))
        if self.kind != "base" and not self.path:
            out.append(("path", f"required for a {self.kind} variant"))
        if self.kind == "base" and self.merge:
            out.append(("merge", "a base variant has nothing to merge"))
        for name in ("analysis_run", "bias_run"):
            value = getattr(self, name)
            if value is not None and not Path(value).expanduser().is_dir():
                out.append((name, f"run directory {value!r} does not exist"))
        if self.bias_variant is not None and self.bias_run is None:
            out.append(("bias_variant", "names a variant of bias_run, which is not set"))
        return out


@dataclass(frozen=True, kw_only=True, slots=True)
class EvalStageConfig:
    variants: list[EvalVariant] = _doc("Model variants evaluated in turn on the same tasks.",
                                       factory=lambda: [EvalVariant(name="base")])
    tasks: list[str] = _doc("lmms-eval task (or group) names, e.g. [mmstar, pope]; a task of `include_path` "
                            "by its `task:` name.", factory=list)
    include_path: list[str] = _doc("Folders of extra task YAMLs (local tasks, offline copies of benchmarks).",
                                   factory=list)
    limit: int | None = _doc("Documents per task (the first N; None: all).", None, ge=1)
    batch_size: int = _doc("Loglikelihood requests per forward pass.", 4, ge=1)
    blind: bool = _doc("Also run every variant with the images removed (same questions, no image: MMStar's "
                       "blind baseline) and report multimodal gain = score with image - score without.", True)
    max_new_tokens: int = _doc("Generation budget of generate_until tasks that do not set max_new_tokens.", 32,
                               ge=1)
    bootstrap_iters: int = _doc("lmms-eval's bootstrap replicates for the standard errors of metrics without "
                                "a closed form (0: none).", 1000, ge=0)
    seed: int = _doc("lmms-eval's random, numpy and torch seeds.", 0)

    def validate(self) -> list[tuple[str, str]]:
        out = []
        if not self.tasks:
            out.append(("tasks", "name at least one lmms-eval task"))
        names = [v.name for v in self.variants]
        if not names:
            out.append(("variants", "name at least one variant"))
        if len(set(names)) != len(names):
            out.append(("variants", f"duplicate variant names in {names}"))
        return out
