"""A stand-in for ``kscale.store.KeyStore`` over in-memory (or Zarr-backed) dask arrays, and data makers.

Implements only the reader API the analysis stage uses: ``layers``, ``heads``, ``head_dim``,
``keys(layer, modality, heads)`` -> dask (N, H, D), ``token_column(modality, name)`` -> dask (N,) chunked
like the keys, ``tokens(modality)``, ``attrs``, ``path``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import dask.array as da
import numpy as np
from scipy.stats import norm, qmc


@dataclass
class FakeKeyStore:
    keys_by: dict[tuple[int, str], da.Array]
    tokens_by: dict[str, dict[str, np.ndarray]]
    layers: list[int]
    heads: list[int]
    head_dim: int
    path: str = "memory://fake"
    attrs: dict = field(default_factory=lambda: {"model": {"name": "fake"}})

    def keys(self, layer: int, modality: str, heads: list[int] | None = None) -> da.Array:
        x = self.keys_by[(layer, modality)]
        return x if heads is None else x[:, heads]

    def tokens(self, modality: str) -> dict[str, np.ndarray]:
        return self.tokens_by[modality]

    def token_column(self, modality: str, name: str) -> da.Array:
        col = self.tokens_by[modality][name]
        chunks = self.keys_by[(self.layers[0], modality)].chunks[0]
        return da.from_array(col, chunks=(chunks, *col.shape[1:]))


def token_table(sample_ids: np.ndarray) -> dict[str, np.ndarray]:
    n = len(sample_ids)
    return {"sample_id": sample_ids.astype(np.int64), "position": np.arange(n) % 97,
            "token_id": np.zeros(n, np.int32), "image_index": np.zeros(n, np.int16),
            "rope_pos": np.zeros((n, 1), np.int32)}


def make_store(*, n_samples: int = 24, layers: tuple[int, ...] = (0, 1), n_heads: int = 2,
               head_dim: int = 8, image_per_sample: int = 12, text_per_sample: tuple[int, int] = (4, 16),
               shift: float = 1.0, sample_effect: float = 0.3, chunk_rows: int = 50, seed: int = 0,
               dtype: str = "float16") -> FakeKeyStore:
    """Keys = modality mean (image shifted by ``shift`` along dim 0, growing with layer) + per-sample
    effect shared by a sample's tokens + N(0, I) noise. Tokens of a sample are contiguous."""
    rng = np.random.default_rng(seed)
    n_img = np.full(n_samples, image_per_sample)
    n_txt = rng.integers(text_per_sample[0], text_per_sample[1] + 1, n_samples)
    sid = {"image": np.repeat(np.arange(n_samples) * 10 + 7, n_img),
           "text": np.repeat(np.arange(n_samples) * 10 + 7, n_txt)}
    keys_by = {}
    for layer in layers:
        effect_SHd = sample_effect * rng.standard_normal((n_samples, n_heads, head_dim))
        for mod, counts in (("image", n_img), ("text", n_txt)):
            x = rng.standard_normal((counts.sum(), n_heads, head_dim)) + np.repeat(effect_SHd, counts, 0)
            if mod == "image":
                x[:, :, 0] += shift * (1 + layer)
            keys_by[(layer, mod)] = da.from_array(x.astype(dtype), chunks=(chunk_rows, n_heads, head_dim))
    return FakeKeyStore(keys_by, {m: token_table(s) for m, s in sid.items()}, list(layers),
                        list(range(n_heads)), head_dim)


def sobol_gaussian(n: int, mean_d: np.ndarray, cov_dd: np.ndarray, seed: int) -> np.ndarray:
    """Scrambled-Sobol Gaussian points: integrals converge much faster than with i.i.d. draws."""
    z = norm.ppf(qmc.Sobol(len(mean_d), scramble=True, seed=seed).random(n))
    return mean_d + z @ np.linalg.cholesky(cov_dd).T


def gaussian_expected_kernel(m1, s1, m2, s2, bandwidth: float) -> float:
    """E k(X, Y) for X ~ N(m1, s1), Y ~ N(m2, s2), k = exp(-|x-y|^2 / 2 bw^2) (closed form)."""
    d = len(m1)
    a = np.eye(d) + (s1 + s2) / bandwidth**2
    dm = m1 - m2
    return float(np.linalg.det(a) ** -0.5
                 * np.exp(-0.5 * dm @ np.linalg.solve(s1 + s2 + bandwidth**2 * np.eye(d), dm)))


def gaussian_mmd2(m1, s1, m2, s2, bandwidth: float) -> float:
    return (gaussian_expected_kernel(m1, s1, m1, s1, bandwidth)
            + gaussian_expected_kernel(m2, s2, m2, s2, bandwidth)
            - 2 * gaussian_expected_kernel(m1, s1, m2, s2, bandwidth))
