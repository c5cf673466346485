"""Token tags and image indices against references kscale did not compute, for every family with a tiny model.

Every stored token carries a modality tag (text, image, video, special; PAD never stored) and, for image
tokens, which image of the sample it came from (0-based; -1 otherwise). These are the columns analysis
groups by, so a slip moves tokens between groups without any shape changing. The references here:

- the processor's own ``mm_token_type_ids`` (``return_mm_token_type_ids=True``; 0 text, 1 image, 2 video),
  computed by transformers from its image/video token ids: image and video tags must match it exactly;
- a tag vector written out by hand for a known prompt (control tokens of the family's chat template are
  special; a word outside the vocabulary becomes the tokenizer's unknown token, which is text, not special);
- the image counts the processor reports (``image_grid_thw`` / the fixed LLaVA count): the tokens of the
  sample's k-th image carry index k, so the first image is 0 (an index vector written out by hand).

``test_processors.py`` / ``test_inputs.py`` check that kscale's inputs equal the processor's; here the
processor's ``input_ids`` (several images in one sample, a video placeholder, an unknown word) go through the
adapter's tagging, the same two-image sample goes through ``Adapter.batch``, and a padded batch from
``build_batch`` is checked the same way.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kscale.models.facts import IMAGE, PAD, SPECIAL, TEXT, VIDEO
from kscale.models.inputs import Media, Sample, Turn
from tests.unit.test_processors import _image, _llava_processor, _load, _qwen_processor

CODE = {"T": TEXT, "I": IMAGE, "V": VIDEO, "S": SPECIAL, "P": PAD}

# One sample, two images of different sizes, text around them with an unknown word ("zebra").
QWEN_TWO_IMAGES = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what zebra is"
                   "<|vision_start|><|image_pad|><|vision_end|>?<|im_end|>\n<|im_start|>assistant\n")
LLAVA_TWO_IMAGES = "<s>USER: <image>\nwhat zebra is <image> ? ASSISTANT:"
TWO_SIZES = [(56, 56), (112, 56)]  # Qwen (debug bounds): 2x2 and 2x4 merged patches -> 4 and 8 tokens
# The same sample for Adapter.batch: the family's template renders it to the prompts above.
TWO_IMAGES = (Media("image", 0), "what zebra is", Media("image", 1), "?")


def _expand(runs: str) -> list[int]:
    """'S T I*4' -> [SPECIAL, TEXT, IMAGE x 4]: a hand-written tag vector."""
    out: list[int] = []
    for run in runs.split():
        tag, _, n = run.partition("*")
        out += [CODE[tag]] * int(n or 1)
    return out


def _index(runs: str) -> list[int]:
    """'- 0*4 - 1*8' -> [-1, 0 x 4, -1, 1 x 8]: a hand-written image-index vector ('-' is -1)."""
    out: list[int] = []
    for run in runs.split():
        v, _, n = run.partition("*")
        out += [-1 if v == "-" else int(v)] * int(n or 1)
    return out


# Tokens (WordLevel, whitespace dropped):
# <|im_start|> user <|vision_start|> pad*4 <|vision_end|> what [UNK] is <|vision_start|> pad*8 <|vision_end|>
# ? <|im_end|> <|im_start|> assistant
QWEN_TAGS = _expand("S T S I*4 S T T T S I*8 S T S S T")
QWEN_INDEX = _index("-*3 0*4 -*5 1*8 -*5")
# <s> user : <image>*16 what [UNK] is <image>*16 ? assistant :   (16 = (56 / 14)^2 CLIP patches)
LLAVA_TAGS = _expand("S T T I*16 T T T I*16 T T T")
LLAVA_INDEX = _index("-*3 0*16 -*3 1*16 -*3")


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    return _load(qwen_dir), _qwen_processor(qwen_dir)


@pytest.fixture(scope="module")
def llava(llava_dir):
    lm = _load(llava_dir)
    return lm, _llava_processor(llava_dir, lm.model.config)


def _processed(family, qwen, llava):
    """(loaded model, processor output for the two-image prompt, hand tags, hand index)."""
    if family == "qwen2_5_vl":
        (lm, proc), prompt, tags, index = qwen, QWEN_TWO_IMAGES, QWEN_TAGS, QWEN_INDEX
    else:
        (lm, proc), prompt, tags, index = llava, LLAVA_TWO_IMAGES, LLAVA_TAGS, LLAVA_INDEX
    out = proc(images=[_image(w, h) for w, h in TWO_SIZES], text=[prompt], return_tensors="pt",
               return_mm_token_type_ids=True)
    return lm, proc, out, tags, index


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_tags_of_a_two_image_prompt_match_the_processor_and_the_hand_written_vector(family, qwen, llava):
    lm, proc, out, tags, index = _processed(family, qwen, llava)
    modality = lm.adapter.tag(lm, out["input_ids"], out["attention_mask"])
    mm = out["mm_token_type_ids"][0]
    assert torch.equal(modality[0] == IMAGE, mm == 1)  # the processor's image tokens, exactly
    assert torch.equal(modality[0] == VIDEO, mm == 2)
    assert modality[0].tolist() == tags, proc.tokenizer.convert_ids_to_tokens(out["input_ids"][0].tolist())
    ours = lm.adapter.batch(lm, [Sample((Turn("user", TWO_IMAGES),), [_image(w, h) for w, h in TWO_SIZES])])
    assert torch.equal(ours.inputs["input_ids"], out["input_ids"])  # the processor's prompt, token for token
    assert ours.modality_BT[0].tolist() == tags
    assert ours.image_index_BT[0].tolist() == index
    # the hand-written vectors agree with what the processor says about the images and the unknown word
    per_image = ([int(g.prod()) // 4 for g in out["image_grid_thw"]] if family == "qwen2_5_vl"
                 else [(lm.model.config.vision_config.image_size // lm.model.config.vision_config.patch_size) ** 2] * 2)
    assert [index.count(k) for k in range(len(per_image))] == per_image
    unk = out["input_ids"][0] == proc.tokenizer.unk_token_id
    assert int(unk.sum()) == 1 and modality[0][unk].tolist() == [TEXT]  # unknown words are text


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_every_special_token_of_the_tokenizer_except_unknown_and_media_is_tagged_special(family, qwen, llava):
    """All of the tokenizer's special tokens in one sequence: the media placeholders take the processor's
    type, the unknown token is text, and every other special token (control tokens) is special."""
    lm, proc = qwen if family == "qwen2_5_vl" else llava
    tok = proc.tokenizer
    ids = torch.tensor([sorted(tok.all_special_ids) + tok("what is", add_special_tokens=False).input_ids])
    modality = lm.adapter.tag(lm, ids, torch.ones_like(ids))
    mm = torch.tensor(proc.create_mm_token_type_ids(ids))[0]
    want = {tid: (IMAGE if t == 1 else VIDEO if t == 2 else TEXT if tid == tok.unk_token_id else SPECIAL)
            for tid, t in zip(ids[0, : len(tok.all_special_ids)].tolist(), mm.tolist())}
    want.update({tid: TEXT for tid in ids[0, len(tok.all_special_ids):].tolist()})
    got = dict(zip(ids[0].tolist(), modality[0].tolist()))
    assert got == want, {tok.convert_ids_to_tokens(i): (got[i], want[i]) for i in got if got[i] != want[i]}
    assert SPECIAL in want.values() and TEXT in want.values() and IMAGE in want.values()
    assert (family == "qwen2_5_vl") == (VIDEO in want.values())  # Qwen has a video token; LLaVA none


def test_qwen_video_placeholder_is_video_as_the_processor_types_it(qwen):
    """The processor refuses a video placeholder without videos (and there is no CPU video processor), so
    the prompt is tokenised alone and typed by the processor's own ``create_mm_token_type_ids``."""
    lm, proc = qwen
    prompt = ("<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>what zebra is"
              "<|vision_start|><|image_pad|><|vision_end|><|im_end|>")
    ids = proc.tokenizer([prompt], return_tensors="pt")["input_ids"]
    modality = lm.adapter.tag(lm, ids, torch.ones_like(ids))
    mm = torch.tensor(proc.create_mm_token_type_ids(ids))[0]
    assert torch.equal(modality[0] == VIDEO, mm == 2) and int((mm == 2).sum()) == 1
    assert torch.equal(modality[0] == IMAGE, mm == 1)
    assert modality[0].tolist() == _expand("S T S V S T T T S I S S")


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_padded_batch_tags_equal_the_processor_rows(family, qwen, llava):
    """``build_batch`` on an image sample and a longer text-only one: each row's tags equal the tags of the
    processor's own ids for that sample, PAD (and index -1) past the attention mask, the image is image 0."""
    lm, proc = qwen if family == "qwen2_5_vl" else llava
    texts = ["what color ?", "and here , what shape is it in the picture ? " * 3]
    batch = lm.adapter.build_batch(lm, [_image(56, 56), None], texts)
    attn = batch.inputs["attention_mask"]
    assert attn[0].sum() < attn.shape[1] and attn[1].all()  # the image row is the padded one
    for row, (ids_T, mask_T) in enumerate(zip(batch.inputs["input_ids"], attn)):
        n = int(mask_T.sum())
        ref = ids_T[:n].unsqueeze(0)
        mm = torch.tensor(proc.create_mm_token_type_ids(ref))[0]
        tok_strings = proc.tokenizer.convert_ids_to_tokens(ref[0].tolist())
        controls = {t for t in proc.tokenizer.all_special_tokens
                    if t not in (proc.tokenizer.unk_token, proc.image_token, getattr(proc, "video_token", None))}
        want = [IMAGE if m == 1 else VIDEO if m == 2 else SPECIAL if s in controls else TEXT
                for m, s in zip(mm.tolist(), tok_strings)]
        assert batch.modality_BT[row, :n].tolist() == want, tok_strings
        assert (batch.modality_BT[row, n:] == PAD).all()
        n_img = int((mm == 1).sum())
        assert batch.n_image_tokens[row] == n_img
        assert np.array_equal(batch.image_index_BT[row].numpy(),
                              np.where(np.r_[mm.numpy() == 1, np.zeros(len(ids_T) - n, bool)], 0, -1))
        assert (n_img > 0) == (row == 0)
