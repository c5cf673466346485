"""Where the gap lives (kscale.analysis.directions): a gap planted in k known principal directions is found
in exactly those; the streamed sums merge exactly; the stage's table equals numpy's eigh of the pooled
covariance of every key, read in full."""

import numpy as np
import pytest
import pandas as pd

from analysis_fakes import make_store
from test_analysis_streaming import write_store
from kscale.analysis import directions as D
from kscale.analysis import run as R
from kscale.analysis.stream import Runner
from kscale.spec.analyze import AnalyzeConfig, DaskConfig, EmbedConfig, MMDConfig, SignificanceConfig


def exact_cov(n: int, sd_d: np.ndarray, rot_dd: np.ndarray, rng) -> np.ndarray:
    """n points with mean exactly 0 and covariance exactly rot diag(sd^2) rot^T (whitened, then scaled)."""
    z = rng.standard_normal((n, len(sd_d)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(z.T @ z / n)).T
    return (z * sd_d) @ rot_dd.T


def planted(k: int, d: int = 12, seed: int = 0):
    """Image and text keys with the same within-modality covariance (distinct variances along a random
    rotation) and a mean difference with a component on each of the k leading directions, none elsewhere."""
    rng = np.random.default_rng(seed)
    rot_dd = np.linalg.qr(rng.standard_normal((d, d)))[0]
    sd_d = np.linspace(4.0, 0.5, d)
    delta_d = rot_dd[:, :k] @ rng.uniform(0.5, 1.5, k)
    img = exact_cov(300, sd_d, rot_dd, rng) + delta_d + 3.0
    txt = exact_cov(500, sd_d, rot_dd, rng) + 3.0
    return img, txt, rot_dd


def blocks(x_Nd: np.ndarray, cuts: list[int]) -> list[np.ndarray]:
    return np.split(x_Nd[:, None, :], cuts)  # (N, H=1, d) blocks


def streamed(img: np.ndarray, txt: np.ndarray, n_blocks: int = 4) -> dict:
    """direction_sums over joint blocks (the last one holds text only), merged in order."""
    d = img.shape[1]
    plan = D.DirectionPlan({0: ([0], np.zeros(d))}, ("image", "text"), batch_rows=37)
    bi = blocks(img, list(np.linspace(0, len(img), n_blocks + 1, dtype=int)[1:-1])) + [None]
    bt = blocks(txt, list(np.linspace(0, len(txt), n_blocks + 2, dtype=int)[1:-1]))
    acc = None
    for a, b in zip(bi, bt, strict=True):
        part = D.direction_sums({"image": None if a is None else (a, None), "text": (b, None)}, plan)
        acc = part if acc is None else D.merge(acc, part)
    return acc


def test_a_gap_planted_in_k_directions_is_found_in_exactly_those():
    for k in (1, 3, 5):
        img, txt, rot_dd = planted(k)
        sums = streamed(img, txt)
        rows = pd.DataFrame(D.direction_rows("s", 0, sums, ["image", "text"]))
        cum = rows.sort_values("direction").cum_gap_share.to_numpy()
        np.testing.assert_allclose(cum[k - 1:], 1.0, rtol=0, atol=1e-10)  # all of it by k directions
        assert cum[k - 2] < 0.999 if k > 1 else True  # and not before
        assert D.n_for(cum, 1.0) == k
        # the k leading directions span the planted subspace (projectors agree)
        dec = D.decompose(sums[0]["image"], sums[0]["text"])
        u, v = dec["evecs_dd"][:, :k], rot_dd[:, :k]
        np.testing.assert_allclose(u @ u.T, v @ v.T, atol=1e-8)
        assert abs(rows.sq_mean_diff.iloc[0] - np.sum((img.mean(0) - txt.mean(0)) ** 2)) < 1e-9


def test_summary_counts_directions_for_50_and_90_percent():
    t = pd.DataFrame({"store": "s", "layer": 0, "head": -1, "direction": [1, 2, 3, 4], "sq_mean_diff": 2.0,
                      "cum_gap_share": [0.2, 0.5, 0.89, 1.0], "cum_variance_share": [0.6, 0.8, 0.95, 1.0]})
    s = D.summary(t).iloc[0]
    assert (s.gap_n50, s.gap_n90, s.variance_n50, s.variance_n90) == (2, 4, 1, 3)


def test_sums_merged_over_two_halves_equal_the_sums_of_the_whole():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1001, 3, 16)) * 5 + 40
    centre = rng.standard_normal(16)
    plan = D.DirectionPlan({0: ([1], centre), -1: ([0, 1, 2], centre)}, ("image", "text"), batch_rows=64)
    whole = D.direction_sums({"image": (x, None), "text": (x[::2], None)}, plan)
    halves = D.merge(D.direction_sums({"image": (x[:400], None), "text": (x[:400:2], None)}, plan),
                     D.direction_sums({"image": (x[400:], None), "text": (x[400::2], None)}, plan))
    for t in (0, -1):
        for m in ("image", "text"):
            a, b = whole[t][m], halves[t][m]
            assert a.n == b.n
            for u, v in ((a.s_d, b.s_d), (a.S_dd, b.S_dd)):
                assert np.abs(u - v).max() <= 1e-12 * np.abs(u).max()
    assert whole[-1]["image"].n == 3 * 1001 and whole[0]["text"].n == 501


@pytest.mark.parametrize("kind", ["fake", "zarr"])
def test_stage_table_equals_numpy_eigh_of_the_keys_read_in_full(kind, tmp_path):
    """Demo-sized stores: the in-memory fake (joint blocks from streamed ids) and a real Zarr store (blocks
    of whole shards from its index)."""
    if kind == "fake":
        ks, layers, d = make_store(n_samples=20, layers=(0, 2), n_heads=2, head_dim=8, shift=0.8), (0, 2), 8
    else:
        ks, layers, d = write_store(tmp_path / "s", n_shards=4), (0, 1), 6
    cfg = AnalyzeConfig(stores=["unused"], estimators=["mmd_rf"], embed=EmbedConfig(methods=[]), dask=DaskConfig(
                        scheduler="sync"),
                        mmd=MMDConfig(n_features=16, median_subsample=100), exact_subsample=50,
                        significance=SignificanceConfig(n_buckets=4, permutations=0))
    with Runner(cfg.dask) as runner:  # the stage's own pass (run._direction_rows) without the MMD's
        sc = R._store_context(cfg, ks, runner, None)
        table = pd.DataFrame([r for layer in layers for r in R._direction_rows(R._layer_context(sc, layer, False))])
    for layer in layers:
        full = {m: np.asarray(ks.keys(layer, m).compute(), np.float64) for m in ("image", "text")}
        for head, cols in ((0, [0]), (1, [1]), (-1, [0, 1])):
            x = {m: full[m][:, cols].reshape(-1, d) for m in full}
            pooled = np.concatenate([x["image"], x["text"]])
            evals, evecs = np.linalg.eigh(np.cov(pooled.T, bias=True))
            evecs = evecs[:, ::-1]
            delta = x["image"].mean(0) - x["text"].mean(0)
            share = (evecs.T @ delta) ** 2 / (delta @ delta)
            got = table[(table.layer == layer) & (table["head"] == head)].sort_values("direction")
            np.testing.assert_allclose(got.gap_share, share, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(got.cum_gap_share, np.cumsum(share), rtol=1e-9)
            np.testing.assert_allclose(got.eigenvalue, evals[::-1], rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(np.abs(got.mean_diff), np.abs(evecs.T @ delta), rtol=1e-7, atol=1e-12)
            assert (got.n_image.iloc[0], got.n_text.iloc[0]) == (len(x["image"]), len(x["text"]))
            check_direction_mmd(got, x, evals[::-1], evecs, cfg.seed)


def check_direction_mmd(got: pd.DataFrame, x: dict, evals: np.ndarray, evecs: np.ndarray, seed: int) -> None:
    """The RF MMD^2 of the leading directions equals the same random features computed on every key read in
    full (numpy), and the exact 1-d RBF MMD^2 (kscale.analysis.mmd.exact_mmd2, token-level U-statistic) within
    4 random-feature SDs; beyond the leading directions the columns are NaN."""
    from kscale.analysis.mmd import exact_mmd2

    r = min(D.MMD_DIRECTIONS, len(evals))
    g = np.random.default_rng([seed, 0xD12]).standard_normal(D.MMD_FEATURES)
    assert got.mmd2_rf.iloc[r:].isna().all() and got.mmd2_rf.iloc[:r].notna().all()
    for j in range(r):
        s = np.sqrt(evals[j])
        z = {m: x[m] @ evecs[:, j] for m in x}
        f = {m: np.stack([np.cos(np.outer(z[m], g / s)).sum(0), np.sin(np.outer(z[m], g / s)).sum(0)]) for m in z}
        n, m = len(z["image"]), len(z["text"])
        t = (((f["image"] ** 2).sum(0) - n) / (n * (n - 1)) + ((f["text"] ** 2).sum(0) - m) / (m * (m - 1))
             - 2 * (f["image"] * f["text"]).sum(0) / (n * m))
        row = got.iloc[j]
        assert row.mmd2_rf == pytest.approx(t.mean(), rel=1e-7, abs=1e-10)
        assert row.mmd2_rf_approx_sd == pytest.approx(t.std(ddof=1) / np.sqrt(len(t)), rel=1e-6)
        exact = exact_mmd2(z["image"][:, None], z["text"][:, None], [("rbf", s)]).value_k[0]
        assert abs(row.mmd2_rf - exact) <= 4 * row.mmd2_rf_approx_sd + 1e-9, (j, row.mmd2_rf, exact)


def test_direction_mmd_sums_merged_over_blocks_equal_the_whole():
    img, txt, _ = planted(2)
    sums = streamed(img, txt)
    decomposed = {0: D.decompose(sums[0]["image"], sums[0]["text"])}
    plan = D.mmd_plan(D.DirectionPlan({0: ([0], np.zeros(12))}, ("image", "text"), batch_rows=37), decomposed, 3)
    whole = D.direction_mmd_sums({"image": (img[:, None], None), "text": (txt[:, None], None)}, plan)
    parts = [D.direction_mmd_sums({"image": (img[a:b, None], None), "text": (txt[c:e, None], None)}, plan)
             for a, b, c, e in ((0, 100, 0, 333), (100, 300, 333, 500))]
    merged = D.merge_mmd(*parts)
    for m in ("image", "text"):
        assert merged[0][m].n == whole[0][m].n
        np.testing.assert_allclose(merged[0][m].feat_r2F, whole[0][m].feat_r2F, rtol=1e-12, atol=1e-9)
    mmd2, sd = D.direction_mmd(whole[0]["image"], whole[0]["text"])
    assert mmd2.shape == (D.MMD_DIRECTIONS,) and (sd > 0).all()
