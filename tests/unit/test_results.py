"""Typed stage results: each stage's summary line, exit-code rule and JSON form."""

from __future__ import annotations

import json

from click.testing import CliRunner

from kscale.results import AnalyzeResult, BiasResult, ExtractResult, TrainResult

PROGRESS = {"job": "demo", "stage": "extract", "state": "succeeded", "shards_total": 3, "shards_done": 2,
            "shards_skipped": 1, "shards_failed": 0, "quarantined": {}, "retries": 0, "samples": 8,
            "sample_errors": 1, "tokens": {"text": 40, "image": 16}, "bytes": 2_000_000, "seconds": 2.0,
            "samples_per_s": 4.0, "started_at": "t0", "updated_at": "t1"}


def test_sharded_results_take_the_progress_snapshot_and_print_their_stage() -> None:
    r = ExtractResult(store="/s", **ExtractResult.progress_fields(PROGRESS))
    assert r.summary_line().startswith("kscale: extract succeeded: shards 2 done, 1 skipped")
    assert "tokens image 16, text 40; 2.00 MB of keys" in r.summary_line() and r.summary_line().endswith("store /s")
    assert not r.failed and r.notes() == []
    d = r.to_dict()
    assert d["kind"] == "extract" and d["store"] == "/s" and d["shards_done"] == 2
    json.dumps(d)
    bad = ExtractResult(store="/s", **{**ExtractResult.progress_fields(PROGRESS), "shards_failed": 1,
                                       "quarantined": {"s000001": "boom\ntrace"}})
    assert bad.failed and bad.notes() == ["kscale: quarantined s000001: boom"]
    b = BiasResult(run_dir="/b", variants=["base", "adapter"], report="/b/report.html",
                   **BiasResult.progress_fields(PROGRESS))
    assert b.summary_line().startswith("kscale: bias succeeded") and "variants base, adapter" in b.summary_line()
    assert b.to_dict()["kind"] == "bias"


def test_analyze_and_train_results() -> None:
    a = AnalyzeResult(name="x", out_dir="/r", rows=12, seconds=1.5, key_bytes=3_000_000)
    assert a.summary_line() == ("kscale: analysis done: 12 rows from 3.00 MB of keys in 1.5 s; table "
                                "/r/results.parquet; report /r/report.html; details /r/result.json")
    t = TrainResult(run_dir="/t", steps=4, resumed_from=2, last={"loss": 1.0, "lm": 0.5, "align": 0.5})
    assert t.summary_line().startswith("kscale: train done: 4 steps (resumed from 2); last align 0.5000")
    assert t.summary_line().endswith("; details /t/result.json")
    assert not t.failed and json.loads(json.dumps(t.to_dict()))["kind"] == "train"


def test_cli_prints_the_result_without_guessing() -> None:
    import click

    from kscale.cli import print_summary

    @click.command()
    def show() -> None:
        print_summary(ExtractResult(store="/s", **{**ExtractResult.progress_fields(PROGRESS),
                                                   "quarantined": {"s1": "err"}}))

    out = CliRunner().invoke(show)
    assert "kscale: extract succeeded" in out.output and "kscale: quarantined s1: err" in out.output
