"""Every report page (analysis, attention beside the gap, bias, train) built from real tables, opened in
headless Chromium: no console error, every image decodes, nothing wider than the window; every figure
laid out without clipped text (``kscale.reporting.STRICT``); verdicts that say what the data say.

Chromium: ``apt-get install -y --no-install-recommends chromium``. Locally the browser test skips without
it; under ``CI=true`` it fails.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "analysis"))
from analysis_fakes import make_store  # noqa: E402
from browser import check_pages, require_chromium  # noqa: E402

from kscale import reporting  # noqa: E402
from kscale.spec.analyze import (AnalyzeConfig, EmbedConfig, JSDConfig, MMDConfig,  # noqa: E402
                                    SignificanceConfig)

TRAIN_LAYERS = (0, 1, 2, 3)


def _analysis(run: Path) -> Path:
    from kscale.analysis.run import analyze

    cfg = AnalyzeConfig(stores=["unused"], mmd=MMDConfig(n_features=64, median_subsample=200,
                                                          kernels=["rbf", "laplacian", "linear"],
                                                          normalisations=["none", "l2"],
                                                          bandwidth_multiples=[0.5, 1.0, 2.0]),
                        exact_subsample=80, jsd=JSDConfig(epochs=1, min_steps=20, mlp_hidden=8, n_random=2),
                        significance=SignificanceConfig(n_buckets=8, permutations=0),
                        embed=EmbedConfig(subsample=80, methods=["pca"]))
    ks = make_store(n_samples=48, layers=(0, 1, 2), n_heads=2, head_dim=8, shift=0.8)
    ks.path = "/data/stores/fake_keys"
    analyze(cfg, run, stores=[ks])
    return run / "report.html"


def _bias(run: Path) -> Path:
    from kscale.bias.report import build_report, write_pictures

    rng = np.random.default_rng(0)
    rows = []
    variants = [("base", "", 0), ("adapter", "", 0), ("malora@10", "malora", 10), ("malora@20", "malora", 20)]
    for v, r, step in variants:
        gain = step / 20
        metrics = {f"dependency_{c}": 0.05 + 0.1 * gain + 0.02 * i for i, c in enumerate(("blank", "noise",
                                                                                            "swapped", "none"))}
        metrics.update({"blind_share": 0.9 - 0.3 * gain, "follows_image_real": 0.4 + 0.2 * gain,
                        "acc_real": 0.3 + 0.1 * gain, "image_vs_text_drop": -0.05, "ll_real": -2.0})
        for order, slope in (("random", 0.3), ("least_attended", 0.2), ("most_attended", 0.5), ("text", 0.6)):
            for f in (0.0, 0.25, 0.5, 0.75, 1.0):
                metrics[f"ll_drop_{order}_{f:.2f}"] = -2.0 - slope * f
        for m, value in metrics.items():
            half = 0.02 + 0.01 * rng.random()
            rows.append({"variant": v, "run": r, "step": step, "task": "all", "metric": m, "value": value,
                         "ci_low": value - half, "ci_high": value + half, "n": 48})
    agg = pd.DataFrame(rows)
    run.mkdir(parents=True)
    agg.to_parquet(run / "aggregate.parquet", index=False)
    (run / "bias.json").write_text(json.dumps({"format": "kscale-bias"}))
    write_pictures(agg, run)
    return build_report(run)


def _train(run: Path) -> Path:
    from kscale.train.report import build_report

    run.mkdir(parents=True)
    with open(run / "metrics.jsonl", "w") as f:
        for step in range(1, 31):
            gates = {f"model.language_model.layers.{l}.self_attn.k_proj.{b}": 1 + 0.01 * step * (l + 1) * (b == "img")
                     for l in TRAIN_LAYERS for b in ("img", "txt")}
            f.write(json.dumps({"step": step, "loss": 3 - step / 20, "lm": 2.5 - step / 40, "align": 0.5 / step,
                                "lr": 5e-3, "grad_norm": 1.0, "step_seconds": 0.3, "gates": gates}) + "\n")
    table = {}
    for variant, scale in (("base", 1.0), ("malora", 0.4), ("malora_no_image_branch", 0.95)):
        row = {"ll_real": -2.0 + (1 - scale), "ll_blank": -2.2, "lm_loss": 2.0 - (1 - scale) / 2,
               "visual_dependency": 0.2 + (1 - scale), "attn_efficiency_image": 0.5 + (1 - scale) / 2}
        for l in TRAIN_LAYERS:
            row[f"key_mmd2_layer{l}"] = 0.3 * scale
            row[f"key_mmd2_ci_low_layer{l}"], row[f"key_mmd2_ci_high_layer{l}"] = 0.3 * scale - 0.03, 0.3 * scale + 0.03
        table[variant] = row
    (run / "eval.json").write_text(json.dumps(table))
    (run / "split.json").write_text(json.dumps({"train": list(range(72)), "heldout": list(range(72, 96))}))
    return build_report(run)


def _eval(run: Path, analysis: Path, bias: Path) -> Path:
    """An eval run's referee page: scores of two variants beside the analysis and bias runs built above."""
    from kscale.eval.referee import build_report
    from kscale.eval.table import score_rows
    from kscale.spec import EvalVariant

    def results(acc: float) -> dict:
        return {"results": {"mmstar": {"alias": "mmstar", "acc,none": acc, "acc_stderr,none": 0.02}},
                "n-samples": {"mmstar": {"original": 1500, "effective": 1500}}}

    runs = {("base", False): results(0.40), ("base", True): results(0.30), ("malora", False): results(0.46),
            ("malora", True): results(0.29)}
    run.mkdir(parents=True)
    (run / "scores.json").write_text(json.dumps(score_rows(runs)))
    variants = [EvalVariant(name="base", analysis_run=str(analysis.parent), bias_run=str(bias.parent)),
                EvalVariant(name="malora", kind="malora", path="unused", analysis_run=str(analysis.parent),
                            bias_run=str(bias.parent), bias_variant="malora@20")]
    return build_report(run, variants)


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("pages")
    strict, reporting.STRICT = reporting.STRICT, True  # a figure with clipped text fails the build
    try:
        analysis, bias = _analysis(base / "analysis"), _bias(base / "bias")
        return {"analysis": analysis, "bias": bias, "train": _train(base / "train"),
                "eval": _eval(base / "eval", analysis, bias)}
    finally:
        reporting.STRICT = strict


def test_every_page_renders_in_chromium_with_every_image(pages, tmp_path):
    require_chromium()
    checks = check_pages(list(pages.values()), shots=Path(os.environ.get("KSCALE_SHOTS", tmp_path / "shots")))
    for name, check in zip(pages, checks):
        n_png = pages[name].read_text().count("data:image/png;base64,")
        assert n_png >= 3, (name, n_png)
        assert not check.console_errors, (name, check.console_errors)
        assert len(check.images) == n_png and not check.broken_images, (name, check.broken_images)
        assert all(i["naturalWidth"] >= 300 for i in check.images), name
        assert check.width <= 1280, (name, check.width)  # nothing overflows the window sideways
        assert check.screenshot.stat().st_size > 10_000


def test_the_browser_check_catches_a_broken_page(tmp_path):
    require_chromium()
    bad = tmp_path / "bad.html"
    bad.write_text('<!doctype html><html><body><img src="data:image/png;base64,iVBORw0KGgo=">'
                   "<script>console.error('boom'); missing_function();</script></body></html>")
    (check,) = check_pages([bad])
    assert len(check.broken_images) == 1
    assert any("boom" in e for e in check.console_errors) and any("missing_function" in e for e in check.console_errors)


def test_pages_say_what_the_data_say(pages):
    analysis = pages["analysis"].read_text()
    assert "significant in 3 of 3 layers" in analysis  # the planted gap grows with layer
    shown = analysis.split("<h2>Run metadata")[0]  # the metadata dump below keeps the full config
    assert shown.count("/data/stores/fake_keys") == 1  # the store is named once, by its folder elsewhere
    assert "Sensitivity" in analysis and "conclusion holds" in analysis
    assert ".png</figcaption>" not in analysis  # captions are words, not file names
    bias = pages["bias"].read_text()
    assert "<b>malora@20</b>: the answer depends on the image" in bias
    train = pages["train"].read_text()
    assert "(<b>-60%</b>)" in train and "lower with non-overlapping 95% intervals in 4 of 4 layers" in train
    page = pages["eval"].read_text()
    assert "<b>malora</b> on mmstar: 0.4 → 0.46 (+0.06); multimodal gain 0.1 → 0.17." in page
    mech = pd.read_csv(pages["eval"].parent / "mechanism.csv")
    agg = pd.read_parquet(pages["bias"].parent / "aggregate.parquet")
    want = agg[(agg.variant == "malora@20") & agg.metric.str.startswith("dependency_")].set_index("metric")
    got = mech[(mech.variant == "malora") & mech.measure.str.startswith("visual_")].set_index("measure")
    assert len(got) == 4
    for metric, row in want.iterrows():
        assert got.loc[f"visual_{metric}", "value"] == row.value and got.loc[f"visual_{metric}", "ci_low"] == row.ci_low
    base_dep = agg[(agg.variant == "base") & (agg.metric == "dependency_blank")].value.item()
    assert got.loc["visual_dependency_blank", "delta"] == pytest.approx(want.loc["dependency_blank", "value"] - base_dep)
    results = pd.read_parquet(pages["analysis"].parent / "results.parquet")
    sel = results[(results.comparison == "cross") & (results.estimator == "mmd2_rf") & (results.kernel == "rbf")
                  & (results.normalisation == "none") & (results["head"] == -1) & (results["multiple"] == 1.0)]
    key = mech[(mech.variant == "base") & (mech.measure == "key_mmd2")].set_index("layer").value
    assert key.to_dict() == sel.set_index("layer").value.to_dict() and len(key) == 3


def test_clipped_text_is_caught():
    plt = reporting.plt()
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.set_title("a title far too long for a figure this narrow, as the old MMD by layer title was")
    assert reporting.clipped_texts(fig)
    ax.set_title(reporting.wrap("a title far too long for a figure this narrow, as the old one was", 30))
    fig.tight_layout()
    assert not reporting.clipped_texts(fig)
    plt.close(fig)


def test_strict_save_refuses_clipped_text_and_plain_save_keeps_the_picture(tmp_path):
    plt = reporting.plt()
    strict = reporting.STRICT
    try:
        for on in (True, False):
            reporting.STRICT = on
            fig, ax = plt.subplots(figsize=(3, 2), layout="constrained")
            ax.set_title("a title far too long for a figure this narrow, as the old MMD by layer title was")
            png = tmp_path / f"clipped_{on}.png"
            if on:  # tests: the drawing code must be fixed
                with pytest.raises(AssertionError, match="cut off"):
                    reporting.save_figure(fig, png, "a caption")
                assert not png.exists()
            else:  # users: saved with a tight bounding box, nothing cut off in the picture
                reporting.save_figure(fig, png, "a caption")
                assert png.stat().st_size > 1000 and reporting.caption_of(png) == "a caption"
    finally:
        reporting.STRICT = strict
