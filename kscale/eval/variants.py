"""Model variants of an eval job: the base model, a MaLoRA adapter (gated or merged), a PEFT LoRA.

:func:`load_variant` loads the model afresh (``kscale.models.load_model``) and applies one
:class:`kscale.spec.EvalVariant` to it with :func:`kscale.adapters.apply_adapter` (the function the extract
and bias stages use too), so no adapter state leaks from one variant into the next:

- ``base``: the model as loaded;
- ``malora``: :meth:`kscale.adapters.MaLoRAModel.from_pretrained` on a saved adapter directory, or on
  the ``adapter/`` folder of a ``kind: train`` run directory (:data:`kscale.train.layout.ADAPTER_DIR`); the
  layers are injected in place, so the loaded model's own ``forward`` runs them (gated: text and image
  branches by the modality mask). ``merge`` folds the text branch into the base weights
  (:meth:`~kscale.adapters.MaLoRAModel.merge_text_branch`);
- ``lora``: ``peft.PeftModel.from_pretrained`` (LoRA layers injected in place too) on a PEFT adapter
  directory, or on the ``adapter/`` of a ``kind: train`` run with ``train.method: lora`` (kscale writes that
  one in PEFT's format, :mod:`kscale.train.lora`); ``merge`` is ``merge_and_unload``.
"""

from __future__ import annotations

from pathlib import Path

from kscale.adapters import apply_adapter
from kscale.models import LoadedModel, load_model
from kscale.spec import EvalVariant, ModelSpec
from kscale.spec.adapter import adapter_dir


def malora_dir(path: str | Path) -> Path:
    """The adapter directory itself, or the ``adapter/`` of a train run directory (MaLoRA or LoRA)."""
    return adapter_dir(path)


def apply_variant(loaded: LoadedModel, variant: EvalVariant) -> LoadedModel:
    """``loaded`` with ``variant``'s adapter injected (in place); returns it."""
    apply_adapter(loaded, variant)
    return loaded


def load_variant(mspec: ModelSpec, variant: EvalVariant) -> LoadedModel:
    """A freshly loaded model with ``variant`` applied."""
    return apply_variant(load_model(mspec), variant)
