"""2-d pictures of a layer's keys: PCA and t-SNE (openTSNE) of a stratified subsample.

Each token's key is the concatenation of its selected heads (H*d dims), standardised with the pooled
mean and SD; image and text get the same number of points. t-SNE is an optional dependency
(``pip install 'kscale[analysis]'``); PCA needs only numpy.

With a :class:`~kscale.analysis.maps_helper.MapsHelper` the t-SNE maps are computed in a helper process
beside the analysis (see there); :func:`resolved` collects them.
"""

from __future__ import annotations

from concurrent.futures import Future

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


def maps(keys: dict[str, np.ndarray], methods, subsample: int, perplexity: float, seed: int,
         helper=None) -> dict:
    """A layer's 2-d maps: ``{"labels": modality per point, method: (coordinates, PCA variance ratio or
    None)}`` for each of ``methods`` ("pca", "tsne"), of one stratified subsample. With ``helper`` (a
    :class:`~kscale.analysis.maps_helper.MapsHelper`) the t-SNE map is on its way: see :func:`resolved`."""
    x, labels = stratified(keys, subsample, seed)
    out: dict = {"labels": labels}
    for method in methods:
        if method == "pca":
            out[method] = pca_2d(x)
        elif helper is not None:
            out[method] = _Pending(helper.tsne(x, perplexity, seed), x)
        else:
            out[method] = (tsne_2d(x, perplexity, seed), None)
    return out


def resolved(maps_: dict, perplexity: float, seed: int) -> dict:
    """``maps_`` with every map on its way replaced by its value. An error of the helper's t-SNE (e.g. no
    openTSNE) is raised here, as in place; if the helper process died, the map is computed here."""
    from kscale.analysis.maps_helper import HelperDied

    out = dict(maps_)
    for method, value in maps_.items():
        if isinstance(value, _Pending):
            try:
                out[method] = (value.future.result(), None)
            except HelperDied:
                out[method] = (tsne_2d(value.x, perplexity, seed), None)
    return out


class _Pending:
    """A t-SNE map on its way from the helper, with its points (to compute it here should the helper die)."""

    def __init__(self, future: Future, x: np.ndarray):
        self.future, self.x = future, x
