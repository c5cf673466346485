"""Train outputs a reader sees: TensorBoard events (train.report_to), the key-gap interval of the
before/after table, and the report's reading of metrics.jsonl."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from kscale.train.evaluate import key_gap, key_gap_interval
from kscale.train.loggers import RunLoggers, scalars
from kscale.train.report import gate_table, read_metrics
from tests.testing_utils import require_module

GATES = {"model.language_model.layers.0.self_attn.k_proj.img": 1.25,
         "model.language_model.layers.1.self_attn.k_proj.txt": 0.75}


def _events(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of TensorBoard event files, read with the record format (length, crc, event, crc)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(log_dir.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_tensorboard_gets_every_logged_term_gate_and_the_eval_table(tmp_path):
    require_module("tensorboardX", install="pip install -e '.[train]'")  # ray[train] brings it; CI fails without
    loggers = RunLoggers(["tensorboard"], tmp_path, "t", {})
    for step in (1, 2, 3):
        loggers.log({"step": step, "loss": 1.0 / step, "lm": 0.5, "align": 0.1, "lr": 1e-3, "grad_norm": None,
                     "step_seconds": 0.2, "gates": GATES})
    loggers.log_eval({"base": {"lm_loss": 2.0}, "malora": {"lm_loss": 1.5}}, 3)
    loggers.close()
    ev = _events(tmp_path / "tensorboard")
    assert [s for s, _ in ev["train/loss"]] == [1, 2, 3]
    assert ev["train/loss"][1][1] == pytest.approx(0.5)
    assert "train/grad_norm" not in ev  # None is not a value
    assert ev["gates/model.language_model.layers.0.self_attn.k_proj.img"][0][1] == pytest.approx(1.25)
    assert ev["eval/malora/lm_loss"] == [(3, pytest.approx(1.5))]


def test_a_backend_that_is_not_installed_fails_with_the_install_command(tmp_path, monkeypatch):
    """Runs everywhere, wandb installed or not: a None entry in sys.modules makes ``import wandb`` fail."""
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match="pip install wandb"):
        RunLoggers(["wandb"], tmp_path, "t", {})


def test_scalars_flatten_terms_and_gates():
    out = scalars({"step": 4, "loss": 1.0, "gates": GATES, "note": "x"})
    assert out == {"train/loss": 1.0, **{f"gates/{k}": v for k, v in GATES.items()}}


def test_key_gap_interval_is_clustered_by_sample_and_excludes_zero_with_a_gap():
    """A planted gap: the interval holds the table's value and excludes 0; clustering by sample (tokens of
    a sample share an effect) gives a wider interval than pretending every token is its own sample.
    (Near a zero gap the witness interval is first-order degenerate, as in the analysis stage's exact
    rows: read the before/after difference, not coverage of 0.)"""
    rng = np.random.default_rng(0)
    n_samples, per = 40, 12
    sid = np.repeat(np.arange(n_samples), per)
    img = rng.normal(size=(len(sid), 16)) + np.repeat(rng.normal(0, 0.7, (n_samples, 16)), per, axis=0) + 0.8
    txt = rng.normal(size=(len(sid), 16)) + np.repeat(rng.normal(0, 0.7, (n_samples, 16)), per, axis=0)
    value, lo, hi = key_gap_interval(img, txt, 2, sid, sid)
    assert value == pytest.approx(key_gap(img, txt, 2)[0])  # the same number as the table's
    assert 0 < lo < value < hi
    tokens = np.arange(len(sid))
    _, lo_tok, hi_tok = key_gap_interval(img, txt, 2, tokens, tokens)
    assert hi - lo > 1.5 * (hi_tok - lo_tok)


def test_metrics_of_a_resumed_run_keep_the_later_record_and_gates_parse(tmp_path):
    lines = [{"step": 1, "loss": 3.0, "lm": 2.0, "align": 1.0, "gates": GATES},
             {"step": 2, "loss": 2.0, "lm": 1.5, "align": 0.5, "gates": GATES},
             {"step": 2, "loss": 1.9, "lm": 1.4, "align": 0.5, "gates": GATES}]  # step 2 again after resume
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    m = read_metrics(tmp_path)
    assert list(m.step) == [1, 2] and m.loss.iloc[1] == pytest.approx(1.9)
    g = gate_table(m)
    assert set(zip(g.layer, g.branch, g.module)) == {(0, "img", "k_proj"), (1, "txt", "k_proj")}
