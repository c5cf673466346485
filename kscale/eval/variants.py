"""Model variants of an eval job: the base model, a MaLoRA adapter (gated or merged), a PEFT LoRA.

:func:`load_variant` loads the model afresh (``kscale.models.load_model``) and applies one
:class:`kscale.spec.EvalVariant` to it, so no adapter state leaks from one variant into the next:

- ``base``: the model as loaded;
- ``malora``: :meth:`kscale.train.malora.MaLoRAModel.from_pretrained` on a saved adapter directory, or on
  the ``adapter/`` folder of a ``kind: train`` run directory (:data:`kscale.train.layout.ADAPTER_DIR`); the
  layers are injected in place, so the loaded model's own ``forward`` runs them (gated: text and image
  branches by the modality mask). ``merge`` folds the text branch into the base weights
  (:meth:`~kscale.train.malora.MaLoRAModel.merge_text_branch`);
- ``lora``: ``peft.PeftModel.from_pretrained`` (LoRA layers injected in place too) on a PEFT adapter
  directory, or on the ``adapter/`` of a ``kind: train`` run with ``train.method: lora`` (kscale writes that
  one in PEFT's format, :mod:`kscale.train.lora`); ``merge`` is ``merge_and_unload``.
"""

from __future__ import annotations

from pathlib import Path

from kscale.models import LoadedModel, load_model
from kscale.spec import EvalVariant, ModelSpec
from kscale.train.layout import ADAPTER_DIR


def malora_dir(path: str | Path) -> Path:
    """The adapter directory itself, or the ``adapter/`` of a train run directory (MaLoRA or LoRA)."""
    p = Path(path).expanduser()
    return p / ADAPTER_DIR if (p / ADAPTER_DIR).is_dir() else p


def apply_variant(loaded: LoadedModel, variant: EvalVariant) -> LoadedModel:
    """``loaded`` with ``variant``'s adapter injected (in place); returns it."""
    if variant.kind == "malora":
        from kscale.train.malora import MaLoRAModel

        wrapped = MaLoRAModel.from_pretrained(loaded.model, malora_dir(variant.path))
        if variant.merge:
            wrapped.merge_text_branch()
        loaded.model.eval()
    elif variant.kind == "lora":
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(loaded.model, str(malora_dir(variant.path)))
        loaded.model = (peft_model.merge_and_unload() if variant.merge else peft_model.base_model.model).eval()
    return loaded


def load_variant(mspec: ModelSpec, variant: EvalVariant) -> LoadedModel:
    """A freshly loaded model with ``variant`` applied."""
    return apply_variant(load_model(mspec), variant)
