"""Model adapters: everything kscale knows about an architecture lives here (see registry.py).

The torch-free facts (modalities, families, MaLoRA targets, head dim, layer resolution; ``facts.py``) import
eagerly; the adapters and loaders (``registry.py``, torch and transformers) load on first use of their names.
"""

from kscale.models.facts import (  # noqa: F401
    FAMILIES, IMAGE, MALORA_TARGET_NAMES, MALORA_TARGETS, MODALITIES, MODALITY_CODES, MODALITY_NAMES, PAD,
    SPECIAL, TEXT, VIDEO, head_dim, layer_problems, resolve_layers,
)

_REGISTRY = ("Adapter", "Batch", "LoadedModel", "ModelInfo", "get_adapter", "load_model", "model_info",
             "read_model_config", "resolve_model_path")


def __getattr__(name: str):
    if name in _REGISTRY:
        from kscale.models import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'kscale.models' has no attribute {name!r}")
