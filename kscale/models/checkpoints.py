"""The published Qwen2.5-VL checkpoints' configs, written out (no download): device plans, memory
arithmetic and throughput benchmarks at real shapes use them with random or meta weights.

Values are those of the checkpoints' ``config.json`` (Qwen/Qwen2.5-VL-{7B,32B,72B}-Instruct). The vision
tower is the same 675M-parameter ViT in every size; only its merger's output width follows the LM.
"""

from __future__ import annotations

from typing import Any

_VISION = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "patch_size": 14,
           "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112, "in_chans": 3,
           "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu"}
_TEXT = {"vocab_size": 152064, "max_position_embeddings": 128000, "rms_norm_eps": 1e-6, "hidden_act": "silu",
         "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
         "bos_token_id": 151643, "eos_token_id": 151645, "tie_word_embeddings": False}
_SIZES = {  # hidden, intermediate, layers, attention heads, KV heads
    "7b": (3584, 18944, 28, 28, 4),
    "32b": (5120, 27648, 64, 40, 8),
    "72b": (8192, 29568, 80, 64, 8),
}
QWEN2_5_VL_SIZES = tuple(_SIZES)


def qwen2_5_vl_config(size: str, num_layers: int | None = None) -> Any:
    """A ``Qwen2_5_VLConfig`` of the real ``size`` ("7b", "32b", "72b"); ``num_layers`` cuts the LM short
    (layer shapes of a model that does not fit one device, for benchmarks)."""
    from transformers import Qwen2_5_VLConfig

    if size not in _SIZES:
        raise ValueError(f"unknown Qwen2.5-VL size {size!r} (choose {', '.join(_SIZES)})")
    hidden, inter, layers, heads, kv = _SIZES[size]
    text = {**_TEXT, "hidden_size": hidden, "intermediate_size": inter, "num_attention_heads": heads,
            "num_key_value_heads": kv, "num_hidden_layers": num_layers or layers}
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config={**_VISION, "out_hidden_size": hidden},
                           image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                           vision_end_token_id=151653, tie_word_embeddings=False)
    return cfg
