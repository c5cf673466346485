"""Jensen-Shannon divergence between image and text keys: two estimators that answer different questions.

``JSD(P, Q) = 1/2 KL(P | M) + 1/2 KL(Q | M)``, ``M = (P + Q)/2``, in nats (<= log 2) or bits (<= 1).

1. **Histogram JSD** (:func:`hist_jsd`) of 1-d views: per-dimension marginals and slices along random,
   PCA or LDA directions, with bins shared by both sides (quantiles of the pooled subsample), and the
   plug-in's finite-sample bias ``(B - 1)(1/n + 1/m)/8`` nats subtracted. A 1-d view can only lose
   information (data processing), so these are *lower* bounds of the full JSD up to binning and noise —
   for separable 128-d clouds an order of magnitude lower. They say how different single coordinates
   or projections are.
2. **Classifier bound** (:func:`train_probe` + :func:`balanced_log_loss`): for any classifier q(x) the
   balanced held-out log-loss L satisfies ``JSD >= log 2 - L`` (equality at the Bayes classifier), so a
   trained logistic probe and a small MLP give lower bounds of the *full* d-dimensional JSD. They are
   trained streaming over the store on training buckets of samples and scored on held-out buckets.

Shapes: K buckets, P histogram columns, B bins, N tokens, d dims.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import contextmanager

import numpy as np

LOG2 = math.log(2.0)


def to_units(nats: float, units: str) -> float:
    return nats / LOG2 if units == "bits" else nats


def hist_jsd(p_PB: np.ndarray, q_PB: np.ndarray) -> np.ndarray:
    """Plug-in JSD (nats) of histograms along the last axis; inputs are counts or probabilities."""
    p = p_PB / p_PB.sum(-1, keepdims=True)
    q = q_PB / q_PB.sum(-1, keepdims=True)
    m = 0.5 * (p + q)
    with np.errstate(divide="ignore", invalid="ignore"):
        kp = np.where(p > 0, p * np.log(p / m), 0.0)
        kq = np.where(q > 0, q * np.log(q / m), 0.0)
    return 0.5 * kp.sum(-1) + 0.5 * kq.sum(-1)


def hist_bias(n_bins: int, n: float, m: float) -> float:
    """First-order bias of the plug-in JSD (nats) when both sides come from one distribution."""
    return (n_bins - 1) * (1.0 / n + 1.0 / m) / 8.0


def corrected_hist_jsd(x_KPB: np.ndarray, y_KPB: np.ndarray, columns: np.ndarray) -> float:
    """Bias-corrected histogram JSD (nats) averaged over ``columns`` of per-bucket counts."""
    px, py = x_KPB.sum(0)[columns], y_KPB.sum(0)[columns]
    n, m = px[0].sum(), py[0].sum()
    return float(hist_jsd(px, py).mean() - hist_bias(px.shape[-1], n, m))


def hist_jsd_with_jackknife(x_KPB: np.ndarray, y_KPB: np.ndarray, columns: np.ndarray,
                            ) -> tuple[float, np.ndarray]:
    """Value and delete-one-bucket replicates (over non-empty buckets) for a jackknife SE."""
    full = corrected_hist_jsd(x_KPB, y_KPB, columns)
    keep = np.flatnonzero(x_KPB[:, columns[0]].sum(-1) + y_KPB[:, columns[0]].sum(-1) > 0)
    reps = []
    for b in keep:
        xs, ys = x_KPB.copy(), y_KPB.copy()
        xs[b], ys[b] = 0, 0
        if xs[:, columns[0]].sum() > 0 and ys[:, columns[0]].sum() > 0:
            reps.append(corrected_hist_jsd(xs, ys, columns))
    return full, np.asarray(reps)


def quantile_edges(values_NP: np.ndarray, n_bins: int) -> np.ndarray:
    """Interior edges (P, B-1) at pooled quantiles; outer bins reach to -inf and +inf."""
    qs = np.linspace(0, 1, n_bins + 1)[1:-1]
    return np.quantile(values_NP, qs, axis=0).T.copy()


def lda_direction(x_nd: np.ndarray, y_md: np.ndarray, ridge: float = 1e-3) -> np.ndarray:
    """Fisher's discriminant direction (unit norm) with a ridge on the pooled within-class covariance."""
    cov = 0.5 * (np.cov(x_nd, rowvar=False) + np.cov(y_md, rowvar=False))
    cov = cov + ridge * np.trace(cov) / len(cov) * np.eye(len(cov))
    w = np.linalg.solve(cov, x_nd.mean(0) - y_md.mean(0))
    return w / max(np.linalg.norm(w), 1e-30)


def pca_directions(pool_nd: np.ndarray, k: int) -> np.ndarray:
    """Leading principal directions (d, k) of a pooled subsample."""
    centred = pool_nd - pool_nd.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return vt[:k].T.copy()


def random_directions(d: int, k: int, seed: int) -> np.ndarray:
    g = np.random.default_rng([seed, 0xD1]).standard_normal((d, k))
    return g / np.linalg.norm(g, axis=0)


# --- classifier lower bound -----------------------------------------------------------------------

@contextmanager
def one_torch_thread():
    """Small probes run ~100x faster on one thread than with OpenMP workers fighting dask's threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_probe(kind: str, d: int, hidden: int, seed: int):
    """A logistic probe or a 2-hidden-layer MLP returning logits (torch is a core dependency)."""
    import torch

    torch.manual_seed(seed)
    if kind == "logistic":
        return torch.nn.Linear(d, 1, dtype=torch.float32)
    if kind == "mlp":
        return torch.nn.Sequential(
            torch.nn.Linear(d, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden), torch.nn.GELU(),
            torch.nn.Linear(hidden, 1))
    raise ValueError(f"unknown probe {kind!r}")


class Adam:
    """torch's Adam, stepped through its functional kernel (``torch.optim.adam.adam``): the same arithmetic as
    ``torch.optim.Adam`` (default betas and eps, no weight decay), so the same probes bit for bit
    (tests/unit/analysis/test_probe_adam.py). ``torch.optim.Optimizer`` imports ``torch._dynamo`` on its
    first step, about 1.5 s of CPU: a tenth of the demo analysis, for nothing a probe uses.

    As in ``torch.optim.Adam``, a parameter whose ``grad`` is None is not stepped (its step count stays)."""

    def __init__(self, params, lr: float, foreach: bool | None = None, betas=(0.9, 0.999), eps: float = 1e-8):
        import torch

        self.params = list(params)
        self.lr, self.foreach, self.betas, self.eps = lr, foreach, betas, eps
        step_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        self.exp_avgs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sqs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.steps = [torch.tensor(0.0, dtype=step_dtype) for _ in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        import torch
        from torch.optim.adam import adam

        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not live:
            return
        with torch.no_grad():
            adam([self.params[i] for i in live], [self.params[i].grad for i in live],
                 [self.exp_avgs[i] for i in live], [self.exp_avg_sqs[i] for i in live], [],
                 [self.steps[i] for i in live], foreach=self.foreach, amsgrad=False, beta1=self.betas[0],
                 beta2=self.betas[1], lr=self.lr, weight_decay=0.0, eps=self.eps, maximize=False)


class Probe:
    """A probe and its Adam optimiser, stepped on balanced minibatches of streamed chunks.

    Each chunk pair is shuffled and walked in minibatches of ``batch_size`` per class; the shorter side
    cycles, so every minibatch is balanced and the loss targets the balanced log-loss.
    """

    def __init__(self, kind: str, d: int, *, hidden: int, lr: float, batch_size: int, seed: int):
        self.model = make_probe(kind, d, hidden, seed)
        self.opt = Adam(self.model.parameters(), lr=lr)
        self.bs = batch_size
        self.rng = np.random.default_rng([seed, 0x7A1])

    def fit_chunk(self, pos_Nd: np.ndarray, neg_Md: np.ndarray, min_steps: int = 1) -> None:
        """One pass over the larger side of a chunk pair, and at least ``min_steps`` minibatches."""
        if len(pos_Nd) == 0 or len(neg_Md) == 0:
            return
        self.model.train()
        with one_torch_thread():
            self._steps(pos_Nd, neg_Md, min_steps)

    def _steps(self, pos_Nd: np.ndarray, neg_Md: np.ndarray, min_steps: int) -> None:
        import torch

        target = torch.cat([torch.ones(self.bs), torch.zeros(self.bs)])
        pos_Nd, neg_Md = pos_Nd[self.rng.permutation(len(pos_Nd))], neg_Md[self.rng.permutation(len(neg_Md))]
        for s in range(max(-(-max(len(pos_Nd), len(neg_Md)) // self.bs), min_steps)):
            idx = np.arange(s * self.bs, (s + 1) * self.bs)
            xb = torch.from_numpy(np.concatenate([pos_Nd[idx % len(pos_Nd)],
                                                  neg_Md[idx % len(neg_Md)]]).astype(np.float32))
            loss = torch.nn.functional.binary_cross_entropy_with_logits(self.model(xb)[:, 0], target)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()


class ProbeBank:
    """Several probes trained together: per minibatch one loss (their sum), one backward and one Adam
    step over all parameters. Adam is per-parameter, so each probe gets exactly the update it would get
    alone; the per-step Python and autograd overhead, which dominates for small probes, is paid once.

    ``fit_chunk`` takes, per probe key, the (positive, negative) rows of a chunk; each probe walks its
    own shuffled rows in balanced minibatches (the shorter side cycles).
    """

    def __init__(self, kinds: dict, d: int, *, hidden: int, lr: float, batch_size: int, seed: int):
        self.models = {key: make_probe(kind, d, hidden, seed + 31 * i) for i, (key, kind) in enumerate(kinds.items())}
        params = [p for m in self.models.values() for p in m.parameters()]
        self.opt = Adam(params, lr=lr, foreach=True)
        self.bs = batch_size
        self.rng = np.random.default_rng([seed, 0x7A2])

    def fit_chunk(self, data: dict, steps: int) -> None:
        """``steps`` balanced minibatches for every probe whose key has rows on both sides in ``data``."""
        import torch

        live = {k: (p[self.rng.permutation(len(p))], n[self.rng.permutation(len(n))])
                for k, (p, n) in data.items() if len(p) and len(n)}
        if not live:
            return
        target = torch.cat([torch.ones(self.bs), torch.zeros(self.bs)])
        with one_torch_thread():
            for s in range(steps):
                idx = np.arange(s * self.bs, (s + 1) * self.bs)
                loss = 0
                for k, (pos, neg) in live.items():
                    xb = torch.from_numpy(np.concatenate([pos[idx % len(pos)], neg[idx % len(neg)]]).astype(np.float32))
                    loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(self.models[k](xb)[:, 0], target)
                self.opt.zero_grad()
                loss.backward()
                self.opt.step()


def train_probe(kind: str, d: int, pairs: Iterable[tuple[np.ndarray, np.ndarray]], *, hidden: int,
                batch_size: int, lr: float, seed: int):
    """Train a probe on a stream of (x_pos_Nd, x_neg_Md) chunk pairs; returns the model in eval mode."""
    probe = Probe(kind, d, hidden=hidden, lr=lr, batch_size=batch_size, seed=seed)
    for pos_Nd, neg_Md in pairs:
        probe.fit_chunk(pos_Nd, neg_Md)
    return probe.model.eval()


def token_log_loss(model, x_Nd: np.ndarray, label: int) -> np.ndarray:
    """Per-token log-loss (nats) of the probe for tokens of class ``label``."""
    import torch

    with torch.no_grad(), one_torch_thread():
        logit = model(torch.from_numpy(np.asarray(x_Nd, np.float32)))[:, 0].double()
        sign = -1.0 if label == 1 else 1.0
        return torch.nn.functional.softplus(sign * logit).numpy()


def balanced_log_loss(loss_pos_K: np.ndarray, n_pos_K: np.ndarray, loss_neg_K: np.ndarray,
                      n_neg_K: np.ndarray) -> tuple[float, np.ndarray]:
    """Balanced log-loss ``(mean_pos + mean_neg)/2`` and its per-bucket influence for a clustered SE."""
    n, m = n_pos_K.sum(), n_neg_K.sum()
    lp, ln = loss_pos_K.sum() / n, loss_neg_K.sum() / m
    infl_K = 0.5 * (loss_pos_K - n_pos_K * lp) / n + 0.5 * (loss_neg_K - n_neg_K * ln) / m
    return 0.5 * (lp + ln), infl_K
