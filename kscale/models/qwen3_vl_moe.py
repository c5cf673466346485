"""Qwen3-VL-MoE: Qwen3-VL with sparse-expert MLPs in the language model. Attention, tokens, QK-norm,
DeepStack and M-RoPE are Qwen3-VL's; the experts are fused parameters, so MaLoRA adapts the attention
projections only (``MALORA_TARGETS`` in facts.py)."""

from __future__ import annotations

from kscale.models.qwen3_vl import Qwen3VLAdapter
from kscale.models.registry import register


@register
class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    family = "qwen3_vl_moe"
    model_class = "Qwen3VLMoeForConditionalGeneration"

    def debug_config(self, text: dict, ids: dict):
        from transformers import Qwen3VLMoeConfig

        moe = dict(self.debug_text(text), num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                   decoder_sparse_step=1)
        return Qwen3VLMoeConfig(text_config=moe, vision_config=self.debug_vision(), **ids)
