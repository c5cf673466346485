"""LLaVA-OneVision video (``debug:llava_onevision``) against transformers' processor and the model.

``LlavaOnevisionVideoProcessor`` imports without torchvision but normalises with torchvision's ``normalize``
(absent here); with that formula ((x - mean) / std per channel) standing in and frames already at the video
size (``do_resize=False``: the torchvision resize is not needed), the real processor class
(``LlavaOnevisionProcessor``: ``<video>`` x (frames x pooled patches + 1), ``mm_token_type_ids``) is the
reference for ``input_ids`` and ``pixel_values_videos``. The model is the reference for where its video
features and its closing ``image_newline`` land (a hook on the language model's input embeddings), and a real
extraction of video records stores keys equal to the model's own ``k_proj`` outputs.
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
from kscale.models.debug import debug_model_dir
from kscale.models.inputs import Media, Sample, Turn
from kscale.runner import run_job
from kscale.spec import ModelSpec, spec_from_dict
from tests.conftest import extract_spec
from tests.unit.test_processors import _image
from tests.unit.test_video_qwen import _video

PROMPT = "<|im_start|>user\n<video>\nwhat happens ?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lm():
    return load_model(ModelSpec(path=debug_model_dir("llava_onevision"), device="cpu", dtype="float32"))


def _processor(lm, monkeypatch):
    import transformers.image_processing_backends as backends
    from transformers import LlavaOnevisionProcessor
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    def normalize(x, mean, std, inplace=False):  # torchvision.transforms.v2.functional.normalize's formula
        return (x - torch.as_tensor(mean, dtype=x.dtype).view(-1, 1, 1)) / torch.as_tensor(std, dtype=x.dtype).view(-1, 1, 1)

    monkeypatch.setattr(backends, "tvF", types.SimpleNamespace(normalize=normalize), raising=False)
    ip, cfg = lm.image_processor, lm.model.config
    vp = LlavaOnevisionVideoProcessor(size=dict(ip.size), image_mean=list(ip.image_mean), image_std=list(ip.image_std))

    class _Proc(LlavaOnevisionProcessor):
        def check_argument_for_proper_class(self, name, arg):  # the video class check needs torchvision
            return None

    return _Proc(image_processor=ip, tokenizer=lm.tokenizer, video_processor=vp,
                 num_image_tokens=(cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2,
                 vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                 vision_aspect_ratio=cfg.vision_aspect_ratio)


def _lm_inputs(lm, inputs) -> torch.Tensor:
    seen = {}
    h = lm.model.model.language_model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.__setitem__("e", kw["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.inference_mode():
            lm.model(**inputs)
    finally:
        h.remove()
    return seen["e"]


@pytest.mark.parametrize("n_frames", [4, 1])
def test_video_inputs_and_tags_equal_the_processor_and_the_model(lm, monkeypatch, n_frames) -> None:
    side = lm.image_processor.size["height"]
    v = _video(n_frames, side, seed=n_frames)
    ours = lm.adapter.batch(lm, [Sample((Turn("user", (Media("video", 0), "what happens ?")),), videos=[v])])
    theirs = _processor(lm, monkeypatch)(text=[PROMPT], videos=[np.stack([np.asarray(f) for f in v.frames])],
                                         do_resize=False, do_convert_rgb=False, return_tensors="pt",
                                         return_mm_token_type_ids=True)
    for k in ("input_ids", "attention_mask"):
        assert torch.equal(ours.inputs[k], theirs[k]), k
    torch.testing.assert_close(ours.inputs["pixel_values_videos"], theirs["pixel_values_videos"], atol=1e-5, rtol=0)
    # the model: video features fill the frame tokens in order, its image_newline the last video position
    embeds = _lm_inputs(lm, ours.inputs)[0]
    with torch.inference_mode():
        feats = lm.model.model.get_video_features(
            pixel_values_videos=ours.inputs["pixel_values_videos"], vision_feature_layer=lm.model.config.vision_feature_layer,
            vision_feature_select_strategy=lm.model.config.vision_feature_select_strategy).pooler_output[0]
    mm = theirs["mm_token_type_ids"][0]
    pos = torch.nonzero(mm == 2)[:, 0]
    assert len(pos) == len(feats) == n_frames * lm.adapter.pooled_patches(lm.model.config) + 1
    torch.testing.assert_close(embeds[pos], feats, atol=1e-6, rtol=0)
    newline = (embeds == lm.model.model.image_newline).all(-1)
    special = torch.tensor(sorted(set(lm.tokenizer.all_special_ids) - {lm.tokenizer.unk_token_id}))
    want = torch.full(mm.shape, TEXT, dtype=torch.int8)
    want[torch.isin(theirs["input_ids"][0], special)] = SPECIAL
    want[mm == 2] = VIDEO
    want[newline] = SPECIAL
    assert int(newline.sum()) == 1 and bool(newline[pos[-1]])
    assert torch.equal(ours.modality_BT[0], want)
    per = lm.adapter.pooled_patches(lm.model.config)
    assert ours.frame_BT[0][pos].tolist() == [j // per for j in range(len(pos) - 1)] + [-1]
    assert (ours.video_index_BT[0][pos[:-1]] == 0).all() and ours.video_index_BT[0][pos[-1]] == -1
    assert torch.equal(ours.time_BT[0][pos[:-1]], torch.tensor(v.timestamps)[ours.frame_BT[0][pos[:-1]].long()])


def test_frame_counts_must_match_within_a_batch(lm) -> None:
    side = lm.image_processor.size["height"]
    samples = [Sample((Turn("user", (Media("video", 0), "what ?")),), videos=[_video(n, side)]) for n in (2, 3)]
    with pytest.raises(ValueError, match=r"frame counts differ \(\[2, 3\]\)"):
        lm.adapter.batch(lm, samples)


def test_video_records_extract_keys_equal_k_proj(lm, tmp_path, monkeypatch) -> None:
    """A real extraction of image + video records: video tokens stored with their frame, keys equal the
    model's own k_proj outputs, the closing newline stored as special."""
    side = lm.image_processor.size["height"]
    recs = []
    for i in range(3):
        turns = (Turn("user", (Media("image", 0), "and", Media("video", 0), "what is it ?")),)
        recs.append(Record(i, str(i), _image(56, 56, seed=i), "what is it ?", videos=[_video(3, side, seed=i)],
                           turns=turns))
    src = RecordList(recs)
    monkeypatch.setattr(extract_run, "open_source", lambda data, *a, **k: src)
    monkeypatch.setattr(worker, "open_source", lambda data, *a, **k: src)
    spec = spec_from_dict(extract_spec(tmp_path, model="debug:llava_onevision",
                                       extract={"batch_size": 2, "key_dtype": "float32"}, data={"shard_size": 2}))
    run_job(spec, show_bar=False)
    store = kscale.store.open(spec.output.path)
    vid = store.tokens("video")
    per = lm.adapter.pooled_patches(lm.model.config)
    H, D = lm.info.num_kv_heads, lm.info.head_dim
    layers = lm.model.model.language_model.layers
    for sid in range(len(src)):
        sel = vid["sample_id"] == sid
        assert sel.sum() == 3 * per and sorted(set(vid["frame"][sel].tolist())) == [0, 1, 2]
        b = lm.adapter.batch(lm, [Sample(src.get(sid).turns, [src.get(sid).image], src.get(sid).videos)])
        seen = {}
        hooks = [layer.self_attn.k_proj.register_forward_hook(lambda _m, _a, out, i=i: seen.__setitem__(i, out))
                 for i, layer in enumerate(layers)]
        try:
            with torch.inference_mode():
                lm.model(**b.inputs)
        finally:
            for h in hooks:
                h.remove()
        for layer in store.layers:
            ref = seen[layer][0].reshape(-1, H, D).numpy()
            np.testing.assert_allclose(store.keys(layer, "video").compute()[sel], ref[vid["position"][sel]],
                                       atol=1e-5, rtol=0)
        last = int(np.flatnonzero(b.inputs["input_ids"][0].numpy() == lm.model.config.video_token_id)[-1])
        sp = store.tokens("special")
        assert last in set(sp["position"][sp["sample_id"] == sid].tolist())  # the closing newline
