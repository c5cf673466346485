"""kscale's model inputs against transformers' own processors, built from the saved debug checkpoints.

Every key reference elsewhere runs on inputs from kscale's ``build_batch`` (its template, its placeholder
expansion, its token count per image). Here the same samples go through ``Qwen2_5_VLProcessor`` and
``LlavaProcessor``, which expand the image placeholder themselves, at several image sizes and aspect
ratios, including images that the processor's min/max pixel bounds scale up or down, and bounds set in
the spec. ``input_ids``, ``attention_mask``, ``pixel_values``, ``image_grid_thw`` / ``mm_token_type_ids``
and the number of image tokens must be identical.

There is no CPU torchvision, so ``Qwen2VLVideoProcessor`` cannot be built and ``Qwen2_5_VLProcessor``
refuses ``video_processor=None`` (see NOTES.md): :class:`_ImageOnlyQwenProcessor` drops the video
attribute and runs the processor's own ``__call__`` otherwise unchanged (it skips videos when the
attribute is absent).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kscale.models import load_model
from kscale.spec import ModelSpec

TEXT = "what color is the square ?"
# (width, height): square at the debug processor's max area, wide, tall, odd sizes, below min, above max
SIZES = [(112, 112), (200, 90), (90, 200), (57, 83), (30, 20), (640, 480), (28, 300)]
DEBUG_MIN, DEBUG_MAX = 56 * 56, 112 * 112  # the debug checkpoint's preprocessor_config.json


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng([w, h, seed])
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _qwen_processor(path: str, **image_kwargs):
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class _ImageOnlyQwenProcessor(Qwen2_5_VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return _ImageOnlyQwenProcessor(image_processor=AutoImageProcessor.from_pretrained(path, **image_kwargs),
                                   tokenizer=AutoTokenizer.from_pretrained(path))


def _llava_processor(path: str, config):
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaProcessor

    return LlavaProcessor(image_processor=AutoImageProcessor.from_pretrained(path),
                          tokenizer=AutoTokenizer.from_pretrained(path), patch_size=config.vision_config.patch_size,
                          vision_feature_select_strategy=config.vision_feature_select_strategy,
                          num_additional_image_tokens=1)  # CLIP's class token


QWEN_PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{text}<|im_end|>\n<|im_start|>assistant\n"
LLAVA_PROMPT = "USER: <image>\n{text} ASSISTANT:"


def _load(path: str, **model):
    return load_model(ModelSpec(path=path, device="cpu", dtype="float32", **model))


def _assert_same(ours: dict, theirs, keys: tuple[str, ...]) -> None:
    for k in keys:
        assert ours[k].shape == theirs[k].shape, (k, ours[k].shape, theirs[k].shape)
        assert torch.equal(ours[k].to(theirs[k].dtype), theirs[k]), k


def _qwen_expected(w: int, h: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(image tokens, resized area) by Qwen2-VL's published rule (transformers' ``smart_resize``): sides
    rounded to multiples of 28 and scaled into [min_pixels, max_pixels] (each side at least 28); one
    token per 28 x 28 after the 2 x 2 merge."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    rh, rw = smart_resize(h, w, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)
    return rh * rw // (28 * 28), rh * rw


@pytest.mark.parametrize("bounds", [{}, {"min_pixels": 112 * 112, "max_pixels": 168 * 168},
                                    {"min_pixels": 28 * 28, "max_pixels": 56 * 56}],
                         ids=["checkpoint", "spec-raises-both", "spec-lowers-both"])
def test_qwen_inputs_equal_transformers_processor(qwen_dir, bounds) -> None:
    lm = _load(qwen_dir, **bounds)
    proc = _qwen_processor(qwen_dir, **bounds)
    lo, hi = bounds.get("min_pixels", DEBUG_MIN), bounds.get("max_pixels", DEBUG_MAX)
    clamped = set()
    for w, h in SIZES:
        img = _image(w, h)
        ours = lm.adapter.build_batch(lm, [img], [TEXT])
        theirs = proc(images=[img], text=[QWEN_PROMPT.format(text=TEXT)], return_tensors="pt")
        _assert_same(ours.inputs, theirs, ("input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                                           "mm_token_type_ids"))
        n = int((theirs["input_ids"] == proc.image_token_id).sum())
        expected, area = _qwen_expected(w, h, lo, hi)
        assert ours.n_image_tokens == [n] == [expected], (w, h)
        if w * h < lo:  # scaled up to the lower bound
            assert area >= lo
            clamped.add("up")
        if w * h > hi and min(w, h) >= 56:  # scaled down to the upper bound (sides of 28 and more)
            assert area <= hi
            clamped.add("down")
    assert clamped == {"up", "down"}  # both bounds were exercised


def test_qwen_batch_of_mixed_sizes_equals_transformers_processor(qwen_dir) -> None:
    """Two images of different sizes and text lengths in one right-padded batch."""
    lm = _load(qwen_dir)
    proc = _qwen_processor(qwen_dir)
    proc.tokenizer.padding_side = "right"
    images, texts = [_image(200, 90), _image(30, 20)], [TEXT, "and here , what shape is it ?"]
    ours = lm.adapter.build_batch(lm, images, texts)
    theirs = proc(images=images, text=[QWEN_PROMPT.format(text=t) for t in texts], padding=True,
                  return_tensors="pt")
    _assert_same(ours.inputs, theirs, ("input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                                       "mm_token_type_ids"))


def test_llava_inputs_equal_transformers_processor(llava_dir) -> None:
    path = llava_dir
    lm = _load(path)
    proc = _llava_processor(path, lm.model.config)
    v = lm.model.config.vision_config
    # Llama's tokenizer puts BOS in front itself; the debug WordLevel tokenizer does not, so give it one.
    tok = proc.tokenizer
    bos = "" if tok("x").input_ids[:1] == [tok.bos_token_id] else tok.bos_token
    for w, h in SIZES:
        img = _image(w, h)
        ours = lm.adapter.build_batch(lm, [img], [TEXT])
        theirs = proc(images=[img], text=[bos + LLAVA_PROMPT.format(text=TEXT)], return_tensors="pt")
        _assert_same(ours.inputs, theirs, ("input_ids", "attention_mask", "pixel_values"))
        n = int((theirs["input_ids"] == lm.model.config.image_token_id).sum())
        assert ours.n_image_tokens == [n] == [(v.image_size // v.patch_size) ** 2], (w, h)
