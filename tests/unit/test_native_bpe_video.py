"""Video through the released chat templates on the tokenizer kinds real checkpoints ship (``test_native_bpe``).

A video sample (frames made in code, at a size every resize rule keeps) goes through kscale's native path
(the checkpoint's Jinja, one tokeniser call, ``Adapter.video_block``) and through transformers' own
``processor.apply_chat_template(messages, tokenize=True)`` with the frames in the message, for Qwen2-VL,
Qwen2.5-VL, Qwen3-VL and LLaVA-OneVision. There is no CPU torchvision, so the processors get their video
processor as ``test_video_qwen`` / ``test_video_onevision`` build it (``Qwen3VLVideoProcessor`` with the
family's patch, merge and temporal sizes for every Qwen family, ``LlavaOnevisionVideoProcessor``;
torchvision's normalise formula standing in, ``do_resize=False``).

References kscale did not compute: the processor's ``input_ids``, ``pixel_values_videos``, ``video_grid_thw``
(and Qwen2.5-VL's ``second_per_grid_ts``), its ``mm_token_type_ids`` (2 = video) for the tags, its grid
(``video_grid_thw``: temporal patches x merged patches) for the frame of every video token, and for Qwen3-VL
the ``<t seconds>`` text its ``replace_video_token`` writes before each temporal patch: every token of that
text must carry the frame (and time) of the patch the processor put it in front of, and decode to the
processor's timestamp (``_calculate_timestamps``); through a real extraction, the store's text rows with a frame
are exactly those tokens, with their frame and ``time_ms``. Also an image and a video in one question.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

import kscale.store
from kscale.data.records import Record, RecordList
from kscale.extract import run as extract_run
from kscale.extract import worker
from kscale.models import SPECIAL, TEXT, VIDEO, load_model
from kscale.models.inputs import Media, Sample, Turn
from kscale.runner import run_job
from kscale.spec import ModelSpec, spec_from_dict
from tests.conftest import extract_spec
from tests.unit.test_native_bpe import TEMPLATES, _want_tags, bpe, build_bpe_model  # noqa: F401  (bpe: fixture)
from tests.unit.test_processors import _image
from tests.unit.test_video_qwen import _video

QWEN = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"]
FAMILIES = QWEN + ["llava_onevision"]
PROCESSORS = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor",
              "qwen3_vl_moe": "Qwen3VLProcessor", "llava_onevision": "LlavaOnevisionProcessor"}


@pytest.fixture(autouse=True)
def torchvision_normalize(monkeypatch):
    """torchvision.transforms.v2.functional.normalize's formula, where the video processors call it."""
    import transformers.image_processing_backends as backends

    def normalize(x, mean, std, inplace=False):
        return ((x - torch.as_tensor(mean, dtype=x.dtype).view(-1, 1, 1))
                / torch.as_tensor(std, dtype=x.dtype).view(-1, 1, 1))

    monkeypatch.setattr(backends, "tvF", types.SimpleNamespace(normalize=normalize), raising=False)


def video_processor(family: str, lm):
    """The family's processor class with a video processor built in code (its class check needs torchvision)."""
    import transformers

    ip, cfg = lm.image_processor, lm.model.config

    class _Proc(getattr(transformers, PROCESSORS[family])):
        def check_argument_for_proper_class(self, name, arg):
            return None

    if family == "llava_onevision":
        from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

        vp = LlavaOnevisionVideoProcessor(size=dict(ip.size), image_mean=list(ip.image_mean),
                                          image_std=list(ip.image_std))
        return _Proc(image_processor=ip, tokenizer=lm.tokenizer, video_processor=vp,
                     num_image_tokens=(cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2,
                     vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                     vision_aspect_ratio=cfg.vision_aspect_ratio)
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    vp = Qwen3VLVideoProcessor(patch_size=ip.patch_size, merge_size=ip.merge_size,
                               temporal_patch_size=ip.temporal_patch_size, image_mean=ip.image_mean,
                               image_std=ip.image_std, size=dict(ip.size))
    return _Proc(image_processor=ip, tokenizer=lm.tokenizer, video_processor=vp)


def _side(family: str, lm) -> int:
    if family == "llava_onevision":
        return lm.image_processor.size["height"]
    return 2 * lm.image_processor.patch_size * lm.image_processor.merge_size  # kept by every Qwen resize rule


def _sample(v, answer: bool) -> Sample:
    turns = (Turn("user", (Media("video", 0), "what happens ?")),)
    return Sample(turns + ((Turn("assistant", ("red",)),) if answer else ()), videos=[v])


def _theirs(family: str, lm, s: Sample, **kw):
    """``apply_chat_template(tokenize=True)`` with the frames (F, H, W, 3) in the message."""
    from transformers.video_utils import VideoMetadata

    v = s.videos[0]
    frames = np.stack([np.asarray(f) for f in v.frames])
    msgs = [{"role": t.role, "content": [{"type": "video", "video": frames} if isinstance(p, Media)
                                          else {"type": "text", "text": p} for p in t.content]} for t in s.turns]
    pk = {"return_mm_token_type_ids": True, "do_resize": False, "do_convert_rgb": False}
    if family != "llava_onevision":
        pk.update(do_sample_frames=False, video_metadata=[VideoMetadata(
            total_num_frames=len(v.frames), fps=v.fps, frames_indices=list(range(len(v.frames))))])
    return video_processor(family, lm).apply_chat_template(msgs, chat_template=lm.prompt.text, tokenize=True,
                                                           return_dict=True, return_tensors="pt",
                                                           processor_kwargs=pk, **kw)


def _time_spans(ids: torch.Tensor, lm, texts: list[str]) -> list[slice]:
    """Where the processor's ids hold each temporal patch's ``<t seconds>``: patch k's text is what lies between
    the previous patch's ``<|vision_end|>`` and patch k's ``<|vision_start|>``; the first patch's has no block before
    it, so its span is the shortest run of ids before the first ``<|vision_start|>`` that decodes to ``texts[0]``."""
    cfg, tok = lm.model.config, lm.tokenizer
    starts = torch.nonzero(ids == cfg.vision_start_token_id).flatten().tolist()
    assert len(starts) == len(texts), (starts, texts)
    first = next((j for j in range(starts[0] - 1, -1, -1) if tok.decode(ids[j:starts[0]]) == texts[0]), None)
    assert first is not None, tok.decode(ids[:starts[0]])
    spans = [slice(first, starts[0])]
    for at in starts[1:]:
        spans.append(slice(int(torch.nonzero(ids[:at] == cfg.vision_end_token_id).flatten()[-1]) + 1, at))
    return spans


def _processor_tags(lm, theirs) -> torch.Tensor:
    """Tags from the processor's output: 2 video, the tokenizer's special tokens (and the wrappers: Qwen's
    vision start/end) special, text otherwise; LLaVA-OneVision's closing newline (its last video position,
    the model's ``image_newline``: checked against the model in ``test_video_onevision``) special."""
    ids, mm = theirs["input_ids"][0], theirs["mm_token_type_ids"][0]
    want = torch.full(ids.shape, TEXT, dtype=torch.int8)
    special = set(lm.tokenizer.all_special_ids) - {lm.tokenizer.unk_token_id}
    want[torch.isin(ids, torch.tensor(sorted(special)))] = SPECIAL
    want[mm == 2] = VIDEO
    if lm.info.family == "llava_onevision":
        want[torch.nonzero(mm == 2)[-1]] = SPECIAL
    return want


def _processor_frames(family: str, lm, theirs, n_frames: int) -> list[int]:
    """The frame of each video token in the processor's layout: Qwen's ``video_grid_thw`` (t temporal patches
    of h*w/merge^2 tokens; a patch's frame is its first, padding repeats the last), LLaVA-OneVision's frames
    of pooled patches in order (the closing newline none: -1)."""
    n = int((theirs["mm_token_type_ids"][0] == 2).sum())
    if family == "llava_onevision":
        per = (n - 1) // n_frames
        return [j // per for j in range(n - 1)] + [-1]
    t, h, w = theirs["video_grid_thw"][0].tolist()
    per = h * w // lm.image_processor.merge_size ** 2
    tps = lm.image_processor.temporal_patch_size
    assert t * per == n
    return [(j // per) * tps for j in range(n)]


@pytest.mark.parametrize("n_frames", [4, 3])  # 3: Qwen pads the last temporal patch by repeating the last frame
@pytest.mark.parametrize("family", FAMILIES)
def test_native_video_equals_apply_chat_template(bpe, family, n_frames) -> None:
    lm = bpe(family)
    assert lm.prompt.kind == "native" and lm.prompt.text == TEMPLATES[family]
    v = _video(n_frames, _side(family, lm), seed=n_frames, fps=2.0)
    for answer in (True, False):
        s = _sample(v, answer)
        ours = lm.adapter.batch(lm, [s])
        theirs = _theirs(family, lm, s, **({} if answer else {"add_generation_prompt": True}))
        assert ours.inputs["input_ids"].tolist() == theirs["input_ids"].tolist(), (
            lm.tokenizer.convert_ids_to_tokens(ours.inputs["input_ids"][0]),
            lm.tokenizer.convert_ids_to_tokens(theirs["input_ids"][0]))
        torch.testing.assert_close(ours.inputs["pixel_values_videos"], theirs["pixel_values_videos"],
                                   atol=1e-5, rtol=0)
        for k in ("video_grid_thw", "second_per_grid_ts"):
            assert (k in ours.inputs) == (k in theirs), k
            if k in theirs:
                torch.testing.assert_close(ours.inputs[k].to(torch.float64),
                                           torch.as_tensor(theirs[k]).to(torch.float64))
        assert torch.equal(ours.modality_BT[0], _processor_tags(lm, theirs)), (ours.modality_BT, theirs)
        vid = theirs["mm_token_type_ids"][0] == 2
        assert ours.frame_BT[0][vid].tolist() == _processor_frames(family, lm, theirs, n_frames)
        framed = ours.frame_BT[0] >= 0
        assert (ours.video_index_BT[0][framed] == 0).all() and (ours.video_index_BT[0][~framed] == -1).all()
        assert torch.equal(ours.time_BT[0][framed], torch.tensor(v.timestamps)[ours.frame_BT[0][framed].long()])
        if not family.startswith("qwen3"):
            assert not (framed & (ours.modality_BT[0] == TEXT)).any()  # no text inside these video blocks


@pytest.mark.parametrize("n_frames", [4, 3])
@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe"])
def test_qwen3_vl_timestamp_text_carries_the_frame_the_processor_puts_it_before(bpe, family, n_frames) -> None:
    """Qwen3-VL writes ``<t seconds>`` before each temporal patch: with byte-level BPE the text merges
    (``" seconds"`` is one token); each of its tokens must carry the frame and time of the patch that
    follows it in the processor's ids, and the tokens before patch k decode to the processor's k-th time."""
    lm = bpe(family)
    v = _video(n_frames, _side(family, lm), seed=n_frames, fps=2.0)
    s = _sample(v, answer=False)
    ours = lm.adapter.batch(lm, [s])
    theirs = _theirs(family, lm, s, add_generation_prompt=True)
    ids = theirs["input_ids"][0]
    assert ours.inputs["input_ids"][0].tolist() == ids.tolist()
    cfg, tok = lm.model.config, lm.tokenizer
    tps = lm.image_processor.temporal_patch_size
    proc = video_processor(family, lm)
    times = proc._calculate_timestamps(list(range(n_frames)), v.fps, tps)
    # one <|vision_start|> per temporal patch, each right after its "<t seconds>"; none around the whole video
    assert (ids == cfg.vision_start_token_id).sum() == len(times)
    timed = (ours.modality_BT[0] == TEXT) & (ours.frame_BT[0] >= 0)
    seen = torch.zeros_like(timed)
    for k, span in enumerate(_time_spans(ids, lm, [f"<{t:.1f} seconds>" for t in times])):
        text = ids[span]
        assert tok.decode(text) == f"<{times[k]:.1f} seconds>"
        assert len(text) < len(tok.decode(text))  # merged: fewer tokens than characters
        assert (ours.frame_BT[0][span] == k * tps).all(), (k, ours.frame_BT[0][span])
        assert torch.equal(ours.time_BT[0][span], torch.full((len(text),), v.timestamps[k * tps]))
        assert (ours.modality_BT[0][span] == TEXT).all()
        seen[span] = True
    assert torch.equal(timed, seen)  # no other text token carries a frame


@pytest.mark.parametrize("family", FAMILIES)
def test_an_image_and_a_video_in_one_question(bpe, family) -> None:
    """Text, an image, text, a video: each kind's k-th placeholder is that kind's k-th medium (LLaVA-OneVision's
    template writes the image, then the video, then the text): ids, both pixel tensors and the tags (1 image,
    2 video) equal the processor's."""
    lm = bpe(family)
    v = _video(4, _side(family, lm), seed=5, fps=2.0)
    turns = (Turn("user", ("look :", Media("image", 0), "and", Media("video", 0), "what happens ?")),)
    s = Sample(turns, [_image(112, 84)], [v])
    ours = lm.adapter.batch(lm, [s])
    frames = np.stack([np.asarray(f) for f in v.frames])
    from transformers.video_utils import VideoMetadata

    msgs = [{"role": "user", "content": [{"type": "text", "text": "look :"}, {"type": "image", "image": s.images[0]},
                                         {"type": "text", "text": "and"}, {"type": "video", "video": frames},
                                         {"type": "text", "text": "what happens ?"}]}]
    vk = {"do_resize": False, "do_convert_rgb": False}  # the frames only: the image goes the processor's usual way
    if family != "llava_onevision":
        vk.update(do_sample_frames=False, video_metadata=[VideoMetadata(total_num_frames=4, fps=v.fps,
                                                                        frames_indices=[0, 1, 2, 3])])
    pk = {"return_mm_token_type_ids": True, "videos_kwargs": vk}
    theirs = video_processor(family, lm).apply_chat_template(msgs, chat_template=lm.prompt.text, tokenize=True,
                                                             return_dict=True, return_tensors="pt",
                                                             add_generation_prompt=True, processor_kwargs=pk)
    assert ours.inputs["input_ids"].tolist() == theirs["input_ids"].tolist()
    assert torch.equal(ours.inputs["pixel_values"], theirs["pixel_values"].to(ours.inputs["pixel_values"].dtype))
    torch.testing.assert_close(ours.inputs["pixel_values_videos"], theirs["pixel_values_videos"], atol=1e-5, rtol=0)
    mm = theirs["mm_token_type_ids"]
    want = _want_tags(family, lm, ours, {**theirs, "mm_token_type_ids": torch.where(mm == 2, 0, mm)})
    want[mm == 2] = VIDEO
    if family == "llava_onevision":  # the video's closing newline (test_video_onevision: the model's image_newline)
        want[0, torch.nonzero(mm[0] == 2)[-1]] = SPECIAL
    assert torch.equal(ours.modality_BT, want), (ours.modality_BT, want)
    assert (ours.video_index_BT[0][ours.frame_BT[0] >= 0] == 0).all()
    assert (ours.image_index_BT[0][want[0] == 1] == 0).all()


def test_a_native_qwen3_vl_extraction_stores_the_timestamp_text_with_its_frame(tmp_path, monkeypatch) -> None:
    """Through a real extraction of the BPE Qwen3-VL checkpoint: the store records the native template, and the
    text tokens it stores with a frame are exactly the processor's ``<t seconds>`` tokens, each with the frame of
    the patch the processor puts it before and that frame's ``time_ms``."""
    path = build_bpe_model("qwen3_vl", tmp_path / "model")
    lm = load_model(ModelSpec(path=path, device="cpu", dtype="float32"))
    videos = [_video(n, _side("qwen3_vl", lm), seed=n, fps=2.0) for n in (4, 3)]
    turns = (Turn("user", (Media("video", 0), "what happens ?")),)
    src = RecordList([Record(i, str(i), None, "what happens ?", videos=[v], turns=turns)
                      for i, v in enumerate(videos)])
    monkeypatch.setattr(extract_run, "open_source", lambda data, *a, **k: src)
    monkeypatch.setattr(worker, "open_source", lambda data, *a, **k: src)
    spec = spec_from_dict(extract_spec(tmp_path, model=path, extract={"batch_size": 2, "key_dtype": "float32"},
                                       data={"shard_size": 2}))
    run_job(spec, show_bar=False)
    store = kscale.store.open(spec.output.path)
    assert store.attrs["prompt_template"]["kind"] == "native"
    assert store.attrs["prompt_template"]["template"] == TEMPLATES["qwen3_vl"]
    txt = store.tokens("text")
    tps = lm.image_processor.temporal_patch_size
    proc = video_processor("qwen3_vl", lm)
    for sid, v in enumerate(videos):
        ids = _theirs("qwen3_vl", lm, _sample(v, answer=False), add_generation_prompt=True)["input_ids"][0]
        times = proc._calculate_timestamps(list(range(len(v.frames))), v.fps, tps)
        want_pos, want_frame = [], []
        for k, span in enumerate(_time_spans(ids, lm, [f"<{t:.1f} seconds>" for t in times])):
            want_pos += list(range(span.start, span.stop))
            want_frame += [k * tps] * (span.stop - span.start)
        sel = (txt["sample_id"] == sid) & (txt["frame"] >= 0)
        order = np.argsort(txt["position"][sel])
        assert txt["position"][sel][order].tolist() == want_pos
        assert txt["frame"][sel][order].tolist() == want_frame
        assert np.array_equal(txt["time_ms"][sel][order], np.round(np.array(v.timestamps)[want_frame] * 1000))
