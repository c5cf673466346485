"""Native prompts on real tokenizer kinds: byte-level BPE (Qwen2, Llama 3/4), SentencePiece-style BPE (Gemma, Mistral).

``test_native_prompts.py`` renders chat templates with the debug models' WordLevel tokenizers, which split on
whitespace and never merge across a word. Released checkpoints ship byte-level BPE or SentencePiece-style
tokenizers, where a space belongs to the next word's token (``" red"``), newline runs are one token, text a
processor writes around an image block merges with the template's text next to it, and the tokenizer may add
BOS itself. Here each family gets such a tokenizer built in code: BPE trained on a small corpus of the
family's own chat text, with the family's special tokens as added tokens, wrapped in transformers' own
tokenizer class where it has one (``Qwen2Tokenizer``: NFC + Qwen's split regex + ByteLevel; ``GemmaTokenizer``:
``"▁"`` for spaces, no pre-split, byte fallback, newline runs as added tokens as in Gemma's tokenizer.json;
``LlamaTokenizer``: Mistral's SentencePiece kind; Llama 3's and Llama 4's byte-level BPE with their split regexes
and a BOS post-processor), and the released checkpoint's chat template (``chat_templates.py``, each cited where it
is defined). Families: every Qwen-VL, LLaVA-OneVision, LLaVA-NeXT, Idefics3, Gemma 3, InternVL, Llama 4, and
PaliGemma, which has no chat template (its processor's prefix/suffix rule is the reference). Samples: one image
and a question, with and without the answer, and two images with text between them named out of list order.
The tiny random model of the family is built around it and saved like a checkpoint, so ``load_model`` finds the
template and renders natively.

References kscale did not compute: transformers' ``processor.apply_chat_template(messages, tokenize=True)``
with the family's processor class built in code around the same tokenizer (token ids, pixels), the
processor's ``mm_token_type_ids`` (tags, as in ``test_families_other``), ``{% generation %}`` assistant masks
where the template has them (LLaVA-OneVision), and the tokenizer's own decoding of the answer tokens.
"""

from __future__ import annotations

import json

import pytest
import torch

from kscale.models import IMAGE, SPECIAL, TEXT, load_model
from kscale.models.inputs import Media, Sample, Turn
from kscale.models.registry import get_adapter
from kscale.spec import ModelSpec
from tests.unit.test_families_llama4 import _model_image_positions, _processor as _llama4_processor
from tests.unit.test_families_other import (_expected_tags, _gemma3_processor, _idefics3_processor,
                                            _internvl_processor, _llava_next_processor, _llava_onevision_processor,
                                            _newline_positions)
from tests.unit.test_families_qwen import family_processor
from tests.unit.chat_templates import (GEMMA3, IDEFICS3, LLAMA4, LLAVA_NEXT, INTERNVL, ONEVISION, QWEN2_VL, QWEN3_VL,
                                        QWEN25_VL)
from tests.unit.test_processors import _image

# -- tokenizers trained in code

QUESTIONS = ["is the circle red or blue ?", "what color is the square ?", "describe the image .",
             "how many stars are there ?", "which shape is on the left ?"]
ANSWERS = ["red", "blue circle", "a red circle on the left .", "two", "the square"]


def _corpus(chat: str) -> list[str]:
    """The family's chat text around questions and answers (so the template's words merge), many times."""
    lines = [chat.format(q=q, a=a) for q in QUESTIONS for a in ANSWERS]
    return (lines + QUESTIONS + ANSWERS) * 4


def _train(tk, corpus: list[str], special: list[str], byte_level: bool) -> tuple[dict, list]:
    """Train ``tk``'s BPE model in place; its vocabulary (special tokens first, in order) and merges."""
    from tokenizers import pre_tokenizers, trainers

    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if byte_level else [])
    tk.train_from_iterator(corpus, trainer)
    model = json.loads(tk.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return model["vocab"], merges


def _byte_level(regex: str):
    """An untrained byte-level BPE with the split regex GPT-style tokenizers use (NFC as Qwen2's)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tk = Tokenizer(models.BPE())
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    return tk


def _qwen2(special: list[str], chat: str, eos: str):
    """Qwen2's tokenizer (Qwen2.5-VL's and LLaVA-OneVision-Qwen2's): byte-level BPE, no BOS."""
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    vocab, merges = _train(_byte_level(PRETOKENIZE_REGEX), _corpus(chat), special, byte_level=True)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token=eos, pad_token="<|endoftext|>",
                         additional_special_tokens=special[1:])
    tok.padding_side = "right"
    return tok


# Llama 3's split regex (meta-llama/Meta-Llama-3-8B tokenizer.json): digits in runs of at most 3
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
IDEFICS_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<end_of_utterance>",
                   "<fake_token_around_image>", "<image>"]


def _llama3():
    """Idefics3-8B-Llama3's tokenizer kind: byte-level BPE that adds BOS itself (a TemplateProcessing
    post-processor, as Llama 3's tokenizer.json); the row/column markers and ``<global-img>`` are plain text."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tk = _byte_level(LLAMA3_REGEX)
    chat = "User:<image>{q}<end_of_utterance>\nAssistant: {a}<end_of_utterance>\n<row_1_col_2>\n\n<global-img>"
    _train(tk, _corpus(chat), IDEFICS_SPECIAL, byte_level=True)
    tk.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                      special_tokens=[("<|begin_of_text|>", 0)])])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                  pad_token="<|reserved_special_token_0|>",
                                  additional_special_tokens=["<end_of_utterance>", "<fake_token_around_image>",
                                                             "<image>"])
    tok.padding_side = "right"
    return tok


GEMMA_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
                 "<start_of_image>", "<end_of_image>", "<image_soft_token>"]


def _gemma():
    """Gemma 3's tokenizer kind (``GemmaTokenizer``): spaces become ``"▁"``, no pre-split (merges may cross
    words and newlines), byte fallback, BOS added by the tokenizer, EOS ``<eos>`` (a turn ends with
    ``<end_of_turn>``, a stop id of the generation config), newline runs as added tokens."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import GemmaTokenizer

    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Replace(" ", "▁")
    tk.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous")
    chat = "<start_of_turn>user\n\n\n<start_of_image>\n\n{q}<end_of_turn>\n<start_of_turn>model\n{a}<end_of_turn>\n"
    vocab, merges = _train(tk, _corpus(chat), GEMMA_SPECIAL, byte_level=False)
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tok = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, extra_special_tokens={
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})
    tok.add_tokens([AddedToken(t, special=True) for t in ("<start_of_turn>", "<end_of_turn>")], special_tokens=True)
    tok.add_tokens([AddedToken("\n" * k, normalized=False, special=False) for k in range(1, 9)])
    tok.padding_side = "right"
    return tok


def _llama_sp():
    """LLaVA-NeXT-Mistral's tokenizer kind (``LlamaTokenizer``: SentencePiece-style BPE, ``"▁"`` for spaces
    prepended to the first piece only, byte fallback, BOS added by the tokenizer), trained within words as
    SentencePiece does, with ``<image>`` (and ``<pad>``) added after the vocabulary as llava-hf does."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import LlamaTokenizer

    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    vocab, merges = _train(tk, _corpus("[INST] <image>\n{q} [/INST] {a}</s> "), ["<unk>", "<s>", "</s>"],
                           byte_level=False)
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tok = LlamaTokenizer(vocab=vocab, merges=merges, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                         add_bos_token=True, legacy=False)
    tok.add_special_tokens({"pad_token": AddedToken("<pad>", special=True, normalized=False),
                            "additional_special_tokens": [AddedToken("<image>", special=True, normalized=False)]})
    tok.padding_side = "right"
    return tok


def _internvl():
    """InternVL3-hf's tokenizer (Qwen2.5-VL's, with ``<img>``, ``</img>``, ``<IMG_CONTEXT>`` added special and
    named, ``convert_internvl_weights_to_hf.write_tokenizer``)."""
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
    chat = "<|im_start|>user\n<img><IMG_CONTEXT></img>\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n"
    vocab, merges = _train(_byte_level(PRETOKENIZE_REGEX), _corpus(chat), special, byte_level=True)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         additional_special_tokens=special[1:3],
                         extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                                               "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    tok.padding_side = "right"
    return tok


# Llama 4's split regex (transformers' convert_llama4_weights_to_hf.py, O200K_PATTERN)
O200K_REGEX = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
               r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
               r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
               r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
               r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA4_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|header_start|>",
                  "<|header_end|>", "<|eot|>", "<|image_start|>", "<|image_end|>", "<|tile_x_separator|>",
                  "<|tile_y_separator|>", "<|image|>", "<|patch|>"]


def _llama4():
    """Llama 4's tokenizer kind (``Llama4Converter``): byte-level BPE with the o200k split regex, BOS added by a
    TemplateProcessing post-processor, EOS ``<|eot|>`` (instruct), the vision tokens special."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tk = _byte_level(O200K_REGEX)
    chat = ("<|header_start|>user<|header_end|>\n\n<|image|>{q}<|eot|>"
            "<|header_start|>assistant<|header_end|>\n\n{a}<|eot|>")
    _train(tk, _corpus(chat), LLAMA4_SPECIAL, byte_level=True)
    tk.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                      special_tokens=[("<|begin_of_text|>", 0)])])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|begin_of_text|>", eos_token="<|eot|>",
                                  pad_token="<|finetune_right_pad_id|>", additional_special_tokens=LLAMA4_SPECIAL[3:])
    tok.padding_side = "right"
    return tok


def _paligemma():
    """PaliGemma's tokenizer kind: Gemma's (as :func:`_gemma`) with ``<image>`` special."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import GemmaTokenizer

    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Replace(" ", "▁")
    tk.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous")
    vocab, merges = _train(tk, _corpus("<image><bos>{q}\n{a}<eos>"), ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"],
                           byte_level=False)
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tok = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True,
                         extra_special_tokens={"image_token": "<image>"})
    tok.padding_side = "right"
    return tok


QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
QWEN_CHAT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
             "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n")
QWEN3_CHAT = ("<|im_start|>user\n<|vision_start|><0.5 seconds><|vision_start|><|vision_end|><1.5 seconds>"
              "{q}<|im_end|>\n"
              "<|im_start|>assistant\n{a}<|im_end|>\n")
TOKENIZERS = {
    "qwen2_vl": lambda: _qwen2(QWEN_SPECIAL, QWEN_CHAT, "<|im_end|>"),
    "qwen2_5_vl": lambda: _qwen2(QWEN_SPECIAL, QWEN_CHAT, "<|im_end|>"),
    # Qwen3-VL's video text "<t seconds>" in the corpus, so " seconds" is one merged token as in Qwen's vocabulary
    "qwen3_vl": lambda: _qwen2(QWEN_SPECIAL, QWEN3_CHAT, "<|im_end|>"),
    "qwen3_vl_moe": lambda: _qwen2(QWEN_SPECIAL, QWEN3_CHAT, "<|im_end|>"),
    "llava_onevision": lambda: _qwen2(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"],
                                      "<|im_start|>user <image>\n{q}<|im_end|><|im_start|>assistant \n{a}<|im_end|>",
                                      "<|im_end|>"),
    "idefics3": _llama3,
    "gemma3": _gemma,
    "llava_next": _llama_sp,
    "internvl": _internvl,
    "llama4": _llama4,
    "paligemma": _paligemma,
}
TEMPLATES = {"qwen2_vl": QWEN2_VL, "qwen2_5_vl": QWEN25_VL, "qwen3_vl": QWEN3_VL, "qwen3_vl_moe": QWEN3_VL,
             "llava_onevision": ONEVISION,
             "idefics3": IDEFICS3, "gemma3": GEMMA3, "llava_next": LLAVA_NEXT, "internvl": INTERNVL, "llama4": LLAMA4}
# where the end of a turn is not the tokenizer's EOS, the checkpoint's generation config lists it as a stop id
STOPS = {"idefics3": ["<|end_of_text|>", "<end_of_utterance>"], "gemma3": ["<eos>", "<end_of_turn>"]}
# the answer's tokens decoded: the assistant text (with the space the template writes before it, which a
# byte-level token carries) and the end-of-turn token
ANSWER_TEXT = {"qwen2_vl": "red<|im_end|>", "qwen2_5_vl": "red<|im_end|>", "qwen3_vl": "red<|im_end|>",
               "qwen3_vl_moe": "red<|im_end|>",
               "llava_onevision": "red<|im_end|>", "idefics3": " red<end_of_utterance>", "gemma3": "red<end_of_turn>",
               "llava_next": "red</s>", "internvl": "red<|im_end|>", "llama4": "red<|eot|>"}
# tokens the template writes after the answer's end-of-turn token ("\n", LLaVA-NeXT's " ")
AFTER_ANSWER = {"qwen2_vl": 1, "qwen2_5_vl": 1, "qwen3_vl": 1, "qwen3_vl_moe": 1, "idefics3": 1, "gemma3": 1,
                "llava_next": 1, "internvl": 1}
FAMILIES = list(TEMPLATES)
QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")


def build_bpe_model(family: str, out) -> str:
    """The tiny ``family`` model saved with a trained BPE tokenizer and the released chat template (if any)."""
    tok = TOKENIZERS[family]()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model, proc = get_adapter(family).debug_model(tok)
    if family == "idefics3":  # its debug model adds the row/global markers as tokens; the checkpoint's are text
        tok = TOKENIZERS[family]()
    if family in STOPS:
        model.generation_config.eos_token_id = tok.convert_tokens_to_ids(STOPS[family])
    tok.chat_template = TEMPLATES.get(family)  # PaliGemma's checkpoints have none
    model.save_pretrained(out)
    tok.save_pretrained(out)
    proc.save_pretrained(out)
    return str(out)


_LOADED: dict = {}  # family -> LoadedModel, for the session: test_native_bpe_video imports the fixture too


@pytest.fixture(scope="session")
def bpe(tmp_path_factory):
    def get(family: str):
        if family not in _LOADED:
            path = build_bpe_model(family, tmp_path_factory.mktemp(family))
            _LOADED[family] = load_model(ModelSpec(path=path, device="cpu", dtype="float32"))
        return _LOADED[family]
    return get


def _processor(family: str, lm):
    if family in QWEN:
        return family_processor(family, lm.info.path)
    return {"llava_onevision": _llava_onevision_processor, "idefics3": _idefics3_processor,
            "gemma3": _gemma3_processor, "llava_next": _llava_next_processor, "internvl": _internvl_processor,
            "llama4": _llama4_processor}[family](lm)


def _sample(answer: bool = True) -> Sample:
    """One image and a question that holds the answer's word (an answer search from the wrong place finds it)."""
    turns = (Turn("user", (Media("image", 0), "is the circle red or blue ?")),)
    return Sample(turns + ((Turn("assistant", ("red",)),) if answer else ()), [_image(112, 84)])


def _messages(s: Sample) -> list[dict]:
    """transformers' message format, written here (not kscale's converter), pixels inline."""
    def part(p):
        return {"type": "image", "image": s.images[p.index]} if isinstance(p, Media) else {"type": "text", "text": p}
    return [{"role": t.role, "content": [part(p) for p in t.content]} for t in s.turns]


def _theirs(family, lm, s: Sample, **kw):
    return _processor(family, lm).apply_chat_template(_messages(s), chat_template=lm.prompt.text, tokenize=True,
                                                      return_dict=True, return_tensors="pt", **kw)


def test_the_tokenizers_are_what_real_checkpoints_ship(bpe) -> None:
    """The properties the WordLevel tests cannot exercise hold here, so the tests below see them."""
    qwen, idefics, gemma = bpe("qwen2_5_vl").tokenizer, bpe("idefics3").tokenizer, bpe("gemma3").tokenizer
    assert type(qwen).__name__ == "Qwen2Tokenizer" and type(gemma).__name__ == "GemmaTokenizer"
    assert qwen.bos_token is None and qwen("red").input_ids == qwen("red", add_special_tokens=False).input_ids
    assert idefics.convert_ids_to_tokens(idefics(" red", add_special_tokens=False).input_ids) == ["Ġred"]
    assert idefics("red").input_ids[0] == idefics.bos_token_id  # BOS from the tokenizer itself
    assert gemma("red").input_ids[0] == gemma.bos_token_id
    assert "\n\n\n" in gemma.convert_ids_to_tokens(gemma("user\n\n\nis", add_special_tokens=False).input_ids)
    assert len(idefics("<row_1_col_2>", add_special_tokens=False).input_ids) > 1  # plain text, several tokens
    mistral, llama4, pali = bpe("llava_next").tokenizer, bpe("llama4").tokenizer, bpe("paligemma").tokenizer
    assert mistral("red").input_ids[0] == mistral.bos_token_id  # loaded as TokenizersBackend: its tokenizer.json
    assert type(mistral.backend_tokenizer.pre_tokenizer).__name__ == "Metaspace"
    assert mistral.convert_ids_to_tokens(mistral("red", add_special_tokens=False).input_ids) == ["▁red"]
    assert llama4("red").input_ids[0] == llama4.bos_token_id and llama4.eos_token == "<|eot|>"
    intern = bpe("internvl").tokenizer
    assert intern.convert_tokens_to_ids("<IMG_CONTEXT>") == intern.context_image_token_id
    q = "is the circle red or blue ?"  # PaliGemma's prompt: pieces tokenised apart are not the whole string's
    assert pali(q + "\n", add_special_tokens=False).input_ids != (pali(q, add_special_tokens=False).input_ids
                                                                  + pali("\n", add_special_tokens=False).input_ids)


def _want_tags(family: str, lm, ours, theirs) -> torch.Tensor:
    """The tags the processor's output gives (``test_families_other._expected_tags``: its ``mm_token_type_ids``
    with the processor's own image token id, the model's newline positions special). Llama 4's processor marks
    only ``<|image|>`` (one per image): there the image positions are the ones the model fills with features
    (its own placeholder mask, as ``test_families_llama4``), the rest of the block the tokenizer's special tokens."""
    if family == "llama4":
        ids = theirs["input_ids"]
        want = torch.full(ids.shape, TEXT, dtype=torch.int8)
        special = torch.tensor(sorted(set(lm.tokenizer.all_special_ids) - {lm.tokenizer.unk_token_id}))
        want[torch.isin(ids, special)] = SPECIAL
        want[_model_image_positions(lm, ours.inputs)] = IMAGE
        return want
    theirs["image_token_id"] = _processor(family, lm).image_token_ids[0]  # the processor's reading of its mm ids
    return _expected_tags(lm, theirs, _newline_positions(lm, ours.inputs))


@pytest.mark.parametrize("family", FAMILIES)
def test_native_tokens_and_tags_equal_apply_chat_template(bpe, family) -> None:
    lm = bpe(family)
    assert lm.prompt.kind == "native" and lm.prompt.text == TEMPLATES[family]
    for s, kw in ((_sample(), {}), (_sample(answer=False), {"add_generation_prompt": True})):
        ours = lm.adapter.batch(lm, [s], with_answers="add_generation_prompt" not in kw)
        theirs = _theirs(family, lm, s, processor_kwargs={"return_mm_token_type_ids": True}, **kw)
        assert ours.inputs["input_ids"].tolist() == theirs["input_ids"].tolist(), (
            lm.tokenizer.convert_ids_to_tokens(ours.inputs["input_ids"][0]),
            lm.tokenizer.convert_ids_to_tokens(theirs["input_ids"][0]))
        assert torch.equal(ours.inputs["pixel_values"], theirs["pixel_values"].to(ours.inputs["pixel_values"].dtype))
        want = _want_tags(family, lm, ours, theirs)
        assert torch.equal(ours.modality_BT, want), (ours.modality_BT, want)
        assert (ours.image_index_BT[want == IMAGE] == 0).all() and (ours.image_index_BT[want != IMAGE] == -1).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_answer_span_is_the_assistant_text_and_its_end_of_turn(bpe, family) -> None:
    lm = bpe(family)
    b = lm.adapter.batch(lm, [_sample()])
    ids, mask = b.inputs["input_ids"][0], b.answer_mask_BT[0]
    where = torch.nonzero(mask).flatten()
    assert len(where) and (torch.diff(where) == 1).all()  # one run
    assert lm.tokenizer.decode(ids[mask]) == ANSWER_TEXT[family]
    assert int(where[-1]) == len(ids) - 1 - AFTER_ANSWER.get(family, 0)
    if family == "llava_onevision":  # its template marks '\n' + answer with {% generation %}: transformers' mask
        theirs = _theirs(family, lm, _sample(), return_assistant_tokens_mask=True)["assistant_masks"][0].bool()
        assert lm.tokenizer.decode(ids[theirs]) == " \nred"  # "assistant " + "\n" + text: " \n" is one token
        eot = torch.zeros_like(theirs)
        eot[int(torch.nonzero(theirs).max()) + 1] = True  # the <|im_end|> after the generation block
        blank = torch.tensor([not lm.tokenizer.decode([i]).strip() for i in ids.tolist()])
        assert torch.equal(mask, (theirs | eot) & ~blank)


def _two_images(answer: bool = True) -> Sample:
    """Two images with text between them, named out of their list order (``images[1]`` first), so the
    processor's order (the messages') and ``Sample.images``' differ."""
    user = Turn("user", (Media("image", 1), "the left one , and", Media("image", 0), "the right one ?"))
    turns = (user,) + ((Turn("assistant", ("red",)),) if answer else ())
    return Sample(turns, [_image(112, 84), _image(57, 83, seed=1)])


def _blocks(mm: torch.Tensor, n: int) -> list[torch.Tensor]:
    """The processor's image blocks, in its order: runs of ``mm_token_type_ids == 1``; where the template writes
    the images next to each other (LLaVA-OneVision renders all images first) one run, split evenly (untiled
    images of a multi-image sample are the same size)."""
    pos = torch.nonzero(mm == 1).flatten()
    runs = torch.tensor_split(pos, (torch.nonzero(torch.diff(pos) > 1).flatten() + 1).tolist())
    if len(runs) == 1 and n > 1:
        return list(runs[0].chunk(n))
    assert len(runs) == n, (len(runs), n)
    return list(runs)


def _image_blocks(lm, theirs, n: int) -> list[torch.Tensor]:
    """The processor's image blocks in its order: :func:`_blocks` of its ``mm_token_type_ids``, or for Llama 4
    (whose ``mm_token_type_ids`` marks one ``<|image|>`` per image) the spans ``<|image_start|> .. <|image_end|>``."""
    ids = theirs["input_ids"][0]
    if lm.info.family == "llama4":
        tok = lm.tokenizer
        starts = torch.nonzero(ids == tok.convert_tokens_to_ids("<|image_start|>")).flatten().tolist()
        ends = torch.nonzero(ids == tok.convert_tokens_to_ids("<|image_end|>")).flatten().tolist()
        assert len(starts) == len(ends) == n
        return [torch.arange(a + 1, b) for a, b in zip(starts, ends)]
    mm = theirs["mm_token_type_ids"] if "mm_token_type_ids" in theirs else theirs["token_type_ids"]
    return _blocks(mm[0], n)


@pytest.mark.parametrize("family", FAMILIES)
def test_two_images_and_text_between_them_equal_apply_chat_template(bpe, family) -> None:
    lm = bpe(family)
    order = [1, 0]  # Sample.images index of the processor's first and second image
    for s, kw in ((_two_images(), {}), (_two_images(answer=False), {"add_generation_prompt": True})):
        ours = lm.adapter.batch(lm, [s], with_answers="add_generation_prompt" not in kw)
        theirs = _theirs(family, lm, s, processor_kwargs={"return_mm_token_type_ids": True}, **kw)
        assert ours.inputs["input_ids"].tolist() == theirs["input_ids"].tolist(), (
            lm.tokenizer.convert_ids_to_tokens(ours.inputs["input_ids"][0]),
            lm.tokenizer.convert_ids_to_tokens(theirs["input_ids"][0]))
        for k in set(ours.inputs) & set(theirs) - {"input_ids"}:  # pixels (in the processor's order), grids, masks
            assert torch.equal(ours.inputs[k], torch.as_tensor(theirs[k]).to(ours.inputs[k].dtype)), k
        want = _want_tags(family, lm, ours, theirs)
        assert torch.equal(ours.modality_BT, want), (ours.modality_BT, want)
        index = torch.full_like(ours.image_index_BT[0], -1)
        for k, block in enumerate(_image_blocks(lm, theirs, len(order))):
            index[block] = order[k]
        index[want[0] != IMAGE] = -1
        assert torch.equal(ours.image_index_BT[0], index), (ours.image_index_BT[0], index)
        assert set(index[want[0] == IMAGE].tolist()) == {0, 1}


@pytest.mark.parametrize("answer", [True, False])
def test_paligemma_prompt_and_answer_equal_its_processor(bpe, answer) -> None:
    """PaliGemma has no chat template: its processor writes ``<image>`` x N, BOS, the prompt and ``"\\n"`` (one
    tokeniser call) and encodes the answer as the pair's second text (``suffix`` + EOS, ``token_type_ids`` 1).
    kscale's built-in template must give the same ids, and its answer span must be the suffix's tokens."""
    from tests.unit.test_families_other import _paligemma_processor

    lm = bpe("paligemma")
    assert lm.prompt.kind == "built-in"
    s = _sample(answer)
    ours = lm.adapter.batch(lm, [s])
    kw = {"suffix": ["red"]} if answer else {}
    theirs = _paligemma_processor(lm)(text=["<image>is the circle red or blue ?"], images=s.images,
                                      return_tensors="pt", **kw)
    assert ours.inputs["input_ids"].tolist() == theirs["input_ids"].tolist(), (
        lm.tokenizer.convert_ids_to_tokens(ours.inputs["input_ids"][0]),
        lm.tokenizer.convert_ids_to_tokens(theirs["input_ids"][0]))
    for k in ("attention_mask", "pixel_values", "token_type_ids"):
        assert torch.equal(ours.inputs[k], theirs[k].to(ours.inputs[k].dtype)), k
    assert torch.equal(ours.answer_mask_BT, theirs["token_type_ids"].bool())
    ids = ours.inputs["input_ids"][0]
    assert lm.tokenizer.decode(ids[ours.answer_mask_BT[0]]) == ("red<eos>" if answer else "")


@pytest.mark.parametrize("family", FAMILIES)
def test_two_turns_give_two_answer_spans(bpe, family) -> None:
    """A follow-up question after the first answer: ids equal the processor's, and the answer mask is two runs,
    each the assistant text of its turn and the end-of-turn token (the second answer's search starts after the
    first turn as the template renders it, so the first turn's words cannot be taken for the second's)."""
    lm = bpe(family)
    s = Sample((Turn("user", (Media("image", 0), "is the circle red or blue ?")), Turn("assistant", ("red",)),
                Turn("user", ("what color is the square ?",)), Turn("assistant", ("red",))), [_image(112, 84)])
    ours = lm.adapter.batch(lm, [s])
    theirs = _theirs(family, lm, s)
    assert ours.inputs["input_ids"].tolist() == theirs["input_ids"].tolist()
    ids, mask = ours.inputs["input_ids"][0], ours.answer_mask_BT[0]
    where = torch.nonzero(mask).flatten()
    runs = torch.tensor_split(where, (torch.nonzero(torch.diff(where) > 1).flatten() + 1).tolist())
    assert [lm.tokenizer.decode(ids[r]) for r in runs] == [ANSWER_TEXT[family]] * 2
