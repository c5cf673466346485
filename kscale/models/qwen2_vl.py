"""Qwen2-VL: Qwen2.5-VL's predecessor (same tokens, processor and M-RoPE; a vision tower without window
attention). Everything but the tiny debug config is :class:`~kscale.models.qwen2_5_vl.Qwen2_5_VLAdapter`'s."""

from __future__ import annotations

from kscale.models.qwen2_5_vl import Qwen2_5_VLAdapter
from kscale.models.registry import register


@register
class Qwen2VLAdapter(Qwen2_5_VLAdapter):
    family = "qwen2_vl"
    model_class = "Qwen2VLForConditionalGeneration"
    rope_keys = ("image_grid_thw", "video_grid_thw")

    def video_time_inputs(self, videos, tps):
        return {}  # Qwen2-VL's temporal positions count patches, not seconds

    def debug_config(self, text: dict, ids: dict):
        from transformers import Qwen2VLConfig

        return Qwen2VLConfig(text_config=text, vision_config=dict(
            depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2), **ids)
