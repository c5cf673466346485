"""The answer candidates of a record: the correct answer, distractors and the text's claim.

Candidates: the correct answer first, then distractors (multiple choice) and the text's claim (evidence
conflict). Generated records carry the claim in ``meta``; manifest and saved-dataset records keep their
extra fields in the raw row, read here by field name. The bias worker scores every candidate under every
image condition (:func:`kscale.scoring.condition_image`).
"""

from __future__ import annotations

from dataclasses import dataclass

from kscale.data.records import Record


@dataclass
class Candidates:
    """Answers scored for one record: ``texts[0]`` is correct; ``claim`` indexes the text's claim or is None."""

    texts: list[str]
    n_distractors: int
    claim: int | None


def raw_row(source, sample_id: int) -> dict:
    """The record's raw fields where the source keeps them (manifest line, saved-dataset row), else {}."""
    src = getattr(source, "src", source)  # unwrap ``limit``
    if hasattr(src, "raw"):  # sources that read rows (manifest, parquet, hf, webdataset)
        return src.raw(sample_id)
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
