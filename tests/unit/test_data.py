"""Data sources: generated data is a pure function of (seed, index); manifests and saved HF datasets."""

import json

import numpy as np
from PIL import Image

from kscale.data import open_source, plan_shards
from kscale.spec import DataSpec, GeneratedDataSpec


def test_shard_plan_is_deterministic_and_covers_everything():
    a, b = plan_shards(50, 16), plan_shards(50, 16)
    assert a == b and [s.name for s in a] == ["s000000", "s000001", "s000002", "s000003"]
    assert [(s.start, s.stop) for s in a] == [(0, 16), (16, 32), (32, 48), (48, 50)]


def test_generated_is_reproducible_and_answers_are_in_the_image():
    src = open_source(DataSpec(generated=GeneratedDataSpec(n_samples=30, image_size=64, tasks=["color", "conflict"])))
    r1, r2 = src.get(7), open_source(DataSpec(generated=GeneratedDataSpec(
        n_samples=30, image_size=64, tasks=["color", "conflict"]))).get(7)
    assert np.array_equal(np.asarray(r1.image), np.asarray(r2.image)) and r1.text == r2.text
    from kscale.data.generated import COLORS

    for i in range(30):
        r = src.get(i)
        assert r.answer == r.meta["color"]
        px = np.asarray(r.image).reshape(-1, 3)
        assert (np.abs(px - np.array(COLORS[r.meta["color"]])).sum(1) == 0).any()  # the colour is drawn
        if r.meta["task"] == "conflict":
            assert r.meta["text_claim"] != r.answer and r.meta["text_claim"] in r.text


def test_manifest_and_hf_disk_sources(tmp_path):
    Image.new("RGB", (20, 20), "blue").save(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"image": "a.png", "text": "hi", "answer": "blue", "id": "x1"}) + "\n" + "{not json\n")
    src = open_source(DataSpec(source="manifest", path=str(tmp_path / "m.jsonl"), id_field="id"))
    assert len(src) == 2
    r = src.get(0)
    assert r.error is None and r.image.size == (20, 20) and r.answer == "blue" and r.source_id == "x1"
    assert "m.jsonl line 2: invalid JSON" in src.get(1).error

    from datasets import Dataset, DatasetDict, Features, Image as HFImage, Value

    ds = Dataset.from_dict({"image": [str(tmp_path / "a.png"), str(tmp_path / "gone.png")], "text": ["q1", "q2"]},
                           features=Features({"image": HFImage(), "text": Value("string")}))
    DatasetDict({"train": ds.select([0]), "test": ds.select([0])}).save_to_disk(str(tmp_path / "hf"))
    hf = open_source(DataSpec(source="hf_disk", path=str(tmp_path / "hf"), split="test"))
    assert len(hf) == 1 and hf.get(0).image.size == (20, 20) and hf.get(0).text == "q1"
    import pytest

    with pytest.raises(ValueError, match="data.split"):
        open_source(DataSpec(source="hf_disk", path=str(tmp_path / "hf")))
