"""kscale.analysis.verdict on hand-made tables whose conclusions are known: significance, noise floor,
sensitivity, and robustness to columns the table may or may not have."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from kscale.analysis import verdict as V


def _rows(layer_gap: dict[int, float], kernel="rbf", norm="none", multiple=1.0, est="mmd2_rf", heads=(-1, 0, 1),
          p_gap=1e-4, **extra) -> list[dict]:
    rows = []
    for layer, gap in layer_gap.items():
        for h in heads:
            for comp, value, p in (("cross", gap, p_gap if gap > 0.05 else 0.4), ("intra_text", 0.001, 0.5),
                                   ("intra_image", -0.001, 0.5)):
                rows.append({"store": "/abs/path/to/keys", "layer": layer, "head": h, "comparison": comp,
                             "estimator": est, "kernel": kernel, "normalisation": norm, "multiple": multiple,
                             "value": value, "ci_low": value - 0.01, "ci_high": value + 0.01,
                             "p": p if est != "mmd2_exact" else np.nan, "units": "kernel", **extra})
    return rows


def test_significant_layers_noise_floor_and_holm():
    df = pd.DataFrame(_rows({0: 0.3, 1: 0.2, 2: 0.0}))
    t = V.gap_table(df, V.primary_setting(df), "pooled")
    assert list(t.significant) == [True, True, False]
    assert t.noise_floor.iloc[0] == pytest.approx(0.011)  # the upper end of the intra intervals
    assert t.gap_over_noise.iloc[0] == pytest.approx(0.3 / 0.011)
    assert t.p_holm.iloc[0] == pytest.approx(3e-4)  # 3 layers: the smallest p times 3
    text = re.sub("<[^>]+>", "", " ".join(V.verdict(df)))
    assert "significant in 2 of 3 layers (0–1)" in text and "Not significant: layers 2" in text
    assert "/abs/path" not in text and "Per KV head: significant in 4 of 6" in text


def test_a_gap_inside_the_noise_floor_is_not_significant_even_with_a_small_p():
    df = pd.DataFrame(_rows({0: 0.3}))
    df.loc[df.comparison == "intra_text", ["value", "ci_high"]] = [0.29, 0.35]  # noisy baseline
    t = V.gap_table(df, V.primary_setting(df), "pooled")
    assert not t.significant.iloc[0]


def test_sensitivity_says_which_settings_disagree():
    df = pd.DataFrame(_rows({0: 0.3, 1: 0.2}) + _rows({0: 0.3, 1: 0.2}, kernel="laplacian")
                      + _rows({0: 0.3, 1: 0.0}, norm="l2") + _rows({0: 0.3, 1: 0.2}, est="mmd2_exact"))
    sens = V.sensitivity(df)
    assert sens.primary.sum() == 1 and sens[sens.primary].setting.iloc[0] == "RF, rbf, raw keys, 1x bw"
    bad = sens[~sens.holds]
    assert list(bad.setting) == ["RF, rbf, unit-norm keys, 1x bw"]
    text = " ".join(V.verdict(df))
    assert "holds in 2</b> and differs in RF, rbf, unit-norm keys, 1x bw (1 of 2 layers significant)" in text


def test_extra_columns_are_part_of_a_setting_and_the_primary_prefers_the_sample_level_statistic():
    rows = (_rows({0: 0.3, 1: 0.2}, statistic="token", bandwidth_policy="per_target", p_gap=1e-6)
            + _rows({0: 0.3, 1: 0.0}, statistic="sample_block", bandwidth_policy="per_target"))
    df = pd.DataFrame(rows)
    primary = V.primary_setting(df)
    assert primary.get("statistic") == "sample_block"
    assert "sample_block" in primary.label() and "per_target" in primary.label()
    assert V.gap_table(df, primary, "pooled").significant.tolist() == [True, False]
    # and without those columns (today's table) nothing breaks
    assert V.primary_setting(df.drop(columns=["statistic", "bandwidth_policy"])) is not None


def test_holm_and_ranges():
    assert V.holm(np.array([0.01, 0.04, np.nan, 0.03])).round(6).tolist()[:2] == [0.03, 0.06]
    assert V.ranges([0, 1, 2, 5, 7, 8]) == "0–2, 5, 7–8" and V.ranges([]) == "none"


def test_gap_tables_are_reused_only_for_an_equal_table():
    """The figures, the layer table and the verdict ask for the same tables: computed once, reused only for
    a table with the same content, and no caller's edit reaches the next caller."""
    df = pd.DataFrame(_rows({0: 0.3, 1: 0.2, 2: 0.0}))
    setting = V.primary_setting(df)
    first = V.gap_table(df, setting, "pooled")
    first.loc[0, "cross"] = 99.0
    assert V.gap_table(df, setting, "pooled").cross.iloc[0] == pytest.approx(0.3)
    grown = df.copy()  # layer 2 gets the gap too: a different table, not the cached one
    at2 = (grown.layer == 2) & (grown.comparison == "cross")
    grown.loc[at2, ["value", "ci_low", "ci_high", "p"]] = [0.3, 0.29, 0.31, 1e-4]
    assert list(V.gap_table(grown, setting, "pooled").significant) == [True, True, True]
    assert list(V.gap_table(df, setting, "pooled").significant) == [True, True, False]
    for table in (df, grown):
        pd.testing.assert_frame_equal(V.sensitivity(table), V.sensitivity.__wrapped__(table))


def test_a_call_with_defaults_spelled_out_is_the_same_call():
    df = pd.DataFrame(_rows({0: 0.3, 1: 0.0}))
    V._MEMO.clear()
    setting = V.primary_setting(df)
    V.gap_table(df, setting)
    V.gap_table(df, setting, "pooled", 0.05)
    V.gap_table(df, setting=setting, alpha=0.05)
    assert sum(key[0] == "gap_table" for key in V._MEMO) == 1


def test_layer_table_says_unbounded_for_an_infinite_ratio_interval():
    from kscale.analysis.report import layer_table

    rows = _rows({0: 0.3, 1: 0.2}, heads=(-1,))
    for layer, (lo, hi) in ((0, (-np.inf, np.inf)), (1, (5.0, 40.0))):
        rows.append({**rows[0], "layer": layer, "comparison": "cross/intra_text", "estimator": "ratio_mmd2_rf",
                     "value": 20.0, "ci_low": lo, "ci_high": hi, "p": np.nan})
    page = layer_table(pd.DataFrame(rows), 0.05)
    assert "20 [unbounded]" in page and "inf" not in page.split("<p")[0]
    assert "20 [5, 40]" in page  # a finite interval is shown as it is
    assert "no finite Fieller interval" in page
    finite = [r for r in rows if not (r["comparison"] == "cross/intra_text" and r["layer"] == 0)]
    assert "no finite Fieller interval" not in layer_table(pd.DataFrame(finite), 0.05)
