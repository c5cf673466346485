"""Image counterfactuals and the extra answer candidates of a record.

Each counterfactual changes only the image: the same text, and an image of the same size (so the
processor gives the same number of image tokens), except ``none`` which removes the image (the blind
baseline of the language prior). Everything is a pure function of (seed, sample id), so any shard can
be recomputed anywhere with the same result.

- ``blank``: one constant colour (``bias.blank_rgb``);
- ``noise``: uniform random pixels, seeded by (seed, sample id);
- ``swapped``: the image of another sample of the dataset, ``donor = derangement(n, seed)[sample id]``
  (never the sample itself), resized to this sample's size. A donor without a usable image passes the
  turn to the next one along the derangement's cycle.

Candidates: the correct answer first, then distractors (multiple choice) and the text's claim (evidence
conflict). Generated records carry the claim in ``meta``; manifest and saved-dataset records keep their
extra fields in the raw row, read here by field name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from PIL import Image

from kscale.bias.metrics import derangement
from kscale.data.records import Record


def blank_image(like: Image.Image, rgb: list[int]) -> Image.Image:
    return Image.new("RGB", like.size, tuple(int(v) for v in rgb))


def noise_image(like: Image.Image, seed: int, sample_id: int) -> Image.Image:
    rng = np.random.default_rng([seed, sample_id, 0x4E])
    w, h = like.size
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")


def swap_donor(source, sample_id: int, seed: int) -> tuple[int, Image.Image]:
    """(donor sample id, its image resized to the sample's size) for the ``swapped`` condition."""
    n = len(source)
    donor_of = derangement(n, seed)
    j = int(donor_of[sample_id])
    for _ in range(n - 1):
        rec = source.get(j)
        if rec.error is None and rec.image is not None and j != sample_id:
            return j, rec.image
        j = int(donor_of[j])
    raise ValueError(f"sample {sample_id}: no other sample with a usable image to swap in")


def condition_image(rec: Record, condition: str, seed: int, blank_rgb: list[int],
                    donor_image: Image.Image | None) -> Image.Image | None:
    """The image ``rec`` is scored with under ``condition``."""
    if condition == "real":
        return rec.image
    if condition == "none":
        return None
    if condition == "blank":
        return blank_image(rec.image, blank_rgb)
    if condition == "noise":
        return noise_image(rec.image, seed, rec.sample_id)
    assert condition == "swapped" and donor_image is not None
    return donor_image.convert("RGB").resize(rec.image.size, Image.BILINEAR)


@dataclass
class Candidates:
    """Answers scored for one record: ``texts[0]`` is correct; ``claim`` indexes the text's claim or is None."""

    texts: list[str]
    n_distractors: int
    claim: int | None


def raw_row(source, sample_id: int) -> dict:
    """The record's raw fields where the source keeps them (manifest line, saved-dataset row), else {}."""
    src = getattr(source, "src", source)  # unwrap ``limit``
    if hasattr(src, "lines"):
        try:
            row = json.loads(src.lines[sample_id])
        except json.JSONDecodeError:
            return {}
        return row if isinstance(row, dict) else {}
    if hasattr(src, "ds"):
        return dict(src.ds[sample_id])
    return {}


def _as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if v is not None and str(v).strip()]
    return [str(value)] if str(value).strip() else []


def candidates(rec: Record, row: dict, distractor_field: str | None, claim_field: str | None) -> Candidates:
    """The correct answer, then distractors, then the text's claim (each once, never equal to the answer)."""
    fields = {**row, **rec.meta}
    texts = [rec.answer]
    for d in _as_list(fields.get(distractor_field)) if distractor_field else []:
        if d not in texts:
            texts.append(d)
    n_distractors = len(texts) - 1
    claim = None
    claims = _as_list(fields.get(claim_field)) if claim_field else []
    if claims and claims[0] != rec.answer:
        if claims[0] not in texts:
            texts.append(claims[0])
        claim = texts.index(claims[0])
    return Candidates(texts, n_distractors, claim)
