"""JSD estimators against scipy, the null, and the Monte Carlo truth of a planted mixture."""

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.special import logsumexp

from kscale.analysis.jsd import (balanced_log_loss, corrected_hist_jsd, hist_jsd, quantile_edges,
                                 token_log_loss, train_probe)


def test_hist_jsd_equals_scipy():
    rng = np.random.default_rng(0)
    p, q = rng.integers(0, 50, size=(7, 20)).astype(float), rng.integers(0, 50, size=(7, 20)).astype(float)
    p[0, :3] = 0  # empty bins on one side
    ref = np.array([jensenshannon(a, b) ** 2 for a, b in zip(p, q)])
    np.testing.assert_allclose(hist_jsd(p, q), ref, rtol=1e-12)


def test_identical_distributions_give_zero_after_bias_correction():
    rng = np.random.default_rng(1)
    B, n, m = 32, 4000, 3000
    vals = []
    for _ in range(200):
        x, y = rng.normal(size=(n, 4)), rng.normal(size=(m, 4))
        edges = quantile_edges(np.vstack([x, y]), B)
        hx = np.stack([np.bincount(np.searchsorted(edges[p], x[:, p], side="right"), minlength=B)
                       for p in range(4)])
        hy = np.stack([np.bincount(np.searchsorted(edges[p], y[:, p], side="right"), minlength=B)
                       for p in range(4)])
        raw = hist_jsd(hx, hy).mean()
        vals.append((raw, corrected_hist_jsd(hx[None], hy[None], np.arange(4))))
    raw, corrected = np.array(vals).T
    bias = (B - 1) * (1 / n + 1 / m) / 8
    assert raw.mean() == pytest.approx(bias, rel=0.1)  # the plug-in is biased by the stated amount
    assert abs(corrected.mean()) < 0.05 * bias + 3 * corrected.std() / np.sqrt(len(corrected))


def mixture(rng, n, centres):
    comp = rng.integers(0, len(centres), n)
    return centres[comp] + rng.standard_normal((n, centres.shape[1]))


def mixture_logpdf(x, centres):  # up to the shared Gaussian constant
    sq = ((x[:, None, :] - centres[None]) ** 2).sum(-1)
    return logsumexp(-0.5 * sq, axis=1) - np.log(len(centres))


def test_mlp_bound_below_and_near_true_jsd_of_planted_mixture():
    """XOR-like 128-d mixtures (no linear separation): the MLP bound must be <= truth and close to it."""
    rng = np.random.default_rng(2)
    d = 128
    a, b = np.zeros(d), np.zeros(d)
    a[0], b[1] = 1.6, 1.6
    cp, cq = np.stack([a, -a]), np.stack([b, -b])
    xp, xq = mixture(rng, 400_000, cp), mixture(rng, 400_000, cq)
    lp_p, lq_p = mixture_logpdf(xp, cp), mixture_logpdf(xp, cq)
    lp_q, lq_q = mixture_logpdf(xq, cp), mixture_logpdf(xq, cq)
    truth = 0.5 * np.mean(np.log(2) + lp_p - np.logaddexp(lp_p, lq_p)) + \
        0.5 * np.mean(np.log(2) + lq_q - np.logaddexp(lp_q, lq_q))
    train_p, train_q = mixture(rng, 60_000, cp), mixture(rng, 60_000, cq)
    pairs = [(train_p[i:i + 10_000], train_q[i:i + 10_000]) for _ in range(3) for i in range(0, 60_000, 10_000)]
    bounds = {}
    for kind in ("logistic", "mlp"):
        model = train_probe(kind, d, pairs, hidden=128, batch_size=256, lr=2e-3, seed=0)
        test_p, test_q = mixture(rng, 40_000, cp), mixture(rng, 40_000, cq)
        lp, lq = token_log_loss(model, test_p, 1), token_log_loss(model, test_q, 0)
        loss, infl = balanced_log_loss(lp[None].sum(1), np.array([len(lp)]), lq[None].sum(1),
                                       np.array([len(lq)]))
        se = np.sqrt(0.25 * lp.var() / len(lp) + 0.25 * lq.var() / len(lq))
        bounds[kind] = (np.log(2) - loss, se)
    mlp, se = bounds["mlp"]
    print(f"truth {truth:.4f} nats, bounds {bounds}")
    assert mlp <= truth + 3 * se
    assert mlp >= 0.85 * truth  # stated tolerance: within 15% of the Monte Carlo truth
    assert bounds["logistic"][0] < 0.2 * truth  # a linear probe cannot see an XOR-like gap
