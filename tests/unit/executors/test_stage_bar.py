"""StageBar: the progress of stages without a shard pool (analyze, train) in ``_progress.json`` while they
run, shown by ``kscale status``; a stop turns a running snapshot into a stopped one."""

from __future__ import annotations

import json

from kscale.executors.progress import StageBar
from kscale.targets.records import format_progress, mark_progress_stopped


def test_snapshot_follows_the_bar_and_status_shows_it(tmp_path):
    bar = StageBar(tmp_path, "demo", "analyze", "layer", show_bar=False, every_s=0)
    assert json.loads((tmp_path / "_progress.json").read_text())["state"] == "running"  # from the start
    bar.set_total(4)
    bar.advance(1, nbytes=2_000_000, detail="keys layer 0")
    snap = json.loads((tmp_path / "_progress.json").read_text())
    assert (snap["units_done"], snap["units_total"], snap["bytes"]) == (1, 4, 2_000_000)
    line = format_progress(snap)
    assert line.startswith("analyze demo: running, layers 1/4") and "MB/s" in line and "(keys layer 0)" in line
    bar.close()


def test_a_stop_marks_the_running_snapshot_stopped(tmp_path):
    bar = StageBar(tmp_path, "demo", "train", "step", total=10, show_bar=False, every_s=0)
    bar.advance(2, tokens=500)
    assert mark_progress_stopped(tmp_path)["state"] == "stopped"
    line = format_progress(json.loads((tmp_path / "_progress.json").read_text()))
    assert line.startswith("train demo: stopped, steps 2/10") and "tokens/s" in line
