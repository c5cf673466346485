"""Videos for records: a folder of frames or an animated image file (GIF, WebP, APNG) read with PIL,
sampled at ``fps`` and capped at ``max_frames``, as the :class:`kscale.models.inputs.Video` that family
adapters turn into video tokens (``Adapter.video_inputs``). No video decoder is needed: PIL reads the
frames and their durations.

Times: an animated file's frame starts at the sum of the earlier frames' durations; a folder's frames
(sorted by name) are ``1 / source_fps`` apart. Sampling at ``fps`` takes, for each time ``k / fps`` within
the video, the frame showing at that time (as a player would); ``max_frames`` then keeps that many,
evenly spread (first and last included). Each kept frame keeps its own time.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from kscale.models.inputs import Video

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_FRAME_PIXELS = 64_000_000  # refuse a frame larger than this before decoding it (decompression bombs)


def load_video(path: str | os.PathLike | bytes, fps: float | None = None, max_frames: int | None = None,
               source_fps: float = 1.0) -> Video:
    """The video at ``path`` (a folder of frames, or an animated image; or an animated image's bytes), sampled
    at ``fps`` frames per second (None: every frame) and at most ``max_frames`` frames. ``source_fps`` is a
    folder's frame rate."""
    data = path if isinstance(path, (bytes, bytearray)) else None
    p = Path("<bytes>") if data is not None else Path(path)
    if fps is not None and fps <= 0:
        raise ValueError(f"video {str(p)!r}: fps must be positive, got {fps}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"video {str(p)!r}: max_frames must be at least 1, got {max_frames}")
    if data is not None:
        import io

        frames, times, end = _animated(io.BytesIO(data), "video bytes")
    else:
        frames, times, end = _folder(p, source_fps) if p.is_dir() else _animated(p, str(p))
    return _kept(p, frames, times, end, fps, max_frames)


def _kept(p: Path, frames: list, times: list[float], end: float, fps: float | None, max_frames: int | None) -> Video:
    if not frames:
        raise ValueError(f"video {str(p)!r} has no frames")
    keep = _sample(times, end, fps, max_frames)
    return Video([frames[i] for i in keep], [times[i] for i in keep], fps=fps if fps is not None else None)


def _checked(im: Image.Image, where: str) -> Image.Image:
    if im.width * im.height > MAX_FRAME_PIXELS:
        raise ValueError(f"{where}: frame of {im.width}x{im.height} exceeds {MAX_FRAME_PIXELS} pixels")
    return im


def _folder(p: Path, source_fps: float) -> tuple[list[Image.Image], list[float], float]:
    """Frames, their start times and the video's end time (seconds)."""
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in FRAME_SUFFIXES)
    frames = []
    for f in files:
        with Image.open(f) as im:
            frames.append(_checked(im, str(f)).convert("RGB"))
    return frames, [i / source_fps for i in range(len(frames))], len(frames) / source_fps


def _animated(p, where: str) -> tuple[list[Image.Image], list[float], float]:
    frames, times, t = [], [], 0.0
    with Image.open(p) as im:
        _checked(im, where)
        for i in range(getattr(im, "n_frames", 1)):
            im.seek(i)
            frames.append(im.convert("RGB"))
            times.append(t)
            t += (im.info.get("duration") or 100) / 1000.0  # PIL's default 100 ms where a file gives none
    return frames, times, t


def _sample(times: list[float], end: float, fps: float | None, max_frames: int | None) -> list[int]:
    """Indices of the frames showing at 0, 1/fps, 2/fps, ... (all frames without fps), then at most
    ``max_frames`` of them evenly spread."""
    idx = list(range(len(times)))
    if fps is not None:
        idx, j, k = [], 0, 0
        while k / fps < end - 1e-9:
            while j + 1 < len(times) and times[j + 1] <= k / fps + 1e-9:
                j += 1
            if not idx or idx[-1] != j:
                idx.append(j)
            k += 1
    if max_frames is not None and len(idx) > max_frames:
        n = len(idx)
        idx = [idx[round(i * (n - 1) / (max_frames - 1))] for i in range(max_frames)] if max_frames > 1 else idx[:1]
    return idx
