"""LLaVA-NeXT (LLaVA-1.6): anyres tiles of a CLIP tower, a learned newline feature after each row, Llama LM.

An image becomes the base tile's patch features, then the unpadded grid of all tiles row by row, each row
closed by the model's ``image_newline`` vector. Every one of these positions carries the image token id
(the processor writes ``<image>`` once per feature), so the token-id rule cannot see the newlines:
:meth:`LlavaNextAdapter.image_block` tags them ``special`` itself. The grid shape comes from the model's
own ``get_anyres_image_grid_shape`` and ``unpad_image``, the functions its forward packs features with.
"""

from __future__ import annotations

from typing import Any

import torch

from kscale.models.llava import LlavaAdapter, tiny_clip_llama
from kscale.models.registry import IMAGE, SPECIAL, LoadedModel, register

# a tiny anyres grid: base tile 56 px, tiles arranged 1x2, 2x1 or 2x2
DEBUG_PINPOINTS = [[56, 112], [112, 56], [112, 112]]


@register
class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"
    model_class = "LlavaNextForConditionalGeneration"

    def debug_model(self, tokenizer):
        from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        cfg = LlavaNextConfig(**tiny_clip_llama(tokenizer), image_grid_pinpoints=DEBUG_PINPOINTS)
        model = LlavaNextForConditionalGeneration(cfg)
        with torch.no_grad():  # the checkpoint's newline vector is learned; a random one tells it apart
            model.model.image_newline.normal_()
        proc = LlavaNextImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                          image_grid_pinpoints=DEBUG_PINPOINTS)
        return model, proc

    def image_inputs(self, loaded: LoadedModel, images: list):
        out = loaded.image_processor(images=images, return_tensors="pt")
        layouts = [self.grid(loaded.model.config, hw.tolist()) for hw in out["image_sizes"]]
        return {"pixel_values": out["pixel_values"].to(loaded.dtype), "image_sizes": out["image_sizes"]}, layouts

    @staticmethod
    def grid(config, image_size_hw: list[int]) -> tuple[int, int, int]:
        """(base features, rows, columns) of one image of ``image_size_hw`` (H, W): the model's packing."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        v = config.vision_config
        side = v.image_size // v.patch_size
        base = side * side + (1 if config.vision_feature_select_strategy == "full" else 0)
        tiles_h, tiles_w = get_anyres_image_grid_shape(image_size_hw, config.image_grid_pinpoints, v.image_size)
        rows, cols = unpad_image(torch.empty(0, tiles_h * side, tiles_w * side), torch.tensor(image_size_hw)).shape[1:]
        return base, rows, cols

    def image_block(self, loaded: LoadedModel, n_tokens: Any) -> tuple[list[int], list[int]]:
        base, rows, cols = n_tokens
        tags = [IMAGE] * base + ([IMAGE] * cols + [SPECIAL]) * rows
        return [loaded.model.config.image_token_id] * len(tags), tags
