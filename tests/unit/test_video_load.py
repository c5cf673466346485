"""``kscale.data.video.load_video``: frame folders and animated files (PIL), sampled at fps, capped at
max_frames, each frame with its own time. References: the frame durations written into the file, and
which frame a player shows at each sampling time (worked out by hand below)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from kscale.data.video import load_video

COLORS = [(i * 40, 255 - i * 40, (i * 90) % 256) for i in range(6)]


def _frames(n: int, size: int = 32) -> list[Image.Image]:
    return [Image.new("RGB", (size, size), COLORS[i]) for i in range(n)]


def _color(im: Image.Image) -> tuple[int, ...]:
    return tuple(int(c) for c in np.asarray(im)[0, 0])


def _index(im: Image.Image, frames: list[Image.Image]) -> int:
    """Which written frame a loaded frame is (nearest colour: GIF quantises)."""
    got = np.array(_color(im))
    return int(np.argmin([np.abs(np.array(_color(f)) - got).sum() for f in frames]))


@pytest.fixture
def gif(tmp_path):
    frames = _frames(6)
    path = tmp_path / "clip.gif"
    # starts at 0, .1, .2, .4, .5, .6 s; ends at 1.0 s
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=[100, 100, 200, 100, 100, 400], loop=0)
    return path, frames


def test_animated_file_keeps_every_frame_with_its_start_time(gif) -> None:
    path, frames = gif
    v = load_video(path)
    assert [_index(f, frames) for f in v.frames] == list(range(6))
    np.testing.assert_allclose(v.timestamps, [0, .1, .2, .4, .5, .6])


def test_sampling_takes_the_frame_showing_at_each_time(gif) -> None:
    path, frames = gif
    v = load_video(path, fps=5)  # times 0, .2, .4, .6, .8 show frames 0, 2, 3, 5, 5
    assert [_index(f, frames) for f in v.frames] == [0, 2, 3, 5]
    np.testing.assert_allclose(v.timestamps, [0, .2, .4, .6])
    assert v.fps == 5
    capped = load_video(path, fps=5, max_frames=2)
    assert [_index(f, frames) for f in capped.frames] == [0, 5]


def test_frame_folder_sorted_by_name_at_its_frame_rate(tmp_path) -> None:
    frames = _frames(4)
    for i, f in enumerate(frames):
        f.save(tmp_path / f"frame_{i:03d}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    v = load_video(tmp_path, source_fps=2.0)
    assert [_color(f) for f in v.frames] == [_color(f) for f in frames]
    assert v.timestamps == [0.0, 0.5, 1.0, 1.5]
    v1 = load_video(tmp_path, fps=1.0, source_fps=2.0)
    assert [_color(f) for f in v1.frames] == [_color(frames[0]), _color(frames[2])] and v1.timestamps == [0.0, 1.0]


def test_bad_arguments_and_empty_folders_are_refused(tmp_path, gif) -> None:
    with pytest.raises(ValueError, match="has no frames"):
        load_video(tmp_path / "nothing" if (tmp_path / "nothing").mkdir() is None else tmp_path)
    with pytest.raises(ValueError, match="fps must be positive"):
        load_video(gif[0], fps=0)
    with pytest.raises(ValueError, match="max_frames must be at least 1"):
        load_video(gif[0], max_frames=0)
