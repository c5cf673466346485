"""MaLoRA, laid out like a PEFT tuner: :mod:`.config`, :mod:`.layer` (the gated two-branch Linear) and
:mod:`.model` (inject into the language model, modality-mask hook, save/load/merge), and :mod:`.export`
(``load(base, adapter_dir)`` for your own code; ``export_peft`` writes the text branch as a PEFT LoRA)."""

from kscale.train.malora.config import MaLoRAConfig
from kscale.train.malora.layer import MALORA_PARAM_NAMES, MaLoRALinear, ModalityContext
from kscale.train.malora.model import MaLoRAModel
from kscale.train.malora.export import export_peft, load

__all__ = ["MALORA_PARAM_NAMES", "MaLoRAConfig", "MaLoRALinear", "MaLoRAModel", "ModalityContext", "export_peft",
           "load"]
