"""A tiny random Qwen2.5-VL built in memory, and raw batches for it: the MaLoRA layer/model tests' fixture.

A 2-layer, 64-wide text model with a 2-block vision tower (one 56x56 image -> 4 image tokens), a
word-level tokenizer and the PIL image processor, driven with hand-made ``input_ids`` (no chat template,
no kscale adapter) so the MaLoRA tests see the bare Hugging Face model. Tests that go through kscale's
loading path use the registered debug model instead (``kscale.models.debug``, the ``loaded_qwen`` fixture).

Legend: B batch, T tokens, N image tokens per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 120, 121, 122, 123
PAD, BOS, EOS = 0, 1, 2
IMAGE_SIDE = 56

WORDS = (
    "what color is the shape ? where which side of image it red green blue yellow white black "
    "left right top bottom square circle describe answer a an this picture in on"
).split()


@dataclass
class TinyVLM:
    model: Any
    image_processor: Any
    tokenizer: Any

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)


def tiny_qwen_config(hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, vocab: int = 128) -> Any:
    from transformers import Qwen2_5_VLConfig

    head_dim = hidden // heads
    half = head_dim // 2  # mrope sections (t, h, w) cover half the head dim, in Qwen's 16:24:24 ratio
    section = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
            bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
            fullatt_block_indexes=[1], window_size=IMAGE_SIDE, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
    )


def tiny_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": 3}
    vocab.update({w: 4 + i for i, w in enumerate(WORDS)})
    vocab.update({"<|image_pad|>": IMAGE_TOKEN, "<|video_pad|>": VIDEO_TOKEN,
                  "<|vision_start|>": VISION_START, "<|vision_end|>": VISION_END})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def tiny_image_processor() -> Any:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    side = IMAGE_SIDE * IMAGE_SIDE
    return Qwen2VLImageProcessorPil(min_pixels=side, max_pixels=side)


def tiny_qwen(seed: int = 0, **config_kwargs: Any) -> TinyVLM:
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_qwen_config(**config_kwargs))
    model.config.use_cache = False
    return TinyVLM(model=model.eval(), image_processor=tiny_image_processor(), tokenizer=tiny_tokenizer())


def tiny_batch(tiny: TinyVLM, with_image: list[bool], seed: int = 0, text_len: int = 6) -> dict[str, torch.Tensor]:
    """Random-token sequences, each optionally led by one random image; right-padded; labels on the text."""
    g = torch.Generator().manual_seed(seed)
    rows, images = [], []
    for has_image in with_image:
        ids = [BOS]
        if has_image:
            pixels = torch.randint(0, 255, (IMAGE_SIDE, IMAGE_SIDE, 3), generator=g, dtype=torch.uint8)
            images.append(Image.fromarray(pixels.numpy()))
            ids += [VISION_START] + [IMAGE_TOKEN] * tokens_per_image() + [VISION_END]
        ids += torch.randint(4, 4 + len(WORDS), (text_len,), generator=g).tolist() + [EOS]
        rows.append(ids)
    T = max(map(len, rows))
    input_ids_BT = torch.full((len(rows), T), PAD)
    attention_BT = torch.zeros((len(rows), T), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids_BT[i, : len(ids)] = torch.tensor(ids)
        attention_BT[i, : len(ids)] = 1
    labels_BT = torch.where((attention_BT == 1) & (input_ids_BT >= 4) & (input_ids_BT < IMAGE_TOKEN), input_ids_BT, -100)
    batch = {"input_ids": input_ids_BT, "attention_mask": attention_BT, "labels": labels_BT,
             "mm_token_type_ids": (input_ids_BT == IMAGE_TOKEN).int()}
    if images:
        batch.update(tiny.image_processor(images=images, return_tensors="pt"))
    return batch


def tokens_per_image() -> int:
    return (IMAGE_SIDE // 14) ** 2 // 4
