"""MaLoRA under its first name: the library moved below the stages, to :mod:`kscale.adapters` (so the
extract and bias stages can apply adapters without importing the training stage).

``kscale.train.malora`` and its modules ``layer``, ``model`` and ``export`` stay importable for old imports
and saved runs: each is the very module of :mod:`kscale.adapters` (the same classes, so ``isinstance`` and
pickles agree), not a copy."""

from kscale.adapters import (  # noqa: F401  (re-exported)
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, MALORA_PARAM_NAMES, MaLoRAConfig, MaLoRALinear, MaLoRAModel, ModalityContext,
    export_peft, load, load_adapter_config,
)

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "MALORA_PARAM_NAMES", "MaLoRAConfig", "MaLoRALinear", "MaLoRAModel",
           "ModalityContext", "export_peft", "load", "load_adapter_config"]
