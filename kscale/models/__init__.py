"""Model adapters: everything kscale knows about an architecture lives here (see registry.py)."""

from kscale.models.registry import (  # noqa: F401
    IMAGE, MODALITY_CODES, MODALITY_NAMES, PAD, SPECIAL, TEXT, VIDEO, Adapter, Batch, LoadedModel, ModelInfo,
    get_adapter, load_model, read_model_config, resolve_model_path,
)
