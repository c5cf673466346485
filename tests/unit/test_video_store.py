"""Video records through a real extraction: the store's video columns (``video_index``, ``frame``,
``time_ms``) per token, video keys against transformers' own k_proj, and stores written before the video
columns still read (their video columns read as -1).

The records come from an in-memory source (``open_source`` patched): reading videos from files is the data
sources' work (``kscale.data.video.load_video`` turns a frame folder or an animated file into a ``Video``).
"""

from __future__ import annotations

import numpy as np
import pytest

import kscale.store
from kscale.data.records import Record, RecordList
from kscale.extract import run as extract_run
from kscale.extract import worker
from kscale.models import load_model
from kscale.models.inputs import Media, Turn
from kscale.runner import run_job
from kscale.spec import spec_from_dict
from tests.conftest import extract_spec
from tests.unit.test_families_qwen import _transformers_keys
from tests.unit.test_processors import _image
from tests.unit.test_video_qwen import _video


def _records(family: str) -> RecordList:
    side = 64 if family.startswith("qwen3") else 56
    recs = []
    for i in range(3):
        v = _video(3 + i, side, seed=i, fps=2.0 + i)
        turns = (Turn("user", (Media("image", 0), "and", Media("video", 0), "what is it ?")),)
        recs.append(Record(i, str(i), _image(56, 56, seed=i), "what is it ?", videos=[v], turns=turns))
    return RecordList(recs)


def _extract(tmp_path, family: str, monkeypatch, legacy: bool = False):
    src = _records(family)
    monkeypatch.setattr(extract_run, "open_source", lambda data, *a, **k: src)
    monkeypatch.setattr(worker, "open_source", lambda data, *a, **k: src)
    if legacy:  # a store created before the video columns: its root attrs list no token_fields
        orig = extract_run.root_attrs
        monkeypatch.setattr(extract_run, "root_attrs",
                            lambda *a, **k: {k_: v for k_, v in orig(*a, **k).items() if k_ != "token_fields"})
    spec = spec_from_dict(extract_spec(tmp_path, model=f"debug:{family}",
                                       extract={"batch_size": 2, "key_dtype": "float32"}, data={"shard_size": 2}))
    run_job(spec, show_bar=False)
    return spec, src, kscale.store.open(spec.output.path)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_video_tokens_are_stored_with_their_frame_and_time(tmp_path, family, monkeypatch) -> None:
    spec, src, store = _extract(tmp_path, family, monkeypatch)
    lm = load_model(spec.model)
    vid = store.tokens("video")
    assert len(vid["sample_id"]) > 0
    for sid in range(len(src)):
        v = src.get(sid).videos[0]
        sel = vid["sample_id"] == sid
        b = lm.adapter.batch(lm, [src.get(sid).sample(with_answer=False)])
        want_frames = b.frame_BT[0][b.modality_BT[0] == 2].numpy()
        assert np.array_equal(vid["frame"][sel], want_frames)
        assert set(vid["frame"][sel]) == set(range(0, len(v.frames), 2))  # each temporal patch's first frame
        assert (vid["video_index"][sel] == 0).all()
        assert np.array_equal(vid["time_ms"][sel], np.round(np.array(v.timestamps)[vid["frame"][sel]] * 1000))
        ref, _ = _transformers_keys(lm, b.inputs)  # video keys equal transformers' own k_proj (k_norm)
        pos = vid["position"][sel]
        for li in store.layers:
            np.testing.assert_allclose(store.keys(li, "video").compute()[sel], ref[li].numpy()[pos], atol=1e-5, rtol=0)
    img, txt = store.tokens("image"), store.tokens("text")
    assert (img["video_index"] == -1).all() and (img["frame"] == -1).all() and (img["time_ms"] == -1).all()
    timed = txt["frame"] >= 0  # Qwen3-VL's "<t seconds>" text carries its frame
    assert timed.any() == family.startswith("qwen3")
    assert (txt["video_index"][timed] == 0).all() and (txt["time_ms"][timed] >= 0).all()
    col = store.token_column("video", "time_ms").compute()
    assert np.array_equal(col, vid["time_ms"])


def test_a_store_without_video_columns_reads_them_as_minus_one(tmp_path, monkeypatch) -> None:
    spec, _, store = _extract(tmp_path, "qwen2_5_vl", monkeypatch, legacy=True)
    assert "token_fields" not in store.attrs
    vid = store.tokens("video")
    assert len(vid["sample_id"]) > 0 and (vid["frame"] == -1).all() and (vid["video_index"] == -1).all()
    assert (store.token_column("video", "time_ms").compute() == -1).all()
    assert (store.column_at("video", "frame", np.arange(3)) == -1).all()
    # the other columns read as before: positions and rope rows of the legacy layout
    assert np.array_equal(np.sort(store.tokens("video")["position"]), np.sort(vid["position"]))
    assert store.tokens("video")["rope_pos"].shape[1] == 3


def test_a_qwen3_vl_store_of_the_old_video_tokens_is_never_resumed_into(tmp_path, monkeypatch) -> None:
    """Qwen3-VL's video block lost its outer vision pair (transformers 5.25, docs/models.md footnote 1), so a
    store whose shards hold the old tokens (revision 1, written before the store recorded one) must not get new
    shards of the other form: an unfinished one is refused, naming the field, and no shard is written; a store of
    this revision resumes its missing shard."""
    from kscale.models import get_adapter
    from kscale.output import OutputError
    from kscale.store.layout import marker_names, marker_path

    orig = extract_run.root_attrs

    def old_attrs(*a, **k):
        attrs = orig(*a, **k)
        return {**attrs, "model": {k_: v for k_, v in attrs["model"].items() if k_ != "tokens_revision"}}

    cls = type(get_adapter("qwen3_vl"))
    with monkeypatch.context() as m:  # the kscale before: revision 1, not recorded
        m.setattr(extract_run, "root_attrs", old_attrs)
        m.setattr(cls, "tokens_revision", 1)
        spec, _, store = _extract(tmp_path, "qwen3_vl", monkeypatch)
    assert "tokens_revision" not in store.attrs["model"] and cls.tokens_revision == 2
    path = spec.output.path
    first, *rest = marker_names(path)
    marker_path(path, first).unlink()  # an unfinished store: one shard still to do
    with pytest.raises(OutputError, match=r"model\.tokens_revision: .* holds qwen3_vl tokens of revision 1; "
                                          r"this kscale renders revision 2"):
        run_job(spec, show_bar=False)
    assert marker_names(path) == rest  # nothing written

    new = tmp_path / "new"
    new.mkdir()
    spec2, _, store2 = _extract(new, "qwen3_vl", monkeypatch)
    assert store2.attrs["model"]["tokens_revision"] == 2
    names = marker_names(spec2.output.path)
    marker_path(spec2.output.path, names[0]).unlink()
    run_job(spec2, show_bar=False)  # the same revision: resumes
    assert marker_names(spec2.output.path) == names
