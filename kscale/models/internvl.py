"""InternVL (HF-native InternVL2.5/3): an InternViT tower on dynamic tiles plus a thumbnail, pixel shuffle,
Qwen2 (or another) LM with 1-D RoPE.

An image becomes ``<img>``, ``image_seq_length`` context tokens per tile, ``</img>``
(``InternVLProcessor.replace_image_token``). The processor's ``mm_token_type_ids`` marks ``<img>`` and
``</img>`` as image too (its ``image_token_ids``); kscale tags them ``special``, the context tokens ``image``.
All three ids come from the checkpoint: the context id from the config, the wrappers from the tokenizer's
named tokens (``start_image_token`` / ``end_image_token``), never from the class defaults.
"""

from __future__ import annotations

import torch

from kscale.models.registry import Adapter, LoadedModel, register


@register
class InternVLAdapter(Adapter):
    family = "internvl"
    model_class = "InternVLForConditionalGeneration"
    default_template = "<|im_start|>user\n{image}\n{text}<|im_end|>\n<|im_start|>assistant\n"
    debug_tokens = {"special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
                                "<video>"],
                    "pad_token": "<|endoftext|>", "eos_token": "<|im_end|>",
                    # what the checkpoints' tokenizer_config names (InternVLProcessor reads these attributes)
                    "extra_special_tokens": {"start_image_token": "<img>", "end_image_token": "</img>",
                                             "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}}

    def debug_model(self, tokenizer):
        # the named tokens above take the extra-special slot; the chat markers join them
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]},
                                     replace_extra_special_tokens=False)
        from transformers import InternVLConfig, InternVLForConditionalGeneration, Qwen2Config
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
        from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

        vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      image_size=[56, 56], patch_size=[14, 14])
        cfg = InternVLConfig(
            vision_config=vision,
            text_config=Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                                    bos_token_id=None, eos_token_id=tokenizer.eos_token_id),
            image_token_id=tokenizer.context_image_token_id, image_seq_length=4, downsample_ratio=0.5,
        )
        proc = GotOcr2ImageProcessorPil(size={"height": 56, "width": 56}, crop_to_patches=True, min_patches=1,
                                        max_patches=4)
        return InternVLForConditionalGeneration(cfg), proc

    def image_token_id(self, config) -> int:
        return config.image_token_id

    def image_inputs(self, loaded: LoadedModel, images: list):
        # crop_to_patches: InternVLProcessor's default for images
        out = loaded.image_processor(images=images, crop_to_patches=True, return_tensors="pt")
        n = loaded.model.config.image_seq_length
        return {"pixel_values": out["pixel_values"].to(loaded.dtype)}, [n * int(p) for p in out["num_patches"]]

    def image_block(self, loaded: LoadedModel, n_tokens: int) -> list[int]:
        tok = loaded.tokenizer
        return [tok.start_image_token_id] + [loaded.model.config.image_token_id] * n_tokens + [tok.end_image_token_id]

    def special_ids(self, loaded: LoadedModel) -> set[int]:
        tok = loaded.tokenizer
        return super().special_ids(loaded) | {tok.start_image_token_id, tok.end_image_token_id}

    def image_features(self, model, inputs: dict[str, torch.Tensor]):
        cfg = model.config
        return model.model.get_image_features(inputs["pixel_values"], vision_feature_layer=cfg.vision_feature_layer,
                                              vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                              return_dict=True)
