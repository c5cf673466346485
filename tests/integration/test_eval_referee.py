"""The referee's table of an eval run: its mechanism rows are the analysis stage's numbers on the same images.

A real extraction (attention statistics and query vectors on) of the debug Qwen2.5-VL, analysed twice
(two analysis seeds: two slightly different "variants"); :func:`kscale.eval.referee.build_report` then reads
the runs named per variant. Each row is checked against a table the analysis stage wrote itself for its own
report (``attention_vs_gap_<store>.csv``: key MMD² ``mmd_cross`` beside ``mass_image`` /
``efficiency_image`` per layer, KV heads pooled) and against ``query_gap_<store>.csv``; deltas equal the
differences from the base variant.
"""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd

from kscale.runner import run_job
from kscale.spec import spec_from_dict
from tests.conftest import extract_spec

LIGHT = {"mmd": {"n_features": 256, "kernels": ["rbf"], "normalisations": ["none"], "bandwidth_multiples": [1.0]},
         "jsd": {"classifiers": [], "histogram": ["marginal"]}, "embed": {"methods": []}}


def _variant(name: str, kind: str, analysis: str) -> SimpleNamespace:
    return SimpleNamespace(name=name, kind=kind, analysis_run=analysis, bias_run=None, bias_variant=None)


def test_mechanism_rows_equal_the_analysis_stage_and_deltas_are_differences(tmp_path) -> None:
    from kscale.eval.referee import build_report

    ext = extract_spec(tmp_path, data={"generated": {"n_samples": 12, "image_size": 112}, "shard_size": 6},
                       extract={"attention": {"enabled": True, "store_queries": True}})
    run_job(spec_from_dict(ext), show_bar=False)
    runs = {}
    for name, seed in (("base", 0), ("after", 1)):
        runs[name] = tmp_path / f"analysis_{name}"
        run_job(spec_from_dict({"kind": "analyze", "analyze": {"stores": [ext["output"]["path"]], "seed": seed,
                                                               **LIGHT},
                                "output": {"path": str(runs[name])}}), show_bar=False)
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    scores = [{"variant": v, "task": "t", "metric": "acc,none", "score": s, "stderr": 0.1, "n": 12,
               "blind_score": 1 / 6, "blind_stderr": 0.1, "blind_n": 12, "gain": s - 1 / 6, "gain_stderr": 0.14}
              for v, s in (("base", 0.25), ("after", 0.5))]
    (eval_dir / "scores.json").write_text(json.dumps(scores))
    page = build_report(eval_dir, [_variant("base", "base", str(runs["base"])),
                                   _variant("after", "malora", str(runs["after"]))]).read_text()
    mech = pd.read_csv(eval_dir / "mechanism.csv")
    assert set(mech.measure) == {"key_mmd2", "attention_mass_image", "attention_efficiency_image", "query_gap"}
    for name, run in runs.items():
        joined = pd.read_csv(run / "attention_vs_gap_store.csv")
        joined = joined[joined["head"] == -1].set_index("layer")
        mine = mech[mech.variant == name]
        for measure, column in (("key_mmd2", "mmd_cross"), ("attention_mass_image", "mass_image"),
                                ("attention_efficiency_image", "efficiency_image")):
            got = mine[mine.measure == measure].set_index("layer").value
            assert sorted(got.index) == [0, 1], (name, measure)
            np.testing.assert_allclose(got.to_numpy(), joined.loc[got.index, column].to_numpy(), rtol=1e-12,
                                       err_msg=f"{name} {measure}")
        qgap = pd.read_csv(run / "query_gap_store.csv").set_index(["layer", "head"])
        got = mine[mine.measure == "query_gap"].set_index(["layer", "head"])
        assert len(got) == len(qgap) > 0
        np.testing.assert_allclose(got.value.to_numpy(), qgap.loc[got.index, "gap_post"].to_numpy(), rtol=1e-12)
    # the two analysis seeds differ in their random features: the key MMD moves, attention does not
    a = mech[mech.variant == "after"].set_index(["measure", "layer", "head"])
    b = mech[mech.variant == "base"].set_index(["measure", "layer", "head"])
    np.testing.assert_allclose(a.delta.to_numpy(), (a.value - b.value.reindex(a.index)).to_numpy(), rtol=1e-12)
    assert (a.loc["key_mmd2"].delta.abs() > 0).all()
    assert b.delta.isna().all()
    half = ((a.ci_high - a.ci_low) ** 2 + (b.ci_high - b.ci_low).reindex(a.index) ** 2) ** 0.5 / 2
    np.testing.assert_allclose((a.delta_ci_high - a.delta).to_numpy(), half.to_numpy(), rtol=1e-9)
    assert "Mechanism, before and after" in page and "0.25 → 0.5" in page
    # `kscale report` rebuilds the page from the run's own files (scores.json, mechanism.csv/json)
    (eval_dir / "report.html").unlink()
    r = subprocess.run([sys.executable, "-m", "kscale.cli", "report", str(eval_dir)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (eval_dir / "report.html").read_text() == page
    pd.testing.assert_frame_equal(pd.read_csv(eval_dir / "mechanism.csv"), mech)
