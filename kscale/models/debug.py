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

def build_tokenizer(family: str):
    """A PreTrainedTokenizerFast over a WordLevel vocabulary with the family's special tokens
    (``Adapter.debug_tokens``: the special tokens first, in order, then the words and the family's ``words``)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from kscale.models.registry import get_adapter

    spec = dict(get_adapter(family).debug_tokens)
    special = spec.pop("special")
    extra = set(spec.pop("words", ()))  # a family's own plain words (Qwen3-VL's "<1.5 seconds>")
    vocab = {t: i for i, t in enumerate(special + ["[UNK]"])}
    for w in sorted({w.strip() for w in WORDS if w.strip()} | {"0", "1", "2", "3", "4", "5", "6", "7", "8", "9"}
                    | extra):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", **spec)
    fast.padding_side = "right"
    return fast


def build_debug_model(family: str, out_dir: str | os.PathLike, seed: int = 0, chat_template: bool = False) -> str:
    """Save a tiny random ``family`` model, tokenizer and image processor to ``out_dir``; return it.
    ``chat_template``: give the tokenizer the family's ``debug_chat_template`` (a real checkpoint's Jinja), so
    the model is loaded with a native prompt (:mod:`kscale.models.prompts`)."""
    import torch

    if family not in FAMILIES:
        raise ValueError(f"unknown debug model family {family!r} (choose from {', '.join(FAMILIES)})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(family)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        from kscale.models.registry import get_adapter

        model, proc = get_adapter(family).debug_model(tokenizer)
    model.save_pretrained(out)
    if chat_template:
        tmpl = get_adapter(family).debug_chat_template
        if tmpl is None:
            raise ValueError(f"family {family!r} has no debug chat template")
        tokenizer.chat_template = tmpl
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
