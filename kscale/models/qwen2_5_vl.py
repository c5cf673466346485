"""Qwen2.5-VL: dynamic-resolution images, fused vision tower, 3-D M-RoPE in the language model.

Pitfall handled here: the model uses 3-D M-RoPE positions only when ``mm_token_type_ids`` is passed
(1 on image tokens, 2 on video tokens); without it it silently falls back to 1-D positions.
Qwen2-VL (``qwen2_vl.py``) and Qwen3-VL (``qwen3_vl.py``) subclass this adapter.

Video follows transformers' ``Qwen2VLVideoProcessor`` (which needs torchvision, absent on CPU machines):
frames (already sampled: :class:`kscale.models.inputs.Video`) are padded to a multiple of
``temporal_patch_size`` by repeating the last one, all resized to one size by the video processor's rule,
normalised by the image processor (``do_resize=False``), and ``temporal_patch_size`` consecutive frames
are stacked into each patch in the video processor's layout. Resize sizes and mean/std come from the
checkpoint's ``video_preprocessor_config.json`` where it has one, else from the image processor. Each
video token belongs to the first frame of its temporal patch (``frame``; its time is that frame's).

Legend: F frames, G temporal patches (F / temporal_patch_size), N patches per frame, C channels, P patch side.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kscale.models.inputs import Video
from kscale.models.registry import Adapter, LoadedModel, ModelOptions, register

QWEN_TOKENS = {"special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                           "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
               "pad_token": "<|endoftext|>", "eos_token": "<|im_end|>",
               "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                             "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]}
# Qwen2-VL's chat template as its checkpoints ship it (Qwen2.5-VL and Qwen3-VL use the same for images and text)
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=None)


@register
class Qwen2_5_VLAdapter(Adapter):
    family = "qwen2_5_vl"
    model_class = "Qwen2_5_VLForConditionalGeneration"
    default_template = "<|im_start|>user\n{image}{text}<|im_end|>\n<|im_start|>assistant\n"
    pixel_keys = ("pixel_values", "image_grid_thw")
    rope_rows = 3  # M-RoPE: temporal, height, width
    supports = Adapter.supports + ("video",)
    debug_tokens = QWEN_TOKENS
    debug_chat_template = QWEN_CHAT_TEMPLATE
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

    def chat_placeholder(self, loaded: LoadedModel, kind: str) -> str:
        """The chat template writes ``<|vision_start|><|image_pad|><|vision_end|>``; the block holds all three."""
        tok, cfg = loaded.tokenizer, loaded.model.config
        pad = cfg.image_token_id if kind == "image" else cfg.video_token_id
        return "".join(tok.convert_ids_to_tokens([cfg.vision_start_token_id, pad, cfg.vision_end_token_id]))

    # -- video
    def video_settings(self, loaded: LoadedModel) -> dict:
        """Patch/merge sizes of the image processor, and the checkpoint's video size and mean/std."""
        ip = loaded.image_processor
        out = {"patch": ip.patch_size, "merge": ip.merge_size, "tps": ip.temporal_patch_size,
               "min_pixels": ip.size["shortest_edge"], "max_pixels": ip.size["longest_edge"],
               "mean": list(ip.image_mean), "std": list(ip.image_std)}
        vfile = Path(loaded.info.path) / "video_preprocessor_config.json" if loaded.info.path else None
        if vfile is not None and vfile.is_file():
            v = json.loads(vfile.read_text())
            size = v.get("size") or {}
            out.update(min_pixels=v.get("min_pixels") or size.get("shortest_edge", out["min_pixels"]),
                       max_pixels=v.get("max_pixels") or size.get("longest_edge", out["max_pixels"]),
                       mean=v.get("image_mean", out["mean"]), std=v.get("image_std", out["std"]),
                       tps=v.get("temporal_patch_size", out["tps"]))
        return out

    def video_frame_size(self, n_frames: int, height: int, width: int, vs: dict) -> tuple[int, int]:
        """(height, width) every frame is resized to: Qwen2-VL's per-frame ``smart_resize``."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        return smart_resize(height, width, factor=vs["patch"] * vs["merge"], min_pixels=vs["min_pixels"],
                            max_pixels=vs["max_pixels"])

    def video_inputs(self, loaded: LoadedModel, videos: list[Video]):
        from PIL import Image

        vs = self.video_settings(loaded)
        tps, P = vs["tps"], vs["patch"]
        pixels, grids = [], []
        for v in videos:
            frames = [f.convert("RGB") for f in v.frames]
            h, w = self.video_frame_size(len(frames), frames[0].height, frames[0].width, vs)
            frames += frames[-1:] * (-len(frames) % tps)
            frames = [f.resize((w, h), Image.BICUBIC) for f in frames]
            out = loaded.image_processor(images=frames, do_resize=False, temporal_patch_size=1, image_mean=vs["mean"],
                                         image_std=vs["std"], return_tensors="pt")
            F, G = len(frames), len(frames) // tps
            x = out["pixel_values"].view(G, tps, -1, 3, P * P)  # (G, tps, N, C, P*P): frames in order
            pixels.append(x.permute(0, 2, 3, 1, 4).reshape(G * x.shape[2], 3 * tps * P * P))
            grids.append([G, h // P, w // P])
        grid = torch.tensor(grids, dtype=torch.long)
        counts = [int(g.prod()) // vs["merge"] ** 2 for g in grid]
        inputs = {"pixel_values_videos": torch.cat(pixels).to(loaded.dtype), "video_grid_thw": grid}
        return inputs | self.video_time_inputs(videos, tps), counts

    def video_time_inputs(self, videos: list[Video], tps: int) -> dict[str, torch.Tensor]:
        """Qwen2.5-VL's ``second_per_grid_ts`` (seconds per temporal patch: tps / fps, as its processor)."""
        return {"second_per_grid_ts": torch.tensor([tps / video_fps(v) for v in videos])}

    def video_block(self, loaded: LoadedModel, video: Video, n_tokens: int) -> tuple[list[int], list[int]]:
        cfg = loaded.model.config
        first = self.patch_first_frames(video, self.video_settings(loaded)["tps"])
        per = n_tokens // len(first)
        frames = [f for f in first for _ in range(per)]
        return ([cfg.vision_start_token_id] + [cfg.video_token_id] * n_tokens + [cfg.vision_end_token_id],
                [-1] + frames + [-1])

    @staticmethod
    def patch_first_frames(video: Video, tps: int) -> list[int]:
        """First frame of each temporal patch (the padding repeats the last frame, never starts a patch)."""
        return list(range(0, len(video.frames), tps))


def video_fps(video: Video) -> float:
    """Frames per second of a sampled video: as given, else from its timestamps, else 2 (transformers' default)."""
    if video.fps:
        return float(video.fps)
    ts = video.timestamps
    return (len(ts) - 1) / (ts[-1] - ts[0]) if len(ts) > 1 and ts[-1] > ts[0] else 2.0
