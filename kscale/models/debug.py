"""Tiny random models with tokenizers built in code, saved like real checkpoints.

``build_debug_model(family, out_dir)`` writes config, safetensors weights, a WordLevel tokenizer and the
image processor's config into ``out_dir``; the rest of kscale then loads it with the same
``from_pretrained`` path it uses for a real checkpoint, so the demo and the tests run the real code.
``debug:<family>`` model paths resolve to a cached copy (``debug_model_dir``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kscale.models.facts import FAMILIES
DEBUG_VERSION = "1"  # bump when the tiny architectures change, so caches rebuild

# Words of the generated dataset (kscale.data.generated) plus a few common ones; anything else is [UNK].
WORDS = (
    "a an the of in on at to is are what which where how many color colour shape image picture photo "
    "this there and or with left right top bottom middle center centre one two three four five six "
    "red green blue yellow purple orange white black gray grey circle square triangle cross star "
    "small large big shown answer question describe says text caption word only single "
    "user assistant system you see it its please : ? . , ! \n"
).split(" ")

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
LLAVA_SPECIAL = ["<pad>", "<s>", "</s>", "<image>"]


def build_tokenizer(family: str):
    """A PreTrainedTokenizerFast over a WordLevel vocabulary with the family's special tokens."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = QWEN_SPECIAL if family == "qwen2_5_vl" else LLAVA_SPECIAL
    vocab = {t: i for i, t in enumerate(special + ["[UNK]"])}
    for w in sorted({w.strip() for w in WORDS if w.strip()} | {"0", "1", "2", "3", "4", "5", "6", "7", "8", "9"}):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    if family == "qwen2_5_vl":
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<|endoftext|>",
                                       eos_token="<|im_end|>", additional_special_tokens=QWEN_SPECIAL[1:])
    else:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<pad>",
                                       bos_token="<s>", eos_token="</s>", additional_special_tokens=["<image>"])
    fast.padding_side = "right"
    return fast


def _qwen(tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                         bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    proc = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2,
                                    temporal_patch_size=2)
    return model, proc


def _llava(tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_id = tokenizer.convert_tokens_to_ids("<image>")
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=56, patch_size=14, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        image_token_index=image_id, vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(cfg)
    proc = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    return model, proc


def build_debug_model(family: str, out_dir: str | os.PathLike, seed: int = 0) -> str:
    """Save a tiny random ``family`` model, tokenizer and image processor to ``out_dir``; return it."""
    import torch

    if family not in FAMILIES:
        raise ValueError(f"unknown debug model family {family!r} (choose from {', '.join(FAMILIES)})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(family)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model, proc = _qwen(tokenizer) if family == "qwen2_5_vl" else _llava(tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    proc.save_pretrained(out)
    (out / "kscale_debug.json").write_text(json.dumps({"family": family, "version": DEBUG_VERSION, "seed": seed}))
    return str(out)


def debug_model_dir(family: str, cache_dir: str | os.PathLike | None = None) -> str:
    """Directory of the cached ``debug:<family>`` model, building it on first use (atomic rename)."""
    root = Path(cache_dir or os.environ.get("KSCALE_CACHE", Path.home() / ".cache" / "kscale")) / "debug"
    final = root / f"{family}-v{DEBUG_VERSION}"
    if (final / "kscale_debug.json").exists():
        return str(final)
    tmp = root / f".{family}-tmp-{os.getpid()}"
    build_debug_model(family, tmp)
    try:
        os.replace(tmp, final)
    except OSError:  # another process won the race; its copy is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return str(final)
