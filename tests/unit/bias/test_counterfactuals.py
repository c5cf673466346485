"""Counterfactuals are what they claim: only the image changes (same text tokens, same image token count),
swapped images come from other samples (a seeded derangement), noise is seeded, none has no image tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kscale.bias.candidates import candidates, raw_row
from kscale.data.records import Record
from kscale.models import IMAGE, PAD, TEXT
from kscale.scoring import condition_image, swap_donor
from tests.unit.bias.conftest import records

RGB = [128, 128, 128]


@pytest.fixture(params=["qwen", "llava"])
def model(request):
    return request.getfixturevalue(request.param)


def _batch(lm, recs, images):
    return lm.adapter.build_batch(lm, images, [r.text for r in recs], [r.answer for r in recs])


def test_counterfactuals_change_only_the_image(model) -> None:
    src, recs = records(6, size=112)
    real = _batch(model, recs, [r.image for r in recs])
    pix_real = real.inputs["pixel_values"]
    for cond in ("blank", "noise", "swapped"):
        images = [condition_image(r, cond, 0, RGB, swap_donor(src, r.sample_id, 0)[1]) for r in recs]
        assert [im.size for im in images] == [r.image.size for r in recs]
        b = _batch(model, recs, images)
        assert torch.equal(b.inputs["input_ids"], real.inputs["input_ids"])  # same text and image tokens
        assert torch.equal(b.answer_mask_BT, real.answer_mask_BT)
        assert b.n_image_tokens == real.n_image_tokens and min(b.n_image_tokens) > 0
        for k in set(real.inputs) - {"pixel_values"}:
            assert torch.equal(b.inputs[k], real.inputs[k]), k
        assert not torch.equal(b.inputs["pixel_values"], pix_real)
    none = _batch(model, recs, [None] * len(recs))
    assert "pixel_values" not in none.inputs and not (none.modality_BT == IMAGE).any()
    for j in range(len(recs)):  # the same text tokens, in the same order, with and without the image
        text_real = real.inputs["input_ids"][j][real.modality_BT[j] == TEXT]
        text_none = none.inputs["input_ids"][j][none.modality_BT[j] == TEXT]
        assert torch.equal(text_real, text_none)
        assert (none.modality_BT[j] != PAD).sum() == (real.modality_BT[j] != PAD).sum() - \
            (real.modality_BT[j] == IMAGE).sum() - (2 if model.info.family == "qwen2_5_vl" else 0)


def test_blank_noise_swapped_images_are_seeded_and_right() -> None:
    src, recs = records(7, size=56)
    r = recs[2]
    blank = np.asarray(condition_image(r, "blank", 0, [10, 20, 30], None))
    assert (blank == np.array([10, 20, 30])).all()
    n1 = np.asarray(condition_image(r, "noise", 5, RGB, None))
    assert np.array_equal(n1, np.asarray(condition_image(r, "noise", 5, RGB, None)))
    assert not np.array_equal(n1, np.asarray(condition_image(r, "noise", 6, RGB, None)))
    assert not np.array_equal(n1, np.asarray(condition_image(recs[3], "noise", 5, RGB, None)))
    assert 100 < n1.mean() < 155 and n1.std() > 60  # uniform over 0..255
    donors = [swap_donor(src, i, 1)[0] for i in range(7)]
    assert sorted(donors) == list(range(7)) and all(d != i for i, d in enumerate(donors))
    assert donors == [swap_donor(src, i, 1)[0] for i in range(7)]
    d, img = swap_donor(src, 2, 1)
    sw = condition_image(r, "swapped", 1, RGB, img)
    assert np.array_equal(np.asarray(sw), np.asarray(src.get(d).image))  # same size: unchanged pixels


class _Holes:
    """A source in which some samples have no usable image."""

    def __init__(self, n, bad):
        self.src, self.bad = records(n)[0], bad

    def __len__(self):
        return len(self.src)

    def get(self, i):
        rec = self.src.get(i)
        return Record(i, rec.source_id, None, rec.text, rec.answer, "corrupt") if i in self.bad else rec


def test_swap_skips_donors_without_images_and_resizes() -> None:
    src = _Holes(6, bad={0, 1, 2, 3})
    for i in (4, 5):
        d, _ = swap_donor(src, i, 0)
        assert d == {4: 5, 5: 4}[i]
    small = Record(0, "x", records(1, size=56)[1][0].image, "t", "a")
    big = records(1, size=112)[1][0].image
    assert condition_image(small, "swapped", 0, RGB, big).size == (56, 56)


def test_candidates_from_meta_and_raw_rows(tmp_path) -> None:
    _, recs = records(3, tasks=("conflict",))
    c = candidates(recs[0], {}, "distractor", "text_claim")
    assert c.texts == [recs[0].answer, recs[0].meta["text_claim"]] and c.claim == 1 and c.n_distractors == 0
    rec = Record(0, "0", None, "q", "red")
    c = candidates(rec, {"distractor": ["blue", "red", "green"], "claim": "blue"}, "distractor", "claim")
    assert c.texts == ["red", "blue", "green"] and c.n_distractors == 2 and c.claim == 1
    assert candidates(rec, {"claim": "red"}, None, "claim").claim is None  # a claim equal to the answer is none
    import json

    from kscale.data import open_source
    from kscale.spec import DataSpec

    (tmp_path / "m.jsonl").write_text(json.dumps({"image": None, "text": "q", "answer": "a", "distractor": "b"}) + "\n")
    src = open_source(DataSpec(source="manifest", path=str(tmp_path / "m.jsonl"), limit=1))
    assert raw_row(src, 0)["distractor"] == "b"
