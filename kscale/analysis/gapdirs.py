"""Where the gap lives: the key mean difference along the leading principal directions of the pooled keys.

For one layer and KV head, with image keys X and text keys Y (pre-RoPE, every row of the store):

- pooled covariance ``C = (sum xxᵀ + sum yyᵀ)/(n + m) - mu muᵀ`` (mu the pooled mean), eigenvectors
  ``v_1..v_D`` by decreasing variance;
- ``share_j = (v_j · delta)^2 / |delta|^2`` with ``delta = mean x - mean y``: the part of the squared mean
  difference along principal direction j (they sum to 1);
- ``dirs_50`` / ``dirs_90``: how many *leading* directions (in variance order) hold 50% / 90% of it, and the
  same counted over the directions sorted by their own share (``min_dirs_50/90``: the fewest directions
  that can hold it, whatever their variance).

- ``mmd``: the RBF MMD² of the two modalities' keys projected on each of the leading directions (bandwidth:
  the pooled SD along the direction), from random Fourier features (:func:`direction_mmd`).

Only sums stream (count, sum k, sum k kᵀ per modality; then feature sums on the leading directions): dask
reduces them out-of-core, blockwise, in two passes per layer. Not wired into the analysis run yet (its figure would change the demo's outputs);
:func:`figure` draws the cumulative share per layer.

Legend: N rows, H heads, D head dim.
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pandas as pd


def layer_sums(ks, layer: int) -> dict[str, tuple[float, np.ndarray, np.ndarray]]:
    """modality -> (n, sum k (H, D), sum k kᵀ (H, D, D)) over the store, float64, one streamed pass."""
    lazy = {}
    for m in ("image", "text"):
        k = ks.keys(layer, m).astype(np.float64)
        lazy[m] = (k.shape[0], k.sum(0), da.einsum("nhd,nhe->hde", k, k))
    return dask.compute(lazy)[0]


def directions(n_x: float, s_x: np.ndarray, ss_x: np.ndarray, n_y: float, s_y: np.ndarray,
               ss_y: np.ndarray) -> dict:
    """One head's decomposition from its sums: eigenvalues, per-direction shares of |delta|^2, counts."""
    n = n_x + n_y
    mu = (s_x + s_y) / n
    C = (ss_x + ss_y) / n - np.outer(mu, mu)
    w, V = np.linalg.eigh(C)
    w, V = w[::-1], V[:, ::-1]
    delta = s_x / n_x - s_y / n_y
    share = (V.T @ delta) ** 2 / (delta @ delta)

    def first(c: np.ndarray, q: float) -> int:
        return int(np.searchsorted(c, q - 1e-12) + 1)

    cum, best = np.cumsum(share), np.cumsum(np.sort(share)[::-1])
    return {"eigenvalues": w, "vectors": V, "share": share, "dirs_50": first(cum, 0.5), "dirs_90": first(cum, 0.9),
            "min_dirs_50": first(best, 0.5), "min_dirs_90": first(best, 0.9),
            "delta_norm": float(np.sqrt(delta @ delta))}


def _rf_block(k_NHD: np.ndarray, proj_HDJ: np.ndarray, omega_HJF: np.ndarray) -> np.ndarray:
    """(1, H, J, 2F) sums over rows of [cos, sin](omega * (k·v_j)) / sqrt(F)."""
    p_NHJ = np.einsum("nhd,hdj->nhj", k_NHD.astype(np.float64), proj_HDJ)
    a = p_NHJ[..., None] * omega_HJF[None]
    F = omega_HJF.shape[-1]
    return np.concatenate([np.cos(a), np.sin(a)], -1).sum(0)[None] / np.sqrt(F)


def direction_mmd(ks, layer: int, V_HDJ: np.ndarray, scale_HJ: np.ndarray, n_features: int = 512,
                  seed: int = 0) -> np.ndarray:
    """(H, J) random-feature RBF MMD² of image vs text keys projected on each direction ``V[h][:, j]``, with
    bandwidth ``scale[h, j]`` (the pooled SD along it): a second streamed pass of feature sums."""
    omega_HJF = np.random.default_rng([seed, layer, 0x6D6D]).normal(
        size=(*scale_HJ.shape, n_features)) / scale_HJ[..., None]
    mean = {}
    for m in ("image", "text"):
        k = ks.keys(layer, m)
        parts = k.map_blocks(_rf_block, V_HDJ, omega_HJF, drop_axis=2, new_axis=[2, 3],
                             chunks=((1,) * k.numblocks[0], *((c,) for c in V_HDJ.shape[:1]),
                                     (V_HDJ.shape[2],), (2 * n_features,)), dtype=np.float64)
        mean[m] = parts.sum(0).compute() / k.shape[0]
    d = mean["image"] - mean["text"]
    return (d * d).sum(-1)


def gap_directions(ks, layers: list[int], n_mmd: int = 8, n_features: int = 512, seed: int = 0) -> pd.DataFrame:
    """One row per (layer, KV head): dirs_50/90, min_dirs_50/90, |delta|, the share vector, and the RBF MMD²
    along each of the ``n_mmd`` leading directions (``mmd``)."""
    rows = []
    for layer in layers:
        s = layer_sums(ks, layer)
        (nx, sx, ssx), (ny, sy, ssy) = s["image"], s["text"]
        ds = [directions(nx, sx[h], ssx[h], ny, sy[h], ssy[h]) for h in range(len(ks.heads))]
        J = min(n_mmd, ks.head_dim if hasattr(ks, "head_dim") else len(ds[0]["share"]))
        V = np.stack([d["vectors"][:, :J] for d in ds])
        scale = np.sqrt(np.stack([d["eigenvalues"][:J] for d in ds]).clip(min=1e-12))
        mmd_HJ = direction_mmd(ks, layer, V, scale, n_features, seed) if J else np.zeros((len(ds), 0))
        for h, head in enumerate(ks.heads):
            rows.append({"layer": layer, "head": head, "mmd": mmd_HJ[h],
                         **{k: v for k, v in ds[h].items() if k not in ("eigenvalues", "vectors")}})
    return pd.DataFrame(rows)


def figure(table: pd.DataFrame, layer: int, path) -> None:
    """Cumulative share of |delta|^2 over leading principal directions, one line per KV head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for _, r in table[table.layer == layer].iterrows():
        c = np.cumsum(r["share"])
        ax.plot(np.arange(1, len(c) + 1), c, label=f"KV head {r['head']}")
    ax.axhline(0.5, ls=":", c="grey")
    ax.axhline(0.9, ls=":", c="grey")
    ax.set(xlabel="leading principal directions of pooled keys", ylabel="share of |mean difference|²",
           title=f"where the gap lives — layer {layer}", ylim=(0, 1.02))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
