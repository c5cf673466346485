"""Adapters on a loaded model, below every stage: MaLoRA (kscale's own tuner) and PEFT LoRA.

MaLoRA is laid out like a PEFT tuner: the config (:class:`MaLoRAConfig`, defined with the spec sections in
:mod:`kscale.spec.malora` since it is also the ``train.malora`` section; re-exported here), :mod:`.layer`
(the gated two-branch Linear), :mod:`.model` (inject into the language model, modality-mask hook,
save/load/merge) and :mod:`.export` (``load(base, adapter_dir)`` for your own code; ``export_peft`` writes
the text branch as a PEFT LoRA). :mod:`.apply` holds :func:`apply_adapter`, the one way a stage puts a
saved adapter (MaLoRA or PEFT LoRA, a directory or a ``kind: train`` run) on a loaded model -- the eval
stage's variants, ``extract.adapter`` and the bias stage's ``bias.adapter`` -- and :func:`adapter_identity`,
what a stage records of it.

A library between the spec and the stages (tests/unit/test_imports.py): every stage may import it, it
imports no stage (only the spec, :mod:`kscale.models` and the errors), and the spec does not import it.
``kscale.train.malora`` remains as a name for this package's MaLoRA part (old imports, saved runs)."""

from kscale.spec.malora import MaLoRAConfig
from kscale.adapters.layer import MALORA_PARAM_NAMES, MaLoRALinear, ModalityContext
from kscale.adapters.model import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MaLoRAModel, load_adapter_config
from kscale.adapters.export import export_peft, load
from kscale.adapters.apply import AppliedAdapter, adapter_files, adapter_identity, apply_adapter

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "MALORA_PARAM_NAMES", "AppliedAdapter", "MaLoRAConfig", "MaLoRALinear",
           "MaLoRAModel", "ModalityContext", "adapter_files", "adapter_identity", "apply_adapter", "export_peft", "load",
           "load_adapter_config"]
