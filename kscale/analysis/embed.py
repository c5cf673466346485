"""2-d pictures of a layer's keys: PCA and t-SNE (openTSNE) of a stratified subsample.

Each token's key is the concatenation of its selected heads (H*d dims), standardised with the pooled
mean and SD; image and text get the same number of points. t-SNE is an optional dependency
(``pip install 'kscale[analysis]'``); PCA needs only numpy.

t-SNE is seconds of one CPU, mostly holding the GIL (and openTSNE's import, through scikit-learn, over a
second): :class:`MapsHelper` computes the t-SNE maps in one spawned process at the lowest CPU priority,
started with the analysis and given each picture layer as soon as its subsample is read. It runs on
what the analysis leaves idle, and has the maps ready when the pictures are drawn; the maps are the same
as computed in place (same library, same input, one thread).
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

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
         helper: MapsHelper | None = None) -> dict:
    """A layer's 2-d maps: ``{"labels": modality per point, method: (coordinates, PCA variance ratio or
    None)}`` for each of ``methods`` ("pca", "tsne"), of one stratified subsample. With ``helper`` the
    t-SNE map is a :class:`~concurrent.futures.Future` (see :func:`resolved`)."""
    x, labels = stratified(keys, subsample, seed)
    out: dict = {"labels": labels}
    for method in methods:
        if method == "pca":
            out[method] = pca_2d(x)
        else:
            out[method] = helper.tsne(x, perplexity, seed) if helper is not None else (tsne_2d(x, perplexity, seed),
                                                                                        None)
    return out


def resolved(maps_: dict, perplexity: float, seed: int) -> dict:
    """``maps_`` with every future replaced by its value (an error of the helper's t-SNE, e.g. no openTSNE,
    is raised here, as in place). Should the helper process have died, the map is computed here."""
    out = dict(maps_)
    for method, value in maps_.items():
        if isinstance(value, _Pending):
            try:
                if value.future is not None:
                    out[method] = (value.future.result(), None)
                    continue
            except BrokenProcessPool:
                pass
            out[method] = (tsne_2d(value.x, perplexity, seed), None)
    return out


class _Pending:
    """A t-SNE map on its way from the helper (``future`` None: the helper had died; computed here)."""

    def __init__(self, future: Future | None, x: np.ndarray):
        self.future, self.x = future, x


def _helper_start(warm_tsne: bool) -> None:
    os.nice(19)  # idle CPU only: the analysis that will wait for the maps goes first
    if warm_tsne:
        try:
            import openTSNE  # noqa: F401  (its import, over a second, is paid here beside the analysis)
        except ImportError:
            pass  # raised where a map is asked for


class MapsHelper:
    """One spawned, lowest-priority process for t-SNE maps (see the module's docstring). ``close()`` when
    done (or use it as a context manager); maps not yet started are then dropped."""

    def __init__(self, warm_tsne: bool = True):
        self.pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_helper_start, initargs=(warm_tsne,))
        self.pool.submit(int)  # start the process (and its import) now, not at the first map

    def tsne(self, x_nF: np.ndarray, perplexity: float, seed: int) -> _Pending:
        try:
            return _Pending(self.pool.submit(tsne_2d, x_nF, perplexity, seed), x_nF)
        except BrokenProcessPool:  # the helper died: :func:`resolved` computes the map in place
            return _Pending(None, x_nF)

    def close(self, wait: bool = True) -> None:
        self.pool.shutdown(wait=wait, cancel_futures=True)

    def __enter__(self) -> MapsHelper:
        return self

    def __exit__(self, kind, *_) -> None:
        self.close(wait=kind is None)  # on an error, do not wait for a map nobody will draw
