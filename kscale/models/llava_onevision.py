"""LLaVA-OneVision: a SigLIP tower, anyres tiles for a single image, one tile per image in multi-image samples,
a learned newline feature after each row of features, Qwen2 LM (1-D RoPE).

Like LLaVA-NeXT (``llava_next.py``) every feature position carries the image token id, so
:meth:`LlavaOnevisionAdapter.image_block` tags the newline positions ``special`` itself. Two differences:
a grid of more than ``anyres_max_N`` tiles' worth of features is shrunk (bilinear) before the newlines go
in, and an image of a sample with several images is not tiled at all (its base features and one
newline). The image processor decides the latter from how images are grouped, so this adapter asks for
them by sample (``images_by_sample``) and passes ``batch_num_images`` on to the model.

Video (``LlavaOnevisionProcessor.replace_video_token`` and the model's ``get_video_features``): every frame is
resized to the video processor's size (the checkpoint's ``video_preprocessor_config.json``, else the image
processor's), each frame's features are pooled 2x2 (bilinear, ``apply_pooling``) and one ``image_newline``
feature closes the video: ``<video>`` x (frames x pooled patches + 1). The frame tokens are ``video`` with
their frame index; the closing newline carries the video token id too and is ``special`` (frame -1). The
video processor needs torchvision, so kscale makes the frames itself: PIL bicubic resize (as the image
processor's PIL backend), rescale and normalise in float32. A batch's videos must have one frame count
(the model takes them as one (videos, frames, 3, H, W) tensor).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

import torch

from kscale.models.llava_next import LlavaNextAdapter
from kscale.models.inputs import Video
from kscale.models.registry import SPECIAL, VIDEO, Adapter, LoadedModel, register

DEBUG_PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112]]


@register
class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"
    model_class = "LlavaOnevisionForConditionalGeneration"
    supports = Adapter.supports + ("video",)
    default_template = "<|im_start|>user\n{image}\n{text}<|im_end|>\n<|im_start|>assistant\n"
    add_bos = False
    pixel_keys = ("pixel_values", "image_sizes", "batch_num_images")
    images_by_sample = True
    debug_tokens = {"special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"],
                    "pad_token": "<|endoftext|>", "eos_token": "<|im_end|>",
                    "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<image>", "<video>"]}

    def debug_model(self, tokenizer):
        from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config,
                                  SiglipVisionConfig)
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil)

        cfg = LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=56, patch_size=14),
            text_config=Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                                    bos_token_id=None, eos_token_id=tokenizer.eos_token_id),
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
            vision_feature_layer=-1, vision_feature_select_strategy="full", image_grid_pinpoints=DEBUG_PINPOINTS,
            vision_aspect_ratio="anyres_max_2",  # 2x2 tiles exceed 2 tiles' worth of features: shrunk
        )
        model = LlavaOnevisionForConditionalGeneration(cfg)
        with torch.no_grad():
            model.model.image_newline.normal_()
        proc = LlavaOnevisionImageProcessorPil(size={"height": 56, "width": 56}, image_grid_pinpoints=DEBUG_PINPOINTS)
        return model, proc

    def video_token_id(self, config) -> int | None:
        return config.video_token_id

    def image_inputs(self, loaded: LoadedModel, images: list):
        # grouped by sample (Adapter.batch), or a flat list of lone images (e.g. the trainer's blank image)
        groups = [g for g in images if g] if isinstance(images[0], list) else [[im] for im in images]
        out = loaded.image_processor(images=groups, return_tensors="pt")
        single = [len(g) == 1 for g in groups for _ in g]
        cfg = loaded.model.config
        layouts = [self.grid(cfg, hw.tolist()) if one else (self.base_features(cfg), 1, 0)
                   for hw, one in zip(out["image_sizes"], single)]
        pix = {"pixel_values": out["pixel_values"].to(loaded.dtype), "image_sizes": out["image_sizes"],
               "batch_num_images": torch.as_tensor(out["batch_num_images"])}
        return pix, layouts

    @staticmethod
    def base_features(config) -> int:
        v = config.vision_config
        return (v.image_size // v.patch_size) ** 2

    @staticmethod
    def grid(config, image_size_hw: list[int]) -> tuple[int, int, int]:
        """(base features, rows, columns) of a lone image: the unpadded anyres grid, shrunk as the model's
        ``pack_image_features`` does when it holds more than ``anyres_max_N`` tiles' worth of features."""
        _, rows, cols = LlavaNextAdapter.grid(config, image_size_hw)
        base = LlavaOnevisionAdapter.base_features(config)  # SigLIP: no class token
        max_tiles = int(config.vision_aspect_ratio.strip("anyres_max_"))
        ratio = math.sqrt(rows * cols / (max_tiles * base))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
        return base, rows, cols

    def image_features(self, model, inputs: dict[str, torch.Tensor]) -> Any:
        pixels = {k: v for k, v in inputs.items() if k in self.pixel_keys}
        cfg = model.config
        return model.model.get_image_features(**pixels, vision_feature_layer=cfg.vision_feature_layer,
                                              vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                              vision_aspect_ratio=cfg.vision_aspect_ratio, return_dict=True)

    # -- video
    def video_settings(self, loaded: LoadedModel) -> dict:
        """Frame size, rescale factor and mean/std: the checkpoint's ``video_preprocessor_config.json`` where it
        has one, else the image processor's."""
        ip = loaded.image_processor
        out = {"size": dict(ip.size), "rescale": ip.rescale_factor, "mean": list(ip.image_mean),
               "std": list(ip.image_std)}
        vfile = Path(loaded.info.path) / "video_preprocessor_config.json" if loaded.info.path else None
        if vfile is not None and vfile.is_file():
            v = json.loads(vfile.read_text())
            out.update(size=v.get("size", out["size"]), rescale=v.get("rescale_factor", out["rescale"]),
                       mean=v.get("image_mean", out["mean"]), std=v.get("image_std", out["std"]))
        return out

    @staticmethod
    def pooled_patches(config) -> int:
        """Tokens per frame: the patch grid pooled 2x2 (``apply_pooling``: ceil of half each side)."""
        side = config.vision_config.image_size // config.vision_config.patch_size
        return math.ceil(side / 2) ** 2

    def video_inputs(self, loaded: LoadedModel, videos: list[Video]):
        from PIL import Image

        counts = {len(v.frames) for v in videos}
        if len(counts) > 1:
            raise ValueError(f"llava_onevision takes a batch's videos as one tensor: their frame counts differ "
                             f"({sorted(counts)}); sample the same number of frames per video")
        vs = self.video_settings(loaded)
        h, w = vs["size"]["height"], vs["size"]["width"]
        mean = np.asarray(vs["mean"], np.float32)[:, None, None]
        std = np.asarray(vs["std"], np.float32)[:, None, None]
        clips = []
        for v in videos:
            frames = [np.asarray(f.convert("RGB").resize((w, h), Image.BICUBIC), np.float32).transpose(2, 0, 1)
                      for f in v.frames]
            clips.append(np.stack([(f * np.float32(vs["rescale"]) - mean) / std for f in frames]))
        n = len(videos[0].frames) * self.pooled_patches(loaded.model.config) + 1
        return {"pixel_values_videos": torch.from_numpy(np.stack(clips)).to(loaded.dtype)}, [n] * len(videos)

    def video_block(self, loaded: LoadedModel, video: Video, n_tokens: int):
        per = self.pooled_patches(loaded.model.config)
        frames = [j // per for j in range(n_tokens - 1)] + [-1]  # the closing newline belongs to no frame
        tags = [VIDEO] * (n_tokens - 1) + [SPECIAL]
        return [loaded.model.config.video_token_id] * n_tokens, frames, tags
