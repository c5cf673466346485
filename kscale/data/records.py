"""Records, sources and the deterministic shard plan (see package docstring)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image


@dataclass
class Record:
    sample_id: int  # position in the source: global and stable for a given spec
    source_id: str  # the record's own id (id_field) or str(sample_id)
    image: Image.Image | None
    text: str
    answer: str | None = None
    error: str | None = None  # why this record cannot be used; None when it can
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Shard:
    index: int
    start: int  # first sample id
    stop: int  # one past the last sample id

    @property
    def name(self) -> str:
        return f"s{self.index:06d}"


class Source(Protocol):
    def __len__(self) -> int: ...

    def get(self, i: int) -> Record: ...


def plan_shards(n_samples: int, shard_size: int) -> list[Shard]:
    return [Shard(k, s, min(s + shard_size, n_samples)) for k, s in enumerate(range(0, n_samples, shard_size))]


def open_source(dspec) -> Source:
    """The source named by a DataSpec (``limit`` applied)."""
    if dspec.source == "generated":
        from kscale.data.generated import GeneratedSource

        src: Source = GeneratedSource(dspec.generated)
    elif dspec.source == "manifest":
        src = ManifestSource(dspec)
    else:
        src = HFDiskSource(dspec)
    return _Limited(src, dspec.limit) if dspec.limit is not None else src


class _Limited:
    def __init__(self, src: Source, limit: int):
        self.src, self.n = src, min(limit, len(src))

    def __len__(self) -> int:
        return self.n

    def get(self, i: int) -> Record:
        return self.src.get(i)


def load_image(ref: Any, base: Path | None = None) -> tuple[Image.Image | None, str | None]:
    """(RGB image, None) or (None, reason). ``ref`` is a path, bytes, a dict with bytes/path, or a PIL image."""
    try:
        if isinstance(ref, Image.Image):
            img = ref
        elif isinstance(ref, dict):
            if ref.get("bytes"):
                img = Image.open(io.BytesIO(ref["bytes"]))
            elif ref.get("path"):
                return load_image(ref["path"], base)
            else:
                return None, "image field is an empty mapping"
        elif isinstance(ref, (bytes, bytearray)):
            img = Image.open(io.BytesIO(ref))
        elif isinstance(ref, str):
            p = Path(ref) if base is None or Path(ref).is_absolute() else base / ref
            if not p.is_file():
                return None, f"missing image file {str(p)!r}"
            img = Image.open(p)
        else:
            return None, f"unsupported image value of type {type(ref).__name__}"
        img.load()
        return img.convert("RGB"), None
    except Exception as e:  # noqa: BLE001 - any decoder failure means a corrupt image
        return None, f"corrupt image ({type(e).__name__}: {str(e)[:160]})"


def _record(i: int, row: dict, dspec, base: Path | None, where: str) -> Record:
    sid = str(row.get(dspec.id_field, i)) if dspec.id_field else str(i)
    text = row.get(dspec.text_field)
    answer = row.get(dspec.answer_field) if dspec.answer_field else None
    rec = Record(i, sid, None, text if isinstance(text, str) else "", None if answer is None else str(answer))
    used = {dspec.image_field, dspec.text_field, dspec.answer_field, dspec.id_field}
    rec.meta = {k: v for k, v in row.items() if k not in used}  # e.g. choices, distractor, conflicting claim
    if dspec.text_field not in row:
        rec.error = f"{where}: missing field {dspec.text_field!r}"
    elif not isinstance(text, str) or not text.strip():
        rec.error = f"{where}: empty text in field {dspec.text_field!r}"
    elif dspec.image_field not in row:
        rec.error = f"{where}: missing field {dspec.image_field!r} (use null for a text-only sample)"
    elif row[dspec.image_field] is not None:
        rec.image, err = load_image(row[dspec.image_field], base)
        if err:
            rec.error = f"{where}: {err}"
    return rec


class ManifestSource:
    """JSONL, one record per line; image paths relative to the manifest's folder."""

    def __init__(self, dspec):
        self.dspec = dspec
        self.path = Path(dspec.path).expanduser()
        self.lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]

    def __len__(self) -> int:
        return len(self.lines)

    def get(self, i: int) -> Record:
        where = f"{self.path.name} line {i + 1}"
        try:
            row = json.loads(self.lines[i])
        except json.JSONDecodeError as e:
            return Record(i, str(i), None, "", error=f"{where}: invalid JSON ({e.msg})")
        if not isinstance(row, dict):
            return Record(i, str(i), None, "", error=f"{where}: expected a JSON object")
        return _record(i, row, self.dspec, self.path.parent, where)


class HFDiskSource:
    """A Hugging Face dataset saved with ``save_to_disk`` (a Dataset, or a DatasetDict with ``split``)."""

    def __init__(self, dspec):
        from datasets import DatasetDict, load_from_disk

        self.dspec = dspec
        ds = load_from_disk(str(Path(dspec.path).expanduser()))
        if isinstance(ds, DatasetDict):
            if dspec.split is None or dspec.split not in ds:
                raise ValueError(f"data.split: {dspec.split!r} is not a split of {dspec.path!r} "
                                 f"(splits: {', '.join(ds)})")
            ds = ds[dspec.split]
        self.ds = ds
        self.base = Path(dspec.path).expanduser()

    def __len__(self) -> int:
        return len(self.ds)

    def get(self, i: int) -> Record:
        return _record(i, self.ds[i], self.dspec, self.base, f"{self.dspec.path} row {i}")
