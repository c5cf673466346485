"""Videos from data sources (``data.video_field``): a manifest naming a frame folder and an animated GIF goes
through a real extraction; the store's video-tagged keys, frames and times equal a direct adapter call on the
same videos read with :func:`kscale.data.video.load_video` and a sample written by hand, and the keys
transformers' own k_proj gives for that batch. A corrupt video is that record's error, like a corrupt image.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import kscale.store
from kscale.data import open_source
from kscale.data.video import load_video
from kscale.models import VIDEO, load_model
from kscale.models.inputs import Media, Sample, Turn
from kscale.runner import run_job
from kscale.spec import spec_from_dict
from tests.conftest import extract_spec
from tests.unit.test_families_qwen import _transformers_keys

FPS, MAX_FRAMES = 2.0, 3


def _frames(n: int, side: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    (d / "clip").mkdir()
    for i, im in enumerate(_frames(4, 56, 1)):  # a frame folder: 1 frame per second
        im.save(d / "clip" / f"{i:03d}.png")
    gif = _frames(5, 56, 2)
    gif[0].save(d / "anim.gif", save_all=True, append_images=gif[1:], duration=[200, 300, 200, 400, 200], loop=0)
    _frames(1, 56, 3)[0].save(d / "img.png")
    (d / "broken.gif").write_bytes(b"GIF89a not really")
    rows = [{"text": "what is <video> ?", "video": "clip", "image": None},
            {"text": "what color", "video": "anim.gif", "image": "img.png"},
            {"text": "broken", "video": "broken.gif", "image": None},
            {"text": "no video here", "video": None, "image": "img.png"}]
    (d / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _spec(tmp_path, data, family="qwen2_5_vl"):
    return spec_from_dict(extract_spec(
        tmp_path, model=f"debug:{family}", extract={"batch_size": 2, "key_dtype": "float32"},
        data={"source": "manifest", "path": str(data / "m.jsonl"), "video_field": "video", "video_fps": FPS,
              "max_frames": MAX_FRAMES, "shard_size": 2}))


def _by_hand(data) -> dict[int, Sample]:
    """The samples rows 0 and 1 should become, built without kscale's data code."""
    clip = load_video(data / "clip", FPS, MAX_FRAMES)
    anim = load_video(data / "anim.gif", FPS, MAX_FRAMES)
    img = Image.open(data / "img.png").convert("RGB")
    return {0: Sample((Turn("user", ("what is ", Media("video", 0), " ?")),), [], [clip]),
            1: Sample((Turn("user", (Media("image", 0), Media("video", 0), "what color")),), [img], [anim])}


def test_records_carry_their_videos(tmp_path, data) -> None:
    src = open_source(_spec(tmp_path, data).data)
    want = _by_hand(data)
    for i in (0, 1):
        rec = src.get(i)
        assert rec.error is None
        got = rec.sample(with_answer=False)
        assert got.turns == want[i].turns
        assert [v.timestamps for v in got.videos] == [v.timestamps for v in want[i].videos]
        assert len(got.videos[0].frames) <= MAX_FRAMES
    # GIF frames start at 0, .2, .5, .7, 1.1 s: at 0, .5, 1 s frames 0, 2, 3 show, each keeping its own start
    assert src.get(1).videos[0].timestamps == [0.0, 0.5, 0.7]
    assert "corrupt video" in src.get(2).error and "broken.gif" not in (src.get(0).error or "")
    assert src.get(3).videos == [] and src.get(3).turns is None  # one image, no video: the simple sample


def test_video_placeholder_without_video_field_is_text(tmp_path, data) -> None:
    d = _spec(tmp_path, data).data
    rec = open_source(type(d)(**{**{f: getattr(d, f) for f in d.__slots__}, "video_field": None})).get(0)
    assert rec.error is None and rec.videos == [] and "<video>" in rec.text


def test_extraction_stores_video_keys_equal_to_a_direct_adapter_call(tmp_path, data) -> None:
    spec = _spec(tmp_path, data)
    run_job(spec, show_bar=False)
    store = kscale.store.open(spec.output.path)
    errors = store.errors()
    assert [e["sample_id"] for e in errors] == [2] and "corrupt video" in errors[0]["reason"]
    lm = load_model(spec.model)
    vid = store.tokens("video")
    for sid, sample in _by_hand(data).items():
        b = lm.adapter.batch(lm, [sample])
        is_video = b.modality_BT[0] == VIDEO
        sel = vid["sample_id"] == sid
        assert sel.sum() == int(is_video.sum()) > 0
        assert np.array_equal(vid["position"][sel], np.flatnonzero(is_video.numpy()))
        assert np.array_equal(vid["frame"][sel], b.frame_BT[0][is_video].numpy())
        assert np.array_equal(vid["time_ms"][sel], np.round(b.time_BT[0][is_video].numpy() * 1000))
        ref, _ = _transformers_keys(lm, b.inputs)
        for li in store.layers:
            np.testing.assert_allclose(store.keys(li, "video").compute()[sel], ref[li].numpy()[vid["position"][sel]],
                                       atol=1e-5, rtol=0)
    assert set(vid["sample_id"]) == {0, 1}


def test_videos_for_a_family_without_video_are_refused(tmp_path, data) -> None:
    spec = _spec(tmp_path, data, family="llava")
    with pytest.raises(ValueError, match="data.video_field: 'video' names videos, but model family 'llava'"):
        run_job(spec, show_bar=False)
    assert not (tmp_path / "store").exists()


def test_a_changed_frame_behind_an_unchanged_manifest_is_data_changed(tmp_path, data) -> None:
    import os
    import shutil

    from kscale.output import DataChanged

    d = tmp_path / "d"
    shutil.copytree(data, d)
    raw = extract_spec(tmp_path, model="debug:qwen2_5_vl", extract={"batch_size": 2, "key_dtype": "float32"},
                       data={"source": "manifest", "path": str(d / "m.jsonl"), "video_field": "video",
                             "video_fps": FPS, "max_frames": MAX_FRAMES, "shard_size": 2, "limit": 1},
                       output={"path": str(tmp_path / "store"), "if_exists": "resume"})
    run_job(spec_from_dict(raw), show_bar=False)
    frame = d / "clip" / "001.png"
    st = frame.stat()
    _frames(1, 56, 9)[0].save(frame)
    os.utime(frame, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(DataChanged, match=r"a video that the manifest .*m\.jsonl' names changed"):
        run_job(spec_from_dict(raw), show_bar=False)
