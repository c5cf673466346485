"""Idefics3 / SmolVLM: a SigLIP-style tower on tiles of the image plus a global view, pixel shuffle, Llama LM.

An image becomes, for each tile row by row, ``<fake_token_around_image><row_i_col_j>`` and the tile's image
tokens, a newline after each row, then ``\\n<fake_token_around_image><global-img>`` with the global view's
image tokens and a closing ``<fake_token_around_image>`` (``Idefics3Processor.replace_image_token``). The
processor's ``mm_token_type_ids`` marks the whole block; kscale tags only the image tokens ``image`` and the
wrappers, row markers and newlines of the block ``special`` (:meth:`Idefics3Adapter.image_block`).

Token ids come from the checkpoint's config (``image_token_id``) and tokenizer: SmolVLM checkpoints use ids
other than the config class default (128257). The block is tokenized from its text, so a BPE tokenizer's
merges (``"\\n\\n"`` before the global view) come out as the processor's.
"""

from __future__ import annotations

from typing import Any

import torch

from kscale.models.registry import IMAGE, SPECIAL, Adapter, LoadedModel, register

FAKE, GLOBAL = "<fake_token_around_image>", "<global-img>"


@register
class Idefics3Adapter(Adapter):
    family = "idefics3"
    model_class = "Idefics3ForConditionalGeneration"
    default_template = "<|im_start|>User:{image}{text}<end_of_utterance>\nAssistant:"
    pixel_keys = ("pixel_values", "pixel_attention_mask")
    images_by_sample = True  # pixel_values are (samples, images of a sample, C, H, W)
    debug_tokens = {"special": ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", FAKE, "<image>"],
                    "pad_token": "<|endoftext|>", "bos_token": "<|im_start|>", "eos_token": "<end_of_utterance>",
                    "additional_special_tokens": [FAKE, "<image>"]}
    # added as plain (not special) tokens: only the image block's own tags make them `special`
    DEBUG_MARKERS = [GLOBAL] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]

    def debug_model(self, tokenizer):
        tokenizer.add_tokens(self.DEBUG_MARKERS)
        from transformers import Idefics3Config, Idefics3ForConditionalGeneration, LlamaConfig
        from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        cfg = Idefics3Config(
            vision_config=Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=56, patch_size=14),
            text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"), scale_factor=2,
            pad_token_id=tokenizer.pad_token_id,
        )
        # tiles of 56 px, images resized to at most 4 tiles a side
        proc = Idefics3ImageProcessorPil(size={"longest_edge": 4 * 56}, max_image_size={"longest_edge": 56})
        return Idefics3ForConditionalGeneration(cfg), proc

    def decoder_layers(self, model) -> list[torch.nn.Module]:
        return list(model.model.text_model.layers)

    def rotary_module(self, model) -> torch.nn.Module:
        return model.model.text_model.rotary_emb

    def image_token_id(self, config) -> int:
        return config.image_token_id

    @staticmethod
    def tokens_per_tile(config) -> int:
        v = config.vision_config
        return (v.image_size // v.patch_size) ** 2 // (config.scale_factor ** 2)

    def image_inputs(self, loaded: LoadedModel, images: list):
        groups = [g for g in images if g] if isinstance(images[0], list) else [images]
        out = loaded.image_processor(images=groups, return_row_col_info=True, return_tensors="pt")
        layouts = [(int(r), int(c)) for rows, cols in zip(out["rows"], out["cols"]) for r, c in zip(rows, cols)]
        pix = {"pixel_values": out["pixel_values"].to(loaded.dtype),
               "pixel_attention_mask": out["pixel_attention_mask"]}
        return pix, layouts

    def image_block(self, loaded: LoadedModel, n_tokens: Any) -> tuple[list[int], list[int]]:
        rows, cols = n_tokens
        image = "<image>" * self.tokens_per_tile(loaded.model.config)
        text = "".join("".join(f"{FAKE}<row_{r + 1}_col_{c + 1}>{image}" for c in range(cols)) + "\n"
                       for r in range(rows))
        text += ("\n" if rows or cols else "") + f"{FAKE}{GLOBAL}{image}{FAKE}"
        ids = loaded.tokenizer(text, add_special_tokens=False).input_ids
        image_id = self.image_token_id(loaded.model.config)
        return ids, [IMAGE if i == image_id else SPECIAL for i in ids]
