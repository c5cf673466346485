"""Where the gap lives (kscale/analysis/gapdirs.py): streamed sums equal a direct numpy PCA of the pooled keys,
and a mean difference planted along one principal direction is found there."""

from __future__ import annotations

from dataclasses import dataclass

import dask.array as da
import numpy as np
import pytest

from kscale.analysis import gapdirs


@dataclass
class Fake:
    arrays: dict
    heads: list

    def keys(self, layer, modality, heads=None):
        return da.from_array(self.arrays[modality], chunks=(97, -1, -1))  # several blocks: sums are merged


def _store(rng, D=8, n=600, m=500, along=2, shift=0.6):
    basis, _ = np.linalg.qr(rng.normal(size=(D, D)))
    sd = np.linspace(4, 0.5, D)  # principal directions in decreasing variance
    x = rng.normal(size=(n, D)) * sd @ basis.T + shift * basis[:, along]
    y = rng.normal(size=(m, D)) * sd @ basis.T
    return Fake({"image": x[:, None], "text": y[:, None]}, [0]), x, y


def test_planted_direction_and_direct_pca():
    rng = np.random.default_rng(3)
    ks, x, y = _store(rng)
    row = gapdirs.gap_directions(ks, [0]).iloc[0]
    # direct: PCA of the concatenated keys, projections of the mean difference
    z = np.concatenate([x, y])
    w, V = np.linalg.eigh(np.cov(z.T, bias=True))
    V = V[:, ::-1]
    delta = x.mean(0) - y.mean(0)
    want = (V.T @ delta) ** 2 / (delta @ delta)
    np.testing.assert_allclose(row["share"], want, atol=1e-9)
    assert row["share"].sum() == pytest.approx(1.0)
    assert np.argmax(row["share"]) == 2 and row["dirs_50"] == 3 and row["min_dirs_50"] == 1
    assert row["delta_norm"] == pytest.approx(np.linalg.norm(delta))


def test_figure(tmp_path):
    ks, _, _ = _store(np.random.default_rng(0))
    gapdirs.figure(gapdirs.gap_directions(ks, [0]), 0, tmp_path / "g.png")
    assert (tmp_path / "g.png").stat().st_size > 1000


def test_direction_mmd_matches_exact_1d_mmd_and_finds_the_planted_direction():
    rng = np.random.default_rng(5)
    ks, x, y = _store(rng, n=400, m=300, shift=1.5)
    row = gapdirs.gap_directions(ks, [0], n_mmd=4, n_features=4096).iloc[0]
    z = np.concatenate([x, y])
    w, V = np.linalg.eigh(np.cov(z.T, bias=True))
    w, V = w[::-1], V[:, ::-1]
    for j in range(4):  # exact biased MMD² (V-statistic) of the 1-D projections, RBF with the pooled SD
        px, py, s2 = x @ V[:, j], y @ V[:, j], w[j]

        def k(a, b):
            return np.exp(-(a[:, None] - b[None]) ** 2 / (2 * s2)).mean()

        exact = k(px, px) + k(py, py) - 2 * k(px, py)
        assert row["mmd"][j] == pytest.approx(exact, abs=0.01 * max(row["mmd"]) + 1e-3)
    assert np.argmax(row["mmd"]) == 2
