"""Native prompts: a checkpoint's own chat template renders the samples (``kscale.models.prompts``).

The tiny models here get a real checkpoint's Jinja chat template in code (``build_debug_model(...,
chat_template=True)``: Qwen2-VL's, llava-hf/llava-1.5's, Gemma 3's shortened). The reference kscale did not compute is
transformers' own ``processor.apply_chat_template(messages, tokenize=True)`` on the same conversation (several
images, two assistant turns): the token ids, pixels and, for LLaVA, the assistant mask its template's
``{% generation %}`` blocks give. Without a template the family's built-in template stays; the
store records which template made its tokens and ``kscale info`` shows it.
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import kscale.store
from kscale.models import IMAGE, load_model
from kscale.models.debug import build_debug_model, debug_model_dir
from kscale.models.inputs import Media, Sample, Turn
from kscale.runner import run_job
from kscale.spec import ModelSpec, spec_from_dict
from tests.conftest import extract_spec
from tests.unit.test_families_qwen import family_processor
from tests.unit.test_processors import _image, _llava_processor

FAMILIES = ["qwen2_5_vl", "llava", "gemma3"]


@pytest.fixture(scope="module")
def templated(tmp_path_factory):
    """family -> (folder of the tiny model with a chat template, its LoadedModel)."""
    out = {}
    for family in FAMILIES:
        path = build_debug_model(family, tmp_path_factory.mktemp(family), chat_template=True)
        out[family] = path, load_model(ModelSpec(path=path, device="cpu", dtype="float32"))
    return out


def _processor(family: str, lm):
    if family == "gemma3":
        from transformers import Gemma3Processor

        return Gemma3Processor(image_processor=lm.image_processor, tokenizer=lm.tokenizer,
                               image_seq_length=lm.model.config.mm_tokens_per_image)
    return family_processor(family, lm.info.path) if family == "qwen2_5_vl" else _llava_processor(
        lm.info.path, lm.model.config)


def _sample() -> Sample:
    """Three images over two user turns, text between the images, two answers."""
    images = [_image(112, 84), _image(57, 83, seed=1), _image(90, 90, seed=2)]
    return Sample((Turn("user", (Media("image", 0), "the left one , and", Media("image", 1), "the right one ?")),
                   Turn("assistant", ("red",)),
                   Turn("user", ("and", Media("image", 2), "this one ?")),
                   Turn("assistant", ("blue circle",))), images)


def _messages(s: Sample) -> list[dict]:
    """transformers' message format, written here (not kscale's converter), pixels inline."""
    def part(p):
        if isinstance(p, Media):
            return {"type": "image", "image": s.images[p.index]}
        return {"type": "text", "text": p}
    return [{"role": t.role, "content": [part(p) for p in t.content]} for t in s.turns]


def _theirs(family, lm, s: Sample, **kw):
    proc = _processor(family, lm)
    return proc.apply_chat_template(_messages(s), chat_template=lm.tokenizer.chat_template, tokenize=True,
                                    return_dict=True, return_tensors="pt", **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_native_tokens_equal_the_processors_apply_chat_template(templated, family) -> None:
    _, lm = templated[family]
    assert lm.prompt.kind == "native" and lm.prompt.text == lm.tokenizer.chat_template
    s = _sample()
    ours = lm.adapter.batch(lm, [s])
    theirs = _theirs(family, lm, s)
    assert torch.equal(ours.inputs["input_ids"], theirs["input_ids"])
    assert torch.equal(ours.inputs["pixel_values"], theirs["pixel_values"])
    for k in ("image_grid_thw", "token_type_ids"):
        if k in theirs:
            assert torch.equal(ours.inputs[k], theirs[k])
    # extraction leaves the answers out: the template's generation prompt ends the sequence
    ours = lm.adapter.batch(lm, [s], with_answers=False)
    first = Sample(s.turns[:1], s.images[:2])
    theirs = _theirs(family, lm, first, add_generation_prompt=True)
    assert torch.equal(ours.inputs["input_ids"], theirs["input_ids"])


@pytest.mark.parametrize("family", FAMILIES)
def test_answer_spans_land_on_the_assistant_turns(templated, family) -> None:
    _, lm = templated[family]
    tok = lm.tokenizer
    b = lm.adapter.batch(lm, [_sample()])
    ids, mask = b.inputs["input_ids"][0], b.answer_mask_BT[0]
    spans = torch.nonzero(torch.diff(torch.cat([torch.tensor([0]), mask.int(), torch.tensor([0])]))).flatten()
    got = [ids[a:e].tolist() for a, e in zip(spans[::2], spans[1::2])]
    eos = [tok.eos_token_id] if family != "llava" else []  # Qwen's and Gemma's templates close a turn with EOS
    assert got == [tok("red", add_special_tokens=False).input_ids + eos,
                   tok("blue circle", add_special_tokens=False).input_ids + eos]
    if family == "llava":  # its template marks the answers with {% generation %}: transformers' own mask
        theirs = _theirs(family, lm, _sample(), return_assistant_tokens_mask=True)
        assert torch.equal(mask, theirs["assistant_masks"][0].bool())
    # each image's tokens carry its index, in the order the template wrote them
    idx = b.image_index_BT[0][b.modality_BT[0] == IMAGE]
    assert idx.unique_consecutive().tolist() == [0, 1, 2]


def test_without_a_template_the_built_in_template_stays_and_override_wins(templated) -> None:
    plain = load_model(ModelSpec(path=debug_model_dir("qwen2_5_vl"), device="cpu", dtype="float32"))
    assert plain.prompt.kind == "built-in" and plain.prompt.text == plain.adapter.default_template
    path, _ = templated["qwen2_5_vl"]
    lm = load_model(ModelSpec(path=path, device="cpu", dtype="float32", prompt_template="{image}{text} ."))
    assert lm.prompt.kind == "override" and lm.template == "{image}{text} ."
    s = Sample.simple(_image(56, 56), "what color")
    ids = lm.adapter.batch(lm, [s]).inputs["input_ids"][0].tolist()
    assert ids[-1] == lm.tokenizer.convert_tokens_to_ids(".")  # the override's text, not the chat template


def test_store_records_the_template_and_info_shows_it(templated, tmp_path) -> None:
    from kscale.cli import main

    path, lm = templated["qwen2_5_vl"]
    d = extract_spec(tmp_path, model=path, data={"generated": {"n_samples": 2, "image_size": 56}, "shard_size": 2})
    spec = spec_from_dict(d)
    run_job(spec, show_bar=False)
    store = kscale.store.open(spec.output.path)
    rec = store.attrs["prompt_template"]
    assert rec["kind"] == "native" and rec["template"] == lm.tokenizer.chat_template
    out = CliRunner().invoke(main, ["info", spec.output.path])
    assert out.exit_code == 0, out.output
    assert f"{'prompt_template':18s} native (sha256 {rec['sha256'][:12]})" in out.output.splitlines()
    # the stored tokens are the chat template's: sample 0 as transformers renders it
    from kscale.data import open_source

    r = open_source(spec.data).get(0)
    theirs = _theirs("qwen2_5_vl", lm, Sample.simple(r.image, r.text), add_generation_prompt=True)
    toks = {m: store.tokens(m) for m in ("text", "image", "special")}
    pos = torch.cat([torch.as_tensor(toks[m]["position"][toks[m]["sample_id"] == 0]) for m in toks])
    ids = torch.cat([torch.as_tensor(toks[m]["token_id"][toks[m]["sample_id"] == 0]) for m in toks])
    assert torch.equal(ids[pos.argsort()].long(), theirs["input_ids"][0])


def test_native_video_sample_equals_the_processors_expansion(templated) -> None:
    """A video through the chat template (Qwen2.5-VL). No CPU torchvision means no video processor, so the
    reference is transformers' rendering (``apply_chat_template(tokenize=False)``) expanded as
    ``Qwen2_5_VLProcessor.__call__`` expands it (each pad token repeated grid.prod() // merge² times), then
    tokenised."""
    from tests.unit.test_video_qwen import _video

    _, lm = templated["qwen2_5_vl"]
    s = Sample((Turn("user", (Media("image", 0), "and", Media("video", 0), "what is it ?")),
                Turn("assistant", ("red",))), [_image(56, 56)], [_video(4, 56)])
    ours = lm.adapter.batch(lm, [s])
    proc = _processor("qwen2_5_vl", lm)
    text = proc.apply_chat_template([{"role": t.role, "content": [
        {"type": p.kind} if isinstance(p, Media) else {"type": "text", "text": p} for p in t.content]}
        for t in s.turns], chat_template=lm.tokenizer.chat_template, tokenize=False)
    merge = lm.image_processor.merge_size ** 2
    n_img = int(ours.inputs["image_grid_thw"][0].prod()) // merge
    n_vid = int(ours.inputs["video_grid_thw"][0].prod()) // merge
    text = text.replace("<|image_pad|>", "<|image_pad|>" * n_img).replace("<|video_pad|>", "<|video_pad|>" * n_vid)
    assert ours.inputs["input_ids"][0].tolist() == lm.tokenizer(text).input_ids
    assert (ours.frame_BT[0] >= 0).sum() == n_vid  # every video token has its frame


def test_a_tokenizer_that_adds_bos_gets_it_as_the_processor_gives_it(tmp_path) -> None:
    """Llama-style tokenizers add BOS themselves; the processor tokenises the rendered chat with special tokens
    unless the text already starts with BOS. The tiny LLaVA tokenizer gets such a post-processor here."""
    from tokenizers.processors import TemplateProcessing
    from transformers import LlavaProcessor

    path = build_debug_model("llava", tmp_path / "m", chat_template=True)
    lm = load_model(ModelSpec(path=path, device="cpu", dtype="float32"))
    tok = lm.tokenizer
    tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    cfg = lm.model.config
    proc = LlavaProcessor(image_processor=lm.image_processor, tokenizer=tok, patch_size=cfg.vision_config.patch_size,
                          vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                          num_additional_image_tokens=1)
    s = _sample()
    theirs = proc.apply_chat_template(_messages(s), chat_template=tok.chat_template, tokenize=True, return_dict=True,
                                      return_tensors="pt")
    ours = lm.adapter.batch(lm, [s]).inputs["input_ids"]
    assert ours[0, 0] == tok.bos_token_id and torch.equal(ours, theirs["input_ids"])
