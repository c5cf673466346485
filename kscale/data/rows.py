"""A row's images and conversation, for every row-reading source (manifest, saved or loaded datasets,
Parquet, WebDataset): what :func:`kscale.data.records._record` puts in ``Record.images`` / ``Record.turns``.

- **Images**: ``data.image_field`` names one field (an image, or a list of images) or several fields of one
  image each (MMMU's ``image_1`` .. ``image_7``; nulls skipped). More than ``data.max_images`` is that
  record's error, as is any image that does not load.
- **Placeholders**: ``<image N>`` (1-based, MMMU) names image N; ``<image>`` (LLaVA) names the next image.
  Each becomes ``Media("image", k)`` where it stands. Images the text never names come first, in order.
  A placeholder naming an image the record does not have is that record's error.
- **Conversations** (``data.turns_field``): LLaVA ``[{"from": "human"|"gpt"|"system", "value": str}]`` or
  OpenAI ``[{"role": ..., "content": str | [{"type": "text", "text"} | {"type": "image"[, "image": ref]}
  | {"type": "image_url", "image_url": {"url": ref}}]}]``. An image part without a value takes the row's
  next image; one with a value adds that image after the row's own.

- **Videos** (``data.video_field``, off by default): a field holding a video or a list of them, each a folder
  of frames or an animated image file (a path, relative as images are, or the file's bytes), read by
  :func:`kscale.data.video.load_video` at ``data.video_fps``, at most ``data.max_frames`` frames. ``<video>`` /
  ``<video N>`` place them as ``<image>`` places images (only while ``video_field`` is set); videos the text
  never names come first, after the unnamed images. A conversation's ``{"type": "video"}`` part takes the
  row's next video.

A record of one image whose text names no image keeps ``turns = None`` (``Sample.simple``: the tokens kscale
always made); anything else gets explicit turns.
"""

from __future__ import annotations

import re
from typing import Any

from kscale.models.inputs import Media, Part, Turn

PLACEHOLDER = re.compile(r"<image(?:\s+(\d+))?>")
MEDIA_PLACEHOLDER = re.compile(r"<(image|video)(?:\s+(\d+))?>")  # with data.video_field
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def image_fields(dspec) -> list[str]:
    return [dspec.image_field] if isinstance(dspec.image_field, str) else list(dspec.image_field)


def video_fields(dspec) -> list[str]:
    return [dspec.video_field] if getattr(dspec, "video_field", None) else []


def image_refs(row: dict, dspec, fields: list[str] | None = None) -> list[Any] | str:
    """Every image value of the row in order (nulls skipped), or why there is none to read; ``fields``
    (default ``image_fields``): ``video_fields`` for the videos."""
    refs: list[Any] = []
    for name in image_fields(dspec) if fields is None else fields:
        if name not in row:
            return f"missing field {name!r} (use null for a text-only sample)"
        value = row[name]
        if isinstance(value, (list, tuple)):
            refs.extend(v for v in value if v is not None)
        elif value is not None:
            refs.append(value)
    return refs


class _Counter:
    """Hands out image indices for placeholders: ``<image N>`` is N-1, ``<image>`` the next unnamed one
    (``kind`` video: the same for ``<video N>`` / ``<video>``). ``videos`` is the video counter, None where
    the job names no ``video_field`` (``<video>`` is then plain text)."""

    def __init__(self, n_images: int, kind: str = "image", videos: "_Counter | None" = None):
        self.n, self.next, self.named, self.kind, self.videos = n_images, 0, set(), kind, videos

    def take(self, number: str | None) -> int:
        k = int(number) - 1 if number is not None else self.next
        if number is None:
            self.next += 1
        if not 0 <= k < self.n:
            shown = f"<{self.kind} {number}>" if number is not None else f"<{self.kind}> number {k + 1}"
            raise ValueError(f"the text names {shown} but the record has {self.n} {self.kind}(s)")
        self.named.add(k)
        return k


def split_text(text: str, counter: _Counter) -> list[Part]:
    """``text`` as parts, each placeholder replaced by its ``Media``."""
    parts: list[Part] = []
    at = 0
    pattern = MEDIA_PLACEHOLDER if counter.videos is not None else PLACEHOLDER
    for m in pattern.finditer(text):
        if m.start() > at:
            parts.append(text[at:m.start()])
        kind, number = (m.group(1), m.group(2)) if counter.videos is not None else ("image", m.group(1))
        parts.append(Media(kind, (counter if kind == "image" else counter.videos).take(number)))
        at = m.end()
    if at < len(text):
        parts.append(text[at:])
    return parts


def _unnamed_first(turns: list[Turn], counter: _Counter) -> tuple[Turn, ...]:
    """Images no placeholder named open the first user turn, then the videos no placeholder named."""
    unnamed = tuple(Media("image", k) for k in range(counter.n) if k not in counter.named)
    if counter.videos is not None:
        unnamed += tuple(Media("video", k) for k in range(counter.videos.n) if k not in counter.videos.named)
    if unnamed:
        first = next(i for i, t in enumerate(turns) if t.role == "user")
        turns[first] = Turn("user", unnamed + turns[first].content)
    return tuple(turns)


def _counter(n_images: int, n_videos: int | None) -> _Counter:
    return _Counter(n_images, videos=None if n_videos is None else _Counter(n_videos, "video"))


def text_turns(text: str, answer: str | None, n_images: int, n_videos: int | None = None) -> tuple[Turn, ...] | None:
    """The turns of a (text, answer) row; None when ``Sample.simple`` says the same (one image or none,
    no video, no placeholder). ``n_videos``: None where the job reads no videos."""
    if n_images <= 1 and not n_videos and not (MEDIA_PLACEHOLDER if n_videos is not None else PLACEHOLDER).search(text):
        return None
    counter = _counter(n_images, n_videos)
    turns = [Turn("user", tuple(split_text(text, counter)))]
    if answer is not None:
        turns.append(Turn("assistant", (answer,)))
    return _unnamed_first(turns, counter)


def conversation(value: Any, refs: list[Any], n_videos: int | None = None) -> tuple[tuple[Turn, ...], list[Any]]:
    """(turns, every image ref: the row's, then those the messages carry inline) of a conversation field;
    ``ValueError`` says why a conversation cannot be used. ``n_videos``: the row's videos (None: none read)."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError("is not a non-empty list of turns")
    inline: list[Any] = []
    counter = _counter(len(refs), n_videos)
    turns = []
    for j, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {j} is not a mapping")
        role = ROLE_NAMES.get(str(turn.get("from", turn.get("role"))))
        if role is None:
            raise ValueError(f"turn {j} has role {turn.get('from', turn.get('role'))!r} (expected "
                             f"{', '.join(ROLE_NAMES)})")
        turns.append(Turn(role, tuple(_content(turn.get("value", turn.get("content")), counter, inline, refs, j))))
    if not any(t.role == "user" for t in turns):
        raise ValueError("has no user turn")
    counter.n = len(refs) + len(inline)  # inline images are named where they stand
    return _unnamed_first(turns, counter), refs + inline


def _content(content: Any, counter: _Counter, inline: list[Any], refs: list[Any], j: int) -> list[Part]:
    if isinstance(content, str):
        return split_text(content, counter)
    if not isinstance(content, (list, tuple)):
        raise ValueError(f"turn {j} has content of type {type(content).__name__}")
    parts: list[Part] = []
    for p in content:
        kind = p.get("type") if isinstance(p, dict) else None
        if isinstance(p, str) or kind == "text":
            parts.extend(split_text(p if isinstance(p, str) else str(p.get("text", "")), counter))
        elif kind == "video" and counter.videos is not None:
            parts.append(Media("video", counter.videos.take(None)))
        elif kind in ("image", "image_url"):
            ref = p.get("image") if kind == "image" else (p.get("image_url") or {}).get("url")
            if ref is None:
                parts.append(Media("image", counter.take(None)))
            else:
                inline.append(ref)
                counter.named.add(len(refs) + len(inline) - 1)
                parts.append(Media("image", len(refs) + len(inline) - 1))
        else:
            raise ValueError(f"turn {j} has a part of type {kind!r} (expected text, image or image_url)")
    return parts


def first_text(turns: tuple[Turn, ...], role: str) -> str | None:
    return next((t.text for t in turns if t.role == role), None)
