"""2-d pictures of a layer's keys: PCA and t-SNE (openTSNE) of a stratified subsample.

Each token's key is the concatenation of its selected heads (H*d dims), standardised with the pooled
mean and SD; image and text get the same number of points. t-SNE is an optional dependency
(``pip install 'kscale[analysis]'``); PCA needs only numpy.
"""

from __future__ import annotations

import numpy as np


def stratified(keys: dict[str, np.ndarray], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(points (m, H*d), modality labels (m,)) with at most ``n`` tokens of each modality."""
    rng = np.random.default_rng([seed, 0xE3B])
    pts, labels = [], []
    for mod, x_nHd in keys.items():
        take = rng.permutation(len(x_nHd))[:n]
        pts.append(x_nHd[take].reshape(len(take), -1))
        labels += [mod] * len(take)
    x = np.vstack(pts)
    x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-12)
    return x, np.asarray(labels)


def pca_2d(x_nF: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coordinates (n, 2), explained variance ratio of the two components)."""
    centred = x_nF - x_nF.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    ratio = s**2 / max((s**2).sum(), 1e-30)
    return centred @ vt[:2].T, ratio[:2]


def tsne_2d(x_nF: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
    try:
        from openTSNE import TSNE
    except ImportError as err:  # optional dependency
        raise ImportError("t-SNE pictures need openTSNE: pip install 'kscale[analysis]' "
                          "(or pip install openTSNE), or set analyze.embed.methods: [pca]") from err
    perplexity = min(perplexity, max(2.0, (len(x_nF) - 1) / 3))
    pcs, _ = pca_2d(x_nF) if x_nF.shape[1] <= 2 else (None, None)
    init = "pca" if pcs is None else "random"
    return np.asarray(TSNE(perplexity=perplexity, random_state=seed, n_jobs=1, initialization=init,
                           verbose=False).fit(x_nF))
