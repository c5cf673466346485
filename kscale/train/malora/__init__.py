"""MaLoRA, laid out like a PEFT tuner: the config (:class:`MaLoRAConfig`, defined with the spec sections in
:mod:`kscale.spec.malora` since it is also the ``train.malora`` section; re-exported here), :mod:`.layer`
(the gated two-branch Linear) and :mod:`.model` (inject into the language model, modality-mask hook,
save/load/merge), and :mod:`.export` (``load(base, adapter_dir)`` for your own code; ``export_peft``
writes the text branch as a PEFT LoRA).

A library, not part of the training stage's run: it imports nothing from ``kscale.train`` outside this
package, so other stages use it through this module (the bias stage loads saved adapters and train
checkpoints with it; tests/unit/test_imports.py keeps it that way)."""

from kscale.spec.malora import MaLoRAConfig
from kscale.train.malora.layer import MALORA_PARAM_NAMES, MaLoRALinear, ModalityContext
from kscale.train.malora.model import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MaLoRAModel, load_adapter_config
from kscale.train.malora.export import export_peft, load

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "MALORA_PARAM_NAMES", "MaLoRAConfig", "MaLoRALinear", "MaLoRAModel",
           "ModalityContext", "export_peft", "load", "load_adapter_config"]
