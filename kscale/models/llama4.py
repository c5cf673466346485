"""Llama 4: a tiled vision tower (pixel shuffle to a quarter of the patches), a MoE language model whose
RoPE layers rotate adjacent pairs (complex ``freqs_cis``), L2-normalise queries and keys after RoPE
(``use_qk_norm``) and attend in chunks, and whose NoPE layers (``no_rope_layers[i] == 0``) use no RoPE.

**Pixels without torchvision.** transformers' only Llama 4 image processor (``Llama4ImageProcessor``, the
torchvision backend) imports torchvision, which has no CPU build here. :class:`Llama4Pixels` is kscale's own
copy of its steps, read from the checkpoint's ``preprocessor_config.json``: the canvas of at most
``max_patches`` tiles of ``size`` that needs the least scaling (:func:`best_canvas`; transformers'
``get_best_fit``), an aspect-preserving resize to it (never upscaling past one tile), bilinear with
antialias as torchvision resizes a uint8 tensor (torch's own ``interpolate``, PIL's algorithm),
zero padding right and bottom, rescale and normalise in bfloat16, the split into tiles row by row, and
when there are several tiles a global tile (the whole image resized to one tile) last.
``tests/unit/test_families_llama4.py`` checks each step against transformers' own functions that do not
need torchvision and the whole against PIL's resize and the model.

**Tokens** (``Llama4Processor._prompt_split_image``): ``<|image_start|>``, then for a tiled image each row
of tiles as ``<|patch|>``*n per tile with ``<|tile_x_separator|>`` between tiles and
``<|tile_y_separator|>`` after the row, then ``<|image|>`` and the global tile's n ``<|patch|>``, then
``<|image_end|>``. The model fills the ``<|patch|>`` positions (``config.image_token_id``) with image
features: those are ``image``, every other token of the block ``special``. (The processor's own
``mm_token_type_ids`` marks ``<|image|>``, its ``image_token``, not the patches.)

**Keys.** On a RoPE layer with QK-norm the KV cache holds ``l2norm(rope(k_proj))``. The L2 norm (no weight)
commutes with the rotation (which keeps each pair's norm), so kscale stores ``l2norm(k_proj)`` per head
(:func:`_normed_tap`: an identity ``kscale_k_tap`` fed by a hook on ``k_proj``) and the reader's RoPE
rebuilds the cache. NoPE layers and layers without the norm store ``k_proj``; NoPE layers' post-RoPE keys
equal the stored keys (``kscale.models.rope.NoRope``). :meth:`Llama4Adapter.model_facts` records which
layers are which in the store.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kscale.models.registry import IMAGE, SPECIAL, Adapter, LoadedModel, ModelOptions, register

BOI, EOI, IMG, PATCH = "<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>"
TILE_X, TILE_Y = "<|tile_x_separator|>", "<|tile_y_separator|>"


# -- pixels: kscale's own Llama4ImageProcessor

def supported_canvases(max_tiles: int, tile: int) -> list[tuple[int, int]]:
    """(height, width) of every canvas of at most ``max_tiles`` tiles, in transformers' order
    (``find_supported_resolutions``: grouped by aspect ratio, first seen first; the order breaks ties)."""
    by_ratio: dict[float, list[tuple[int, int]]] = defaultdict(list)
    for n in range(max_tiles, 0, -1):
        for rows in sorted(d for d in range(1, n + 1) if n % d == 0):
            by_ratio[rows / (n // rows)].append((rows, n // rows))
    return [(r * tile, c * tile) for group in by_ratio.values() for r, c in group]


def best_canvas(size_hw: tuple[int, int], canvases: list[tuple[int, int]], to_max: bool = False) -> tuple[int, int]:
    """The canvas an image is resized onto (``get_best_fit``): the least upscaling if any canvas upscales
    (the most with ``to_max``), else the least downscaling; among equals the smallest area. Scales in float32,
    as transformers computes them."""
    h, w = size_hw
    cand = np.asarray(canvases, dtype=np.int64)
    scales = np.minimum(cand[:, 0].astype(np.float32) / np.float32(h), cand[:, 1].astype(np.float32) / np.float32(w))
    up = scales[scales >= 1]
    pick = (up.max() if to_max else up.min()) if len(up) else scales[scales < 1].max()
    chosen = cand[scales == pick]
    r, c = chosen[int(np.argmin(chosen[:, 0] * chosen[:, 1]))]
    return int(r), int(c)


def fit_without_distortion(size_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[int, int]:
    """The largest size of the image's aspect ratio inside ``target_hw`` (``get_max_res_without_distortion``)."""
    (h, w), (th, tw) = size_hw, target_hw
    scale_w, scale_h = tw / w, th / h
    if scale_w < scale_h:
        return min(math.floor(h * scale_w), th), tw
    return th, min(math.floor(w * scale_h), tw)


@dataclass(frozen=True)
class Llama4Pixels:
    """What ``Llama4ImageProcessor`` reads from ``preprocessor_config.json``, and its steps (see the module
    docstring). Only what real checkpoints use is accepted: bilinear resampling, rescale and normalise on."""

    size: dict = field(default_factory=lambda: {"height": 336, "width": 336})
    max_patches: int = 16
    image_mean: list = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list = field(default_factory=lambda: [0.5, 0.5, 0.5])
    rescale_factor: float = 1 / 255
    resize_to_max_canvas: bool = False
    resample: int = 2  # PIL.Image.BILINEAR
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True

    CONFIG = "preprocessor_config.json"

    def __post_init__(self):
        problems = [f"{k}: {getattr(self, k)!r} (kscale's Llama 4 pixels need {v!r})"
                    for k, v in (("resample", 2), ("do_resize", True), ("do_rescale", True),
                                 ("do_normalize", True), ("do_convert_rgb", True)) if getattr(self, k) != v]
        if self.size.get("height") != self.size.get("width"):
            problems.append(f"size: {self.size!r} (tiles are square)")
        if problems:
            raise ValueError(f"{self.CONFIG}: " + "; ".join(problems))

    @property
    def tile(self) -> int:
        return int(self.size["height"])

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> "Llama4Pixels":
        """The checkpoint's settings (keys kscale does not read, such as ``image_processor_type``, are ignored)."""
        raw = json.loads((Path(path) / cls.CONFIG).read_text())
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in {**raw, **overrides}.items() if k in names})

    def to_dict(self) -> dict:
        return {**asdict(self), "image_processor_type": "Llama4ImageProcessor", "processor_class": "Llama4Processor",
                "kscale_pixels": "kscale.models.llama4.Llama4Pixels (no torchvision)"}

    def save_pretrained(self, path: str | Path) -> None:
        Path(path, self.CONFIG).write_text(json.dumps(self.to_dict(), indent=2))

    def layout(self, size_hw: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """(canvas (H, W), resized image (h, w)) for an image of ``size_hw``."""
        canvas = best_canvas(size_hw, supported_canvases(self.max_patches, self.tile), self.resize_to_max_canvas)
        target = canvas
        if not self.resize_to_max_canvas:  # upscale at most to one tile's side
            target = (min(max(size_hw[0], self.tile), canvas[0]), min(max(size_hw[1], self.tile), canvas[1]))
        h, w = fit_without_distortion(size_hw, target)
        return canvas, (max(h, 1), max(w, 1))

    @staticmethod
    def resize(img_CHW: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
        """Bilinear with antialias of a uint8 image, as torchvision's tensor ``resize`` does: unchanged at its
        own size; on a CPU whose capability is AVX2 torch's native uint8 kernel, elsewhere (AVX512, GPU) in
        float32, rounded back to uint8. Both are PIL's algorithm (checked against PIL in the tests)."""
        if tuple(img_CHW.shape[-2:]) == tuple(size_hw):
            return img_CHW
        native = img_CHW.device.type == "cpu" and "AVX2" in torch.backends.cpu.get_cpu_capability()
        x = img_CHW[None] if native else img_CHW[None].float()
        out = torch.nn.functional.interpolate(x, size=list(size_hw), mode="bilinear", align_corners=False,
                                              antialias=True)
        return (out if native else out.round_().to(torch.uint8))[0]

    def normalize(self, img_CHW: torch.Tensor) -> torch.Tensor:
        """Rescale then normalise in bfloat16, as the original implementation (and transformers) does."""
        x = img_CHW.to(torch.bfloat16) * self.rescale_factor
        mean = torch.as_tensor(self.image_mean, dtype=x.dtype).view(-1, 1, 1)
        std = torch.as_tensor(self.image_std, dtype=x.dtype).view(-1, 1, 1)
        return x.sub(mean).div_(std)

    def tiles(self, image: Any) -> tuple[torch.Tensor, tuple[int, int]]:
        """(tiles (N, 3, tile, tile) bfloat16, (rows, columns)) of one PIL image: the canvas's tiles row by row,
        then the global tile when there are several."""
        from transformers.image_transforms import convert_to_rgb  # no torchvision

        img_CHW = torch.from_numpy(convert_to_rgb(image, return_numpy=True)).permute(2, 0, 1).contiguous()
        (H, W), (h, w) = self.layout(tuple(img_CHW.shape[-2:]))
        canvas = torch.nn.functional.pad(self.resize(img_CHW, (h, w)), (0, W - w, 0, H - h), value=0)
        t = self.tile
        rows, cols = H // t, W // t
        out = self.normalize(canvas).view(3, rows, t, cols, t).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, t, t)
        if rows * cols > 1:
            out = torch.cat([out, self.normalize(self.resize(img_CHW, (t, t)))[None]])
        return out, (rows, cols)

    def __call__(self, images: list) -> dict:
        """``pixel_values`` (all images' tiles, concatenated) and ``aspect_ratios`` (rows, columns) per image:
        the keys ``Llama4Processor`` reads."""
        outs = [self.tiles(im) for im in images]
        return {"pixel_values": torch.cat([o[0] for o in outs]),
                "aspect_ratios": torch.tensor([o[1] for o in outs], dtype=torch.long)}


# -- keys: QK-normed layers through a tap

def _normed_tap(attn: torch.nn.Module, which: str) -> torch.nn.Module:
    """The identity module that sees ``attn.qk_norm(<which>_proj output)`` per head as (B, T, H*D).

    The hook sits on the projection the attention module holds now; a projection replaced later (MaLoRA wraps
    ``k_proj``) gets its own hook at the next call and the old one goes quiet, so the tap always sees the
    projection the model runs."""
    name = f"kscale_{which}_tap"
    if not hasattr(attn, name):
        attn.add_module(name, torch.nn.Identity())
    tap = getattr(attn, name)
    proj = getattr(attn, f"{which}_proj")
    if not getattr(proj, "_kscale_tap_hooked", False):
        def forward_to_tap(mod, _inp, out_BTF):
            # someone listens (or a graph is being built: activation checkpointing's recomputation must save
            # what the forward saved, listeners or not), and this is the projection the attention runs
            listens = tap._forward_hooks or torch.is_grad_enabled()
            if listens and getattr(attn, f"{which}_proj") is mod:
                B, T, _ = out_BTF.shape
                tap(attn.qk_norm(out_BTF.view(B, T, -1, attn.head_dim)).flatten(2))
        proj.register_forward_hook(forward_to_tap)
        proj._kscale_tap_hooked = True
    return tap


def _fill_image_outputs(model: torch.nn.Module) -> None:
    """transformers 5.23's ``Llama4ForConditionalGeneration.forward`` reads ``outputs.image_outputs`` from its
    language model's output, which has no such field (AttributeError on every ``return_dict`` forward). A hook
    on the language model gives its output that attribute (None), so the forward completes unchanged."""
    def fill(_mod, _args, out):
        if not hasattr(out, "image_outputs") and hasattr(out, "logits"):
            out.image_outputs = None
    if not getattr(model.language_model, "_kscale_image_outputs", False):
        model.language_model.register_forward_hook(fill)
        model.language_model._kscale_image_outputs = True


def _key_source(text: dict, layer: int) -> str:
    rope = bool(text["no_rope_layers"][layer])
    return "l2norm(k_proj)" if rope and text.get("use_qk_norm", True) else "k_proj"


@register
class Llama4Adapter(Adapter):
    family = "llama4"
    model_class = "Llama4ForConditionalGeneration"
    # queries and attention statistics are not offered in extraction: RoPE layers attend in chunks and NoPE
    # layers scale queries by position past floor_scale tokens, which kscale's statistics do not model
    supports = ("keys", "train", "bias")
    default_template = ("<|begin_of_text|><|header_start|>user<|header_end|>\n\n{image}{text}<|eot|>"
                        "<|header_start|>assistant<|header_end|>\n\n")
    debug_tokens = {"special": ["<|finetune_right_pad_id|>", "<|begin_of_text|>", "<|end_of_text|>",
                                "<|header_start|>", "<|header_end|>", "<|eot|>", BOI, EOI, IMG, PATCH,
                                TILE_X, TILE_Y],
                    "pad_token": "<|finetune_right_pad_id|>", "bos_token": "<|begin_of_text|>",
                    "eos_token": "<|eot|>",
                    "additional_special_tokens": ["<|header_start|>", "<|header_end|>", "<|eot|>", BOI, EOI, IMG,
                                                  PATCH, TILE_X, TILE_Y]}

    def debug_model(self, tokenizer):
        from transformers import Llama4Config, Llama4ForConditionalGeneration, Llama4TextConfig, Llama4VisionConfig

        ids = tokenizer.convert_tokens_to_ids
        text = Llama4TextConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, intermediate_size_mlp=128,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            num_local_experts=4, num_experts_per_tok=1, moe_layers=[1, 3],
            no_rope_layers=[1, 1, 0, 1],  # layer 2 is a NoPE layer (full attention, no QK-norm)
            attention_chunk_size=8,  # RoPE layers attend within chunks of 8 tokens
            use_qk_norm=True, max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        vision = Llama4VisionConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=28, patch_size=7, pixel_shuffle_ratio=0.5, vision_output_dim=32,
                                    projector_input_dim=32, projector_output_dim=32)
        cfg = Llama4Config(text_config=text, vision_config=vision, image_token_index=ids(PATCH),
                           boi_token_index=ids(BOI), eoi_token_index=ids(EOI))
        return Llama4ForConditionalGeneration(cfg), Llama4Pixels(size={"height": 28, "width": 28}, max_patches=4)

    def load(self, *args: Any, **kwargs: Any) -> LoadedModel:
        loaded = super().load(*args, **kwargs)
        _fill_image_outputs(loaded.model)
        return loaded

    def load_image_processor(self, path: str, common: dict, mspec: ModelOptions) -> Any:
        return Llama4Pixels.from_pretrained(path)

    def model_facts(self, config: dict) -> dict:
        text = config.get("text_config") or config
        n = text["num_hidden_layers"]
        return {"no_rope_layers": [i for i in range(n) if not text["no_rope_layers"][i]],
                "key_source": [_key_source(text, i) for i in range(n)],
                "moe_layers": list(text.get("moe_layers") or [])}

    # -- module locations: the language model is a Llama4ForCausalLM
    def decoder_layers(self, model) -> list[torch.nn.Module]:
        return list(model.language_model.model.layers)

    def rotary_module(self, model) -> torch.nn.Module:
        return model.language_model.model.rotary_emb

    def key_modules(self, model) -> list[torch.nn.Module]:
        return [_normed_tap(layer.self_attn, "k") if hasattr(layer.self_attn, "qk_norm") else layer.self_attn.k_proj
                for layer in self.decoder_layers(model)]

    def query_modules(self, model) -> list[torch.nn.Module]:
        return [_normed_tap(layer.self_attn, "q") if hasattr(layer.self_attn, "qk_norm") else layer.self_attn.q_proj
                for layer in self.decoder_layers(model)]

    def value_modules(self, model) -> list[torch.nn.Module]:
        return [layer.self_attn.v_proj for layer in self.decoder_layers(model)]

    def image_features(self, model, inputs: dict[str, torch.Tensor]) -> Any:
        return model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)

    # -- tokens
    def image_token_id(self, config) -> int:
        return config.image_token_id  # <|patch|>: the positions the model fills with image features

    def chat_placeholder(self, loaded: LoadedModel, kind: str) -> str:
        """The released chat template writes ``<|image|>`` per image (``Llama4Processor``'s ``image_token``,
        which it expands into the whole block); ``config.image_token_id`` is ``<|patch|>``, inside the block."""
        return IMG

    def wrapper_ids(self, config) -> set[int]:
        return {config.boi_token_id, config.eoi_token_id}

    @staticmethod
    def tokens_per_tile(config) -> int:
        """``Llama4Processor``'s ``num_patches_per_chunk``: patches of a tile over the pixel-shuffle factor."""
        v = config.vision_config
        return (v.image_size // v.patch_size) ** 2 // int(round(1.0 / v.pixel_shuffle_ratio ** 2))

    def image_inputs(self, loaded: LoadedModel, images: list):
        out = loaded.image_processor(images)
        return {"pixel_values": out["pixel_values"].to(loaded.dtype)}, [tuple(r) for r in out["aspect_ratios"].tolist()]

    def image_block(self, loaded: LoadedModel, n_tokens: Any) -> tuple[list[int], list[int]]:
        rows, cols = n_tokens
        tok, cfg = loaded.tokenizer, loaded.model.config
        boi, eoi, img, patch, tx, ty = tok.convert_tokens_to_ids([BOI, EOI, IMG, PATCH, TILE_X, TILE_Y])
        if patch != cfg.image_token_id:
            raise ValueError(f"tokenizer's {PATCH} is id {patch}, the model's image_token_id {cfg.image_token_id}")
        n = self.tokens_per_tile(cfg)
        ids = [boi]
        if rows * cols > 1:
            for _ in range(rows):
                for c in range(cols):
                    ids += [patch] * n + ([tx] if c < cols - 1 else [])
                ids.append(ty)
        ids += [img] + [patch] * n + [eoi]
        return ids, [IMAGE if i == patch else SPECIAL for i in ids]
