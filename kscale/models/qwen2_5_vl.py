"""Qwen2.5-VL: dynamic-resolution images, fused vision tower, 3-D M-RoPE in the language model.

Pitfall handled here: the model uses 3-D M-RoPE positions only when ``mm_token_type_ids`` is passed
(1 on image tokens, 2 on video tokens); without it it silently falls back to 1-D positions.
Qwen2-VL (``qwen2_vl.py``) and Qwen3-VL (``qwen3_vl.py``) subclass this adapter.
"""

from __future__ import annotations

import torch

from kscale.models.registry import Adapter, LoadedModel, ModelOptions, register

QWEN_TOKENS = {"special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                           "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
               "pad_token": "<|endoftext|>", "eos_token": "<|im_end|>",
               "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                             "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]}
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=None)


@register
class Qwen2_5_VLAdapter(Adapter):
    family = "qwen2_5_vl"
    model_class = "Qwen2_5_VLForConditionalGeneration"
    default_template = "<|im_start|>user\n{image}{text}<|im_end|>\n<|im_start|>assistant\n"
    pixel_keys = ("pixel_values", "image_grid_thw")
    rope_rows = 3  # M-RoPE: temporal, height, width
    debug_tokens = QWEN_TOKENS
    debug_patch = 14  # the tiny model's vision patch (Qwen3-VL: 16)

    def debug_model(self, tokenizer):
        import transformers
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in self.debug_tokens["special"]}
        text = dict(TINY_TEXT, vocab_size=len(tokenizer), eos_token_id=ids["<|im_end|>"],
                    pad_token_id=ids["<|endoftext|>"],
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
        cfg = self.debug_config(text, dict(
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"]))
        side = 4 * self.debug_patch  # 2 x 2 merged tokens at the least, 4 x 4 at the most
        proc = Qwen2VLImageProcessorPil(min_pixels=side * side, max_pixels=4 * side * side,
                                        patch_size=self.debug_patch, merge_size=2, temporal_patch_size=2)
        return getattr(transformers, self.model_class)(cfg), proc

    def debug_config(self, text: dict, ids: dict):
        """The tiny config of ``debug:<family>`` from the real config class: ``text`` its text config,
        ``ids`` the media token ids read from the tiny tokenizer."""
        from transformers import Qwen2_5_VLConfig

        return Qwen2_5_VLConfig(
            text_config=text,
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                               fullatt_block_indexes=[1]), **ids)

    def processor_kwargs(self, mspec: ModelOptions) -> dict:
        kw = {}
        if mspec.min_pixels is not None:
            kw["min_pixels"] = mspec.min_pixels
        if mspec.max_pixels is not None:
            kw["max_pixels"] = mspec.max_pixels
        return kw

    def image_token_id(self, config) -> int:
        return config.image_token_id

    def video_token_id(self, config) -> int | None:
        return config.video_token_id

    def image_inputs(self, loaded: LoadedModel, images: list):
        out = loaded.image_processor(images=images, return_tensors="pt")
        merge = loaded.image_processor.merge_size
        counts = [int(g.prod()) // (merge * merge) for g in out["image_grid_thw"]]
        return {"pixel_values": out["pixel_values"].to(loaded.dtype), "image_grid_thw": out["image_grid_thw"]}, counts

    def image_block(self, loaded: LoadedModel, n_tokens: int) -> list[int]:
        cfg = loaded.model.config
        return [cfg.vision_start_token_id] + [cfg.image_token_id] * n_tokens + [cfg.vision_end_token_id]

    def extra_inputs(self, input_ids_BT: torch.Tensor, config) -> dict[str, torch.Tensor]:
        return {"mm_token_type_ids": self.mm_token_type_ids(input_ids_BT, config)}

    rope_keys = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")  # what get_rope_index reads

    def position_ids(self, loaded: LoadedModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(3, B, T) M-RoPE positions from the model's own ``get_rope_index`` (arange on all 3 rows without media)."""
        ids_BT = inputs["input_ids"]
        B, T = ids_BT.shape
        media = {k: inputs[k] for k in self.rope_keys if k in inputs}
        if not media:
            return torch.arange(T, device=ids_BT.device).view(1, 1, T).expand(3, B, T)
        pos_RBT, _ = loaded.model.model.get_rope_index(
            ids_BT, inputs["mm_token_type_ids"], attention_mask=inputs["attention_mask"], **media)
        return pos_RBT

    def wrapper_ids(self, config) -> set[int]:
        return {config.vision_start_token_id, config.vision_end_token_id}
