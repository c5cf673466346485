"""LLaVA-1.5: a CLIP tower whose patch features become a fixed number of image tokens, Llama LM (1-D RoPE)."""

from __future__ import annotations

from typing import Any

import torch

from kscale.models.registry import Adapter, LoadedModel, register


def tiny_clip_llama(tokenizer) -> dict:
    """The tiny CLIP tower and Llama LM of the LLaVA-style debug models (``debug:llava``, ``debug:llava_next``)."""
    from transformers import CLIPVisionConfig, LlamaConfig

    return dict(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=56, patch_size=14, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default")


# llava-hf/llava-1.5's chat template (its processor's chat_template.json): a turn's images first, then its text
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr("
    "'type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


@register
class LlavaAdapter(Adapter):
    family = "llava"
    model_class = "LlavaForConditionalGeneration"
    default_template = "USER: {image}\n{text} ASSISTANT:"
    add_bos = True
    pixel_keys = ("pixel_values", "image_sizes")
    debug_tokens = {"special": ["<pad>", "<s>", "</s>", "<image>"], "pad_token": "<pad>", "bos_token": "<s>",
                    "eos_token": "</s>", "additional_special_tokens": ["<image>"]}
    debug_chat_template = LLAVA_CHAT_TEMPLATE

    def debug_model(self, tokenizer):
        from transformers import LlavaConfig, LlavaForConditionalGeneration
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        cfg = LlavaConfig(**tiny_clip_llama(tokenizer))
        proc = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
        return LlavaForConditionalGeneration(cfg), proc

    def image_token_id(self, config) -> int:
        return config.image_token_id

    def tokens_per_image(self, config) -> int:
        v = config.vision_config
        n = (v.image_size // v.patch_size) ** 2
        return n + 1 if config.vision_feature_select_strategy == "full" else n

    def image_inputs(self, loaded: LoadedModel, images: list):
        out = loaded.image_processor(images=images, return_tensors="pt")
        n = self.tokens_per_image(loaded.model.config)
        return {"pixel_values": out["pixel_values"].to(loaded.dtype)}, [n] * len(images)

    def image_block(self, loaded: LoadedModel, n_tokens: int) -> list[int]:
        return [loaded.model.config.image_token_id] * n_tokens

    def image_features(self, model, inputs: dict[str, torch.Tensor]) -> Any:
        # the model's forward passes these from its config; get_image_features does not read them itself
        pixels = {k: v for k, v in inputs.items() if k in self.pixel_keys}
        cfg = model.config
        return model.model.get_image_features(**pixels, vision_feature_layer=cfg.vision_feature_layer,
                                              vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                              return_dict=True)
