"""kscale.attention.report on synthetic tables whose answers are known in closed form.

Legend: S samples, L layers, H query heads, K kv heads.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kscale.attention.report import beside_key_gap, figure, utilization

S, L, K, G = 400, 3, 2, 2


def synthetic_table(seed: int = 0) -> dict[str, np.ndarray]:
    """Attention rows with per-(layer, q_head) image mass ~ share * eff_true(layer, head) + noise."""
    rng = np.random.default_rng(seed)
    sid, layer, qh = (a.ravel() for a in np.meshgrid(np.arange(S), np.arange(L), np.arange(K * G), indexing="ij"))
    share = rng.uniform(0.4, 0.8, S)[sid]  # per sample, the same for every head
    eff_true = 0.5 + 0.1 * layer + 0.05 * qh
    mass = share * eff_true + rng.normal(0, 0.05, len(sid))
    n_q = np.where(sid < 10, 0, 7)  # ten samples without queries: must be ignored
    return {"sample_id": sid, "layer": layer, "q_head": qh, "kv_head": qh // G, "n_queries": n_q,
            "mass_image": mass, "share_image": share, "mass_text": 1 - mass, "mass_special": np.zeros(len(sid)),
            "logit_mean_image": rng.normal(-1, 1, len(sid)), "logit_mean_text": rng.normal(0, 1, len(sid)),
            "entropy": rng.uniform(1, 2, len(sid))}


def test_utilization_estimates_and_intervals():
    t = synthetic_table()
    df = pd.DataFrame(t)
    ok = df[df.n_queries > 0]
    for level, key in (("q_head", "q_head"), ("kv_head", "kv_head"), ("layer", None)):
        u = utilization(t, level, n_boot=2000)
        assert len(u) == L * ({"q_head": K * G, "kv_head": K, "layer": 1}[level])
        assert (u.n_samples == S - 10).all()
        for _, row in u.iterrows():
            g = ok[ok.layer == row.layer] if key is None else ok[(ok.layer == row.layer) & (ok[key] == row["head"])]
            per_sample = g.groupby("sample_id")[["mass_image", "share_image"]].mean()
            m, s = per_sample.mass_image, per_sample.share_image
            assert row.mass_image == pytest.approx(m.mean(), rel=1e-12)
            assert row.efficiency_image == pytest.approx(m.mean() / s.mean(), rel=1e-12)
            # percentile bootstrap of a mean ~ normal interval mean +- 1.96 sd/sqrt(n) at n = 390
            half = 1.96 * m.std(ddof=1) / np.sqrt(len(m))
            assert row.mass_image_ci_high - row.mass_image_ci_low == pytest.approx(2 * half, rel=0.12)
            assert row.efficiency_image_ci_low < row.efficiency_image < row.efficiency_image_ci_high
    u = utilization(t, "q_head")
    packed = {k: v for k, v in t.items() if k not in ("mass_image", "share_image", "mass_text", "mass_special",
                                                        "logit_mean_image", "logit_mean_text")}
    for name, cols in (("mass", ("mass_text", "mass_image", None, "mass_special")),
                       ("share", (None, "share_image", None, None)),
                       ("logit_mean", ("logit_mean_text", "logit_mean_image", None, None))):
        packed[name] = np.stack([t[c] if c else np.full(len(t["layer"]), np.nan) for c in cols], axis=1)
    pd.testing.assert_frame_equal(utilization(packed, "q_head"), u)  # the store's (n, M) columns read the same
    truth = 0.5 + 0.1 * u.layer + 0.05 * u["head"]
    assert ((u.efficiency_image_ci_low < truth) & (truth < u.efficiency_image_ci_high)).mean() >= 0.8
    assert np.allclose(u.efficiency_image, truth, atol=0.02)


def key_gap_table(util_layer: pd.DataFrame, util_kv: pd.DataFrame) -> pd.DataFrame:
    """Key gap built so that cross - mean(intra) = 2 - 3 * efficiency exactly, plus a decoy estimator."""
    rows = []
    for u in (util_layer, util_kv):
        for _, r in u.iterrows():
            intra_t, intra_i = 0.1 + 0.01 * r.layer, 0.2
            cross = 2 - 3 * r.efficiency_image + (intra_t + intra_i) / 2
            for comp, v in (("cross", cross), ("intra_text", intra_t), ("intra_image", intra_i)):
                for est, val in (("mmd2_rf", v), ("energy", -v)):
                    rows.append({"layer": r.layer, "head": r["head"], "comparison": comp, "estimator": est,
                                 "value": val, "ci_low": val - 0.01, "ci_high": val + 0.01})
    return pd.DataFrame(rows)


def test_beside_key_gap_joins_and_correlates(tmp_path):
    t = synthetic_table(1)
    gap = key_gap_table(utilization(t, "layer"), utilization(t, "kv_head"))
    joined, corr = beside_key_gap(t, gap, estimator="mmd2_rf", n_boot=200)
    assert len(joined) == L + L * K and set(joined["head"]) == {-1, *range(K)}
    np.testing.assert_allclose(joined.gap, 2 - 3 * joined.efficiency_image, atol=1e-12)
    np.testing.assert_allclose(joined.mmd_intra_image, 0.2)
    c = corr.set_index("scope")
    assert c.loc["layers", "n"] == L and c.loc["layers x heads", "n"] == L * K
    assert c.loc["layers x heads", "pearson_r"] == pytest.approx(-1, abs=1e-9)
    assert c.loc["layers x heads", "spearman_rho"] == pytest.approx(-1, abs=1e-9)
    _, corr_energy = beside_key_gap(t, gap, estimator="energy", n_boot=50)
    assert corr_energy.set_index("scope").loc["layers x heads", "pearson_r"] == pytest.approx(1, abs=1e-9)
    with pytest.raises(ValueError, match="estimator 'nope'"):
        beside_key_gap(t, gap, estimator="nope")
    with pytest.raises(ValueError, match="repeated"):
        beside_key_gap(t, pd.concat([gap, gap]), n_boot=10)
    fig = figure(joined, corr)
    fig.savefig(tmp_path / "attention.png")
    assert (tmp_path / "attention.png").stat().st_size > 10_000 and len(fig.axes) >= 3
    colour_bar = fig.axes[-1]  # coloured by layer: its ticks are layers, never 0.2 or 0.4
    ticks = [t for t in colour_bar.get_yticks() if colour_bar.get_ylim()[0] <= t <= colour_bar.get_ylim()[1]]
    assert colour_bar.get_ylabel() == "layer" and len(ticks) >= 2 and all(float(t).is_integer() for t in ticks)
