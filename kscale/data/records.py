"""Records, sources and the deterministic shard plan (see package docstring)."""

from __future__ import annotations

import io
import json
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, overload

from PIL import Image

from kscale.data import rows
from kscale.models.inputs import Sample, Turn, Video


@dataclass
class Record:
    sample_id: int  # position in the source: global and stable for a given spec
    source_id: str  # the record's own id (id_field) or str(sample_id)
    image: Image.Image | None
    text: str
    answer: str | None = None
    error: str | None = None  # why this record cannot be used; None when it can
    meta: dict[str, Any] = field(default_factory=dict)
    # Records of more than one image, of videos or of conversations (kscale.models.inputs). ``image`` is
    # then ``images[0]`` (what single-image consumers such as the bias stage read), ``text``/``answer`` the
    # first user and assistant turns' text.
    images: list[Image.Image] | None = None  # every image, in order; None: ``[image]`` (or none)
    videos: list[Video] = field(default_factory=list)
    turns: tuple[Turn, ...] | None = None  # the conversation; None: one user turn and the answer

    def sample(self, with_answer: bool = True) -> Sample:
        """The model input of this record (see :mod:`kscale.models.inputs`); ``with_answer=False`` stops
        before the first assistant turn."""
        if self.turns is None:
            s = Sample.simple(self.image, self.text, self.answer)
        else:
            images = self.images if self.images is not None else [self.image] if self.image is not None else []
            s = Sample(self.turns, images, self.videos)
        return s if with_answer else s.without_answers()


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


class RecordList(list):
    """Records already in memory as a :class:`Source` (held-out evaluation records, benchmarks' prebuilt ones)."""

    def get(self, i: int) -> Record:
        return self[i]


class ShardPlan(Sequence):
    """The shards of ``n_samples`` records cut ``shard_size`` at a time: a sequence computed from the shard
    index (``plan[k]``), never a list built up front, so a plan of 10^12 samples costs nothing to make."""

    def __init__(self, n_samples: int, shard_size: int):
        if shard_size < 1 or n_samples < 0:
            raise ValueError(f"cannot plan {n_samples} samples in shards of {shard_size}")
        self.n_samples, self.shard_size = n_samples, shard_size

    def __len__(self) -> int:
        return -(-self.n_samples // self.shard_size)

    @overload
    def __getitem__(self, k: int) -> Shard: ...

    @overload
    def __getitem__(self, k: slice) -> list[Shard]: ...

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        n = len(self)
        if k < 0:
            k += n
        if not 0 <= k < n:
            raise IndexError(f"shard {k} of a plan of {n}")
        start = k * self.shard_size
        return Shard(k, start, min(start + self.shard_size, self.n_samples))

    def __iter__(self) -> Iterator[Shard]:
        return (self[k] for k in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ShardPlan):
            return (self.n_samples, self.shard_size) == (other.n_samples, other.shard_size)
        return NotImplemented

    def __repr__(self) -> str:
        return f"ShardPlan(n_samples={self.n_samples}, shard_size={self.shard_size}, shards={len(self)})"


def plan_shards(n_samples: int, shard_size: int) -> ShardPlan:
    """The deterministic shard plan (lazy: see :class:`ShardPlan`)."""
    return ShardPlan(n_samples, shard_size)


def open_source(dspec, index_dir: Path | None = None, plan: bool = False) -> Source:
    """The source named by a DataSpec (``limit`` applied).

    ``index_dir`` (:func:`kscale.data.lineindex.index_dir` of the job's output) is where sources keep the
    indexes that let a worker read only its shards (a manifest's line offsets, ...), built once by the
    driver while it plans (``plan=True``: a stale index is rebuilt) and trusted by workers (``plan=False``:
    a data file changed since planning is :class:`kscale.data.lineindex.DataIndexStale`). Without
    ``index_dir`` they are built in memory by whoever opens the source."""
    if dspec.source == "generated":
        from kscale.data.generated import GeneratedSource

        src: Source = GeneratedSource(dspec.generated)
    elif dspec.source == "manifest":
        src = ManifestSource(dspec, index_dir, plan)
    elif dspec.source == "parquet":
        from kscale.data.parquet import ParquetSource

        src = ParquetSource(dspec, index_dir, plan)
    elif dspec.source == "hf":
        from kscale.data.hub import HubSource

        src = HubSource(dspec, index_dir, plan)
    elif dspec.source == "webdataset":
        from kscale.data.webdataset import WebDatasetSource

        src = WebDatasetSource(dspec, index_dir, plan)
    else:
        src = HFDiskSource(dspec, index_dir, plan)
    return _Limited(src, dspec.limit) if dspec.limit is not None else src


class _Limited:
    def __init__(self, src: Source, limit: int):
        self.src, self.n = src, min(limit, len(src))

    def __len__(self) -> int:
        return self.n

    def get(self, i: int) -> Record:
        return self.src.get(i)


DEFAULT_MAX_IMAGE_PIXELS = 50_000_000  # data.max_image_pixels' default (see kscale.spec.DataSpec)


def load_image(ref: Any, base: Path | None = None,
               max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[Image.Image | None, str | None]:
    """(RGB image, None) or (None, reason). ``ref`` is a path, bytes, a dict with bytes/path, or a PIL image.

    Size first: ``Image.open`` reads only the header, so an image of more than ``max_pixels`` is refused
    before any pixel is decoded (a 17 KB PNG can hold 12000 x 12000 pixels). A path must be a regular
    file: a device (``/dev/zero``) or a FIFO is refused without being opened (reading it would never end).
    """
    try:
        if isinstance(ref, Image.Image):
            img = ref
        elif isinstance(ref, dict):
            if ref.get("bytes"):
                img = Image.open(io.BytesIO(ref["bytes"]))
            elif ref.get("path"):
                return load_image(ref["path"], base, max_pixels)
            else:
                return None, "image field is an empty mapping"
        elif isinstance(ref, (bytes, bytearray)):
            img = Image.open(io.BytesIO(ref))
        elif isinstance(ref, str):
            p = Path(ref) if base is None or Path(ref).is_absolute() else base / ref
            try:
                mode = os.stat(p).st_mode
            except FileNotFoundError:
                return None, f"missing image file {str(p)!r}"
            except OSError as e:
                return None, f"cannot read image file {str(p)!r} ({e.strerror})"
            if not stat.S_ISREG(mode):
                return None, f"image path {str(p)!r} is not a regular file"
            img = Image.open(p)
        else:
            return None, f"unsupported image value of type {type(ref).__name__}"
        width, height = img.size
        if width * height > max_pixels:
            return None, (f"image of {width}x{height} = {width * height} pixels is larger than "
                          f"data.max_image_pixels={max_pixels}; not decoded")
        img.load()
        return img.convert("RGB"), None
    except Exception as e:  # noqa: BLE001 - any decoder failure means a corrupt image
        return None, f"corrupt image ({type(e).__name__}: {str(e)[:160]})"


def _row_error(i: int, where: str, err: Exception) -> Record:
    """Row ``i`` as an unusable record: whatever one row does (a number of more than 4,300 digits, nesting
    deeper than Python recurses, a value that cannot be printed) is that row's error, never the job's."""
    return Record(i, str(i), None, "", error=f"{where}: unreadable row ({type(err).__name__}: {str(err)[:160]})")


def _record(i: int, row: dict, dspec, base: Path | None, where: str,
            duplicate_of: dict[int, int] | None = None) -> Record:
    """The record of row ``i``; ``duplicate_of`` maps each row whose id an earlier row already has to that
    first row (the later row is that row's error: duplicate ids are recorded, never silently merged).
    Images and conversations: :mod:`kscale.data.rows`. Any exception while reading the row becomes the
    row's error (:func:`_row_error`)."""
    try:
        return _record_of(i, row, dspec, base, where, duplicate_of)
    except Exception as err:  # noqa: BLE001 - one row never fails its shard
        return _row_error(i, where, err)


def _record_of(i: int, row: dict, dspec, base: Path | None, where: str,
               duplicate_of: dict[int, int] | None) -> Record:
    sid = str(row.get(dspec.id_field, i)) if dspec.id_field else str(i)
    text = row.get(dspec.text_field)
    answer = row.get(dspec.answer_field) if dspec.answer_field else None
    rec = Record(i, sid, None, text if isinstance(text, str) else "", None if answer is None else str(answer))
    used = {*rows.image_fields(dspec), *rows.video_fields(dspec), dspec.text_field, dspec.answer_field,
            dspec.id_field, dspec.turns_field}
    rec.meta = {k: v for k, v in row.items() if k not in used}  # e.g. choices, distractor, conflicting claim
    refs = rows.image_refs(row, dspec)
    vrefs = rows.image_refs(row, dspec, rows.video_fields(dspec)) if rows.video_fields(dspec) else None
    n_videos = None if vrefs is None or isinstance(vrefs, str) else len(vrefs)
    if duplicate_of and i in duplicate_of:
        rec.error = f"{where}: duplicate id {sid[:80]!r} (first used by sample {duplicate_of[i]})"
    elif isinstance(refs, str) or isinstance(vrefs, str):
        rec.error = f"{where}: {refs if isinstance(refs, str) else vrefs}"
    elif dspec.turns_field is not None:
        rec.error = _conversation_record(rec, row, refs, dspec, base, where, n_videos)
    elif dspec.text_field not in row:
        rec.error = f"{where}: missing field {dspec.text_field!r}"
    elif not isinstance(text, str) or not text.strip():
        rec.error = f"{where}: empty text in field {dspec.text_field!r}"
    else:
        try:
            rec.turns = rows.text_turns(text, rec.answer, len(refs), n_videos)
        except ValueError as e:
            rec.error = f"{where}: {e}"
        else:
            rec.error = _load_images(rec, refs, dspec, base, where)
    if rec.error is None and vrefs:
        rec.error = _load_videos(rec, vrefs, dspec, base, where)
    return rec


def _conversation_record(rec: Record, row: dict, refs: list, dspec, base: Path | None, where: str,
                         n_videos: int | None = None) -> str | None:
    """Fill ``rec`` from the row's conversation; the error, or None."""
    if dspec.turns_field not in row:
        return f"{where}: missing field {dspec.turns_field!r}"
    try:
        turns, refs = rows.conversation(row[dspec.turns_field], refs, n_videos)
    except ValueError as e:
        return f"{where}: field {dspec.turns_field!r} {e}"
    rec.turns, rec.text, rec.answer = turns, rows.first_text(turns, "user") or "", rows.first_text(turns, "assistant")
    return _load_images(rec, refs, dspec, base, where)


def _load_videos(rec: Record, refs: list, dspec, base: Path | None, where: str) -> str | None:
    """Decode the record's videos (:func:`kscale.data.video.load_video`) into ``videos``; the error, or None:
    a missing or corrupt video is the record's error, like an image's."""
    from kscale.data.video import load_video

    if len(refs) > dspec.max_images:
        return f"{where}: {len(refs)} videos, more than data.max_images={dspec.max_images}"
    videos = []
    for k, ref in enumerate(refs):
        label = f"video {k + 1}: " if len(refs) > 1 else ""
        if isinstance(ref, dict):
            ref = ref.get("bytes") or ref.get("path")
        if isinstance(ref, str):
            p = Path(ref) if base is None or Path(ref).is_absolute() else base / ref
            if not p.exists():
                return f"{where}: {label}missing video {str(p)!r}"
            if not (p.is_dir() or stat.S_ISREG(os.stat(p).st_mode)):
                return f"{where}: {label}video path {str(p)!r} is neither a folder of frames nor a regular file"
            ref = p
        elif not isinstance(ref, (bytes, bytearray)):
            return f"{where}: {label}unsupported video value of type {type(ref).__name__}"
        try:
            videos.append(load_video(ref, dspec.video_fps, dspec.max_frames))
        except Exception as e:  # noqa: BLE001 - any decoder failure means a corrupt video
            return f"{where}: {label}corrupt video ({type(e).__name__}: {str(e)[:160]})"
    assert rec.turns is not None  # a row with a video always has explicit turns (rows.text_turns)
    rec.videos = videos
    return None


def _load_images(rec: Record, refs: list, dspec, base: Path | None, where: str) -> str | None:
    """Decode the record's images into ``images`` (and ``image``, the first); the error, or None."""
    if len(refs) > dspec.max_images:
        return f"{where}: {len(refs)} images, more than data.max_images={dspec.max_images}"
    images = []
    for k, ref in enumerate(refs):
        img, err = load_image(ref, base, dspec.max_image_pixels)
        if err:
            return f"{where}: {'image %d: ' % (k + 1) if len(refs) > 1 else ''}{err}"
        images.append(img)
    rec.image = images[0] if images else None
    rec.images = images if rec.turns is not None else None
    return None


class ManifestSource:
    """JSONL, one record per line; image paths relative to the manifest's folder.

    Lines are found through the byte-offset index (:mod:`kscale.data.lineindex`): ``get(i)`` seeks to line
    ``i`` and decodes it alone, so a worker reads only the lines of its shards and a line that is not UTF-8
    is that record's error, never the job's. Duplicate ids come from the index too (found once, at planning)."""

    def __init__(self, dspec, index_dir: Path | None = None, plan: bool = False):
        from kscale.data.lineindex import open_index

        self.dspec = dspec
        self.path = Path(dspec.path).expanduser()
        self.index = open_index(self.path, dspec.id_field, index_dir, plan)
        self._file = None

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict:  # an open file does not pickle; the copy reopens it on first use
        return {**self.__dict__, "_file": None}

    def _line(self, i: int) -> bytes:
        if self._file is None:
            self._file = open(self.path, "rb")
        start, end = (int(v) for v in self.index.rows[i])
        self._file.seek(start)
        return self._file.read(end - start)

    def _row(self, i: int) -> dict | str:
        """Row ``i`` as a mapping, or why it is not one."""
        raw = self._line(i)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return f"not UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            return f"invalid JSON ({e.msg})"
        except Exception as e:  # noqa: BLE001 - ValueError (> 4,300 digits), RecursionError (deep nesting), ...
            return f"unreadable JSON ({type(e).__name__}: {str(e)[:160]})"  # ... are this row's error
        return row if isinstance(row, dict) else "expected a JSON object"

    def raw(self, i: int) -> dict:
        """Row ``i``'s own fields ({} for a line that is not a JSON object)."""
        row = self._row(i)
        return row if isinstance(row, dict) else {}

    def get(self, i: int) -> Record:
        where = f"{self.path.name} line {i + 1}"
        row = self._row(i)
        if isinstance(row, str):
            return Record(i, str(i), None, "", error=f"{where}: {row}")
        return _record(i, row, self.dspec, self.path.parent, where, self.index.duplicate_of)


class HFDiskSource:
    """A Hugging Face dataset saved with ``save_to_disk`` (a Dataset, or a DatasetDict with ``split``)."""

    def __init__(self, dspec, index_dir: Path | None = None, plan: bool = False):
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
        self.index_dir, self.plan = index_dir, plan
        self._dups: dict[int, int] | None = None

    def __len__(self) -> int:
        return len(self.ds)

    def duplicate_of(self) -> dict[int, int] | None:
        """Later row -> first row with the same id (one column read, on first use), None without ``id_field``."""
        if self.dspec.id_field is None:
            return None
        if self._dups is None:
            from kscale.data.files import duplicates_index
            from kscale.data.lineindex import index_key

            files = [Path(f["filename"]) for f in self.ds.cache_files]
            name = f"hf_disk-{index_key(self.base.resolve(), self.dspec.split, self.dspec.id_field)}.dups.json"
            self._dups = duplicates_index(self.index_dir, name, files, lambda: row_ids(self.ds, self.dspec.id_field),
                                          self.plan, f"the saved dataset {self.dspec.path!r}")
        return self._dups

    def get(self, i: int) -> Record:
        return _record(i, self.ds[i], self.dspec, self.base, f"{self.dspec.path} row {i}", self.duplicate_of())


def row_ids(ds, id_field: str):
    """(row, id) of an Arrow-backed dataset, the id column read in batches (none when the column is
    missing: ids are then row numbers, never duplicates). Read by the planner where the source has an
    index folder (:func:`kscale.data.files.duplicates_index`), once; workers load the duplicates."""
    if id_field not in ds.column_names:
        return
    column = ds.select_columns([id_field])
    for start in range(0, len(ds), 65536):
        yield from enumerate(column[start:start + 65536][id_field], start)
