"""Qwen3-VL: Qwen2.5-VL's tokens and M-RoPE (interleaved), a 16-px-patch vision tower, and two facts
that change what a key is and where it comes from:

- **QK-norm**: the attention RMS-normalises keys per head after ``k_proj`` and before RoPE
  (``k_norm(k_proj(x))``); the pre-RoPE key kscale stores is that output (``key_modules`` hooks
  ``k_norm``, ``query_modules`` ``q_norm``), so rotating it gives the KV cache.
- **DeepStack**: features from intermediate vision layers (``vision_config.deepstack_visual_indexes``) are
  added to the visual tokens' hidden states after the first decoder layers, one per index
  (:meth:`deepstack_layers`). Keys of the layers after those see visual features injected mid-stack: the
  store records the layers, and ``kscale info`` and the report mark them.
"""

from __future__ import annotations

from kscale.models.inputs import Video
from kscale.models.qwen2_5_vl import Qwen2_5_VLAdapter
from kscale.models.registry import LoadedModel, register


@register
class Qwen3VLAdapter(Qwen2_5_VLAdapter):
    family = "qwen3_vl"
    model_class = "Qwen3VLForConditionalGeneration"
    rope_keys = ("image_grid_thw", "video_grid_thw")
    debug_patch = 16
    key_source = "k_norm"  # QK-norm: the key is k_norm(k_proj(x))
    debug_tokens = {**Qwen2_5_VLAdapter.debug_tokens, "words": ["<", ">", "seconds"]}
    tokens_revision = 2  # 2: no vision pair around a whole video (video_block)

    def debug_config(self, text: dict, ids: dict):
        from transformers import Qwen3VLConfig

        return Qwen3VLConfig(text_config=self.debug_text(text), vision_config=self.debug_vision(), **ids)

    @staticmethod
    def debug_text(text: dict) -> dict:
        rope = dict(text["rope_parameters"], mrope_interleaved=True)
        return dict(text, head_dim=16, rope_parameters=rope)

    @staticmethod
    def debug_vision() -> dict:
        return dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                    spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                    deepstack_visual_indexes=[0, 1])

    def key_modules(self, model):
        return [layer.self_attn.k_norm for layer in self.decoder_layers(model)]

    def query_modules(self, model):
        return [layer.self_attn.q_norm for layer in self.decoder_layers(model)]

    # -- video: one block per temporal patch, "<t seconds>" before it
    def video_time_inputs(self, videos, tps):
        return {}  # the timestamps are text in the sequence

    def video_frame_size(self, n_frames: int, height: int, width: int, vs: dict) -> tuple[int, int]:
        """Qwen3-VL's video ``smart_resize``: the pixel bounds hold for all frames together."""
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

        return smart_resize(n_frames, height, width, temporal_factor=vs["tps"], factor=vs["patch"] * vs["merge"],
                            min_pixels=vs["min_pixels"], max_pixels=vs["max_pixels"])

    def video_block(self, loaded: LoadedModel, video: Video, n_tokens: int) -> tuple[list[int], list[int]]:
        """The chat template's ``<|vision_start|><|video_pad|><|vision_end|>`` replaced whole, as
        ``Qwen3VLProcessor`` does: per temporal patch ``<t seconds>``, then ``<|vision_start|>``, the patch's
        tokens, ``<|vision_end|>``, and no outer wrapper around all patches (transformers 4.57 and >= 5.25,
        and Qwen's own processing; 5.0-5.24 kept the template's pair around the whole video, a regression that
        5.25 fixed). The time text carries its patch's frame."""
        cfg, tok = loaded.model.config, loaded.tokenizer
        vs_id, ve_id = cfg.vision_start_token_id, cfg.vision_end_token_id
        first = self.patch_first_frames(video, self.video_settings(loaded)["tps"])
        per = n_tokens // len(first)
        ids: list[int] = []
        frames: list[int] = []
        for f, t in zip(first, self.patch_times(video, len(first))):
            text = tok(f"<{t:.1f} seconds>", add_special_tokens=False).input_ids
            ids += text + [vs_id] + [cfg.video_token_id] * per + [ve_id]
            frames += [f] * len(text) + [-1] + [f] * per + [-1]
        return ids, frames

    @staticmethod
    def patch_times(video: Video, n_patches: int) -> list[float]:
        """Seconds shown before each temporal patch: the mean of its first and last frame's time
        (``Qwen3VLProcessor._calculate_timestamps``; the padding repeats the last frame)."""
        ts = list(video.timestamps)
        tps = -(-len(ts) // n_patches)
        ts += ts[-1:] * (n_patches * tps - len(ts))
        return [(ts[i] + ts[i + tps - 1]) / 2 for i in range(0, len(ts), tps)]

    def deepstack_layers(self, config: dict) -> list[int]:
        """Decoder layers whose output gets DeepStack visual features added (from the checkpoint's config
        dict): the model adds feature i after layer i, so keys of layers 1..n already carry them."""
        return list(range(len(config["vision_config"]["deepstack_visual_indexes"])))

    def model_facts(self, config: dict) -> dict:
        return {"deepstack_layers": self.deepstack_layers(config)}
