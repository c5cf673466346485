"""Classifier lower bounds of the JSD, trained streaming over the store (see ``jsd.py`` for the bound).

For one layer and one comparison, blocks of keys are read one at a time (all selected heads at once);
every target (each head, heads pooled) and every probe kind takes balanced Adam steps on the tokens of
training buckets. Once every comparison's probes are trained, one more pass scores held-out buckets for
all comparisons at once (each block of each modality read once, whichever comparisons and sides use it:
:func:`_score_sums`): per-bucket sums of log-loss give the balanced held-out log-loss, the bound
``log 2 - L`` and a clustered SE. Memory: one block plus small models; a layer no larger than
``dask.chunk_mb`` is read once and kept (tiny stores: the reads would cost more than the probes).

Reads per layer above ``dask.chunk_mb``: training reads a block pair per step (an intra comparison's pair
from one modality), ``jsd.epochs`` passes per comparison while ``jsd.max_train_tokens`` is not reached
(3 layers per epoch with the default comparisons); the scoring one layer. Training is sequential Adam steps
over blocks in a seeded order, so it cannot share a map-reduce pass, and the scoring needs its result.
"""

from __future__ import annotations

import math

import numpy as np

from kscale.analysis import stats
from kscale.spec.analyze import AnalyzeConfig
from kscale.analysis.features import TargetPlan
from kscale.analysis.jsd import LOG2, ProbeBank, balanced_log_loss, to_units, token_log_loss
from kscale.analysis.plan import Comparison
from kscale.analysis.source import Buckets


HELDOUT_P = ("one-sided t of the bound > 0 over the held-out buckets: under H0 (JSD 0) a probe trained on other "
             "buckets has balanced log-loss >= log 2, so the test holds its level (conservative unless the probe "
             "outputs 1/2 everywhere)")


def _rows_of(block_NHd: np.ndarray, sid_N: np.ndarray, heads: list[int], plan: TargetPlan,
             ) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(block_NHd[:, heads], np.float64)
    x = x.reshape(-1, x.shape[-1])
    return (x - plan.centre_d) / plan.scale_d, np.repeat(sid_N, len(heads))


def _side_rows(comp: Comparison, side: str, x: np.ndarray, bucket: np.ndarray, train_K: np.ndarray,
               training: bool) -> tuple[np.ndarray, np.ndarray]:
    keep = comp.mask(side, bucket) & (train_K[bucket] == training)
    return x[keep], bucket[keep]


def probe_rows(lc, n_samples: dict[str, int], joint: list[dict]) -> list[dict]:
    """Classifier-bound rows of every comparison and target of one layer (``run.LayerContext``), from its
    joint blocks (all selected heads)."""
    from kscale.analysis import rows as R

    sc = lc.store
    items = {m: [it[m] for it in joint if it[m] is not None] for m in sc.mods}
    layer_bytes = sum(sc.ks.keys(lc.layer, m, sc.heads).nbytes for m in sc.mods)
    if layer_bytes <= lc.cfg.dask.chunk_mb * 2**20:  # a small layer is read once, not once per epoch and pass
        flat = sc.runner.compute(*[a for m in sc.mods for pair in items[m] for a in pair])
        it = iter(flat)
        items = {m: [(next(it), next(it)) for _ in items[m]] for m in sc.mods}
    targets = {t: (pos, lc.plans[t]) for t, pos in lc.targets.items()}

    def ctx_rows(t):
        return lambda **kw: R.row(store=sc.ks.path, layer=lc.layer, head=t,
                                  n_samples=n_samples[kw["comparison"]], **kw)

    trained = [(comp, _train(lc.cfg, sc.runner, items, comp, targets, sc.buckets)) for comp in sc.comps]
    sums = _score_sums(lc.cfg, sc.runner, items, trained, targets, sc.buckets)  # one pass for every comparison
    out = []
    for (comp, (train_K, _)), (loss, count) in zip(trained, sums):
        out += _score_rows(lc.cfg, comp, targets, train_K, loss, count, ctx_rows)
    return out


def _train(cfg: AnalyzeConfig, runner, items: dict[str, list], comp: Comparison,
           targets: dict[int, tuple[list[int], TargetPlan]], buckets: Buckets) -> tuple[np.ndarray, dict]:
    """Train every probe kind for every target on one comparison: (training buckets (K,) bool, probes by
    (target, kind)).

    ``items[mod]`` are (delayed block, delayed sample ids) pairs of the layer (all selected heads);
    ``targets`` maps target id -> (positions of its heads in the block, plan).
    """
    K = buckets.n_buckets
    train_K = np.ones(K, bool)
    train_K[: max(1, round(cfg.jsd.heldout_fraction * K))] = False  # buckets are random already
    d = next(iter(targets.values()))[1].centre_d.shape[0]
    bank = ProbeBank({(t, k): k for t in targets for k in cfg.jsd.classifiers}, d, hidden=cfg.jsd.mlp_hidden,
                     lr=cfg.jsd.lr, batch_size=cfg.jsd.batch_size, seed=cfg.seed)
    rng = np.random.default_rng([cfg.seed, 0xE90C])
    bx, by = items[comp.mod_x], items[comp.mod_y]
    min_steps = -(-cfg.jsd.min_steps // max(len(bx), len(by)))  # small runs still train properly
    for _ in range(cfg.jsd.epochs):
        seen = 0
        ox, oy = rng.permutation(len(bx)), rng.permutation(len(by))
        for i in range(max(len(bx), len(by))):
            if seen >= cfg.jsd.max_train_tokens:
                break
            arr_x, sid_x, arr_y, sid_y = runner.compute(*bx[ox[i % len(bx)]], *by[oy[i % len(by)]])
            seen += min(len(sid_x), len(sid_y))
            data = {}
            for t, (heads, plan) in targets.items():
                x, sx = _rows_of(arr_x, sid_x, heads, plan)
                y, sy = _rows_of(arr_y, sid_y, heads, plan)
                xp, _ = _side_rows(comp, "x", x, buckets.of(sx), train_K, True)
                yn, _ = _side_rows(comp, "y", y, buckets.of(sy), train_K, True)
                data.update({(t, k): (xp, yn) for k in cfg.jsd.classifiers})
            bank.fit_chunk(data, _steps(cfg, data, min_steps))
    return train_K, bank.models


def _steps(cfg: AnalyzeConfig, data: dict, min_steps: int) -> int:
    """Minibatches for one chunk pair: one pass over the larger side, at least ``min_steps`` but at most
    ``jsd.max_passes`` passes (a tiny store would otherwise repeat a few hundred tokens hundreds of times)."""
    rows = max((max(len(p), len(n)) for p, n in data.values()), default=0)
    one_pass = max(1, -(-rows // cfg.jsd.batch_size))
    return max(one_pass, min(min_steps, cfg.jsd.max_passes * one_pass))


def heldout_stats(loss_x_K: np.ndarray, nx_K: np.ndarray, loss_y_K: np.ndarray, ny_K: np.ndarray,
                  alpha: float) -> dict[str, float]:
    """Bound log 2 - L of per-bucket held-out log-loss sums and token counts, its bucket-clustered SE, t interval
    and one-sided p (:func:`stats.heldout_bound_p`)."""
    nonempty = (nx_K + ny_K) > 0
    value_loss, infl = balanced_log_loss(loss_x_K, nx_K, loss_y_K, ny_K)
    se = stats.cluster_se(infl, nonempty)
    bound = LOG2 - value_loss
    lo, hi = stats.t_interval(bound, se, int(nonempty.sum()), alpha)
    p, _ = stats.heldout_bound_p(bound, se, int(nonempty.sum()))
    return {"bound": bound, "se": se, "lo": lo, "hi": hi, "p": p}


def _score_sums(cfg, runner, items, trained: list, targets, buckets) -> list[tuple[dict, dict]]:
    """Held-out per-bucket log-loss sums and token counts of every trained comparison (``trained``: (comparison,
    (train_K, probes)) each), in one pass: each block of each modality is read once and scored for every
    comparison and side of that modality. Per comparison, side, target and kind the sums add the blocks in
    the order a pass of that comparison alone adds them (the same numbers). Returns (loss, count) per
    comparison, in order."""
    K = buckets.n_buckets
    sums = [({(t, k, s): np.zeros(K) for t in targets for k in cfg.jsd.classifiers for s in "xy"},
             {(t, s): np.zeros(K) for t in targets for s in "xy"}) for _ in trained]
    for mod in dict.fromkeys(m for comp, _ in trained for m in (comp.mod_x, comp.mod_y)):
        uses = [(i, side) for side in "xy" for i, (comp, _) in enumerate(trained)
                if (comp.mod_x if side == "x" else comp.mod_y) == mod]
        for blk, sid_blk in items[mod]:
            arr, sid = runner.compute(blk, sid_blk)
            for i, side in uses:
                comp, (train_K, probes) = trained[i]
                loss, count = sums[i]
                if not (~train_K[buckets.of(np.unique(sid))]).any():
                    continue
                for t, (heads, plan) in targets.items():
                    x, s = _rows_of(arr, sid, heads, plan)
                    xs, bk = _side_rows(comp, side, x, buckets.of(s), train_K, False)
                    count[(t, side)] += np.bincount(bk, minlength=K)
                    for k in cfg.jsd.classifiers:
                        ll = token_log_loss(probes[(t, k)], xs, 1 if side == "x" else 0)
                        loss[(t, k, side)] += np.bincount(bk, weights=ll, minlength=K)
    return sums


def _score_rows(cfg, comp, targets, train_K, loss, count, ctx_rows) -> list[dict]:
    """Rows of one comparison from its held-out sums (:func:`_score_sums`)."""
    out = []
    for t in targets:
        nx, ny = count[(t, "x")], count[(t, "y")]
        if nx.sum() < 1 or ny.sum() < 1:
            continue
        for k in cfg.jsd.classifiers:
            st = heldout_stats(loss[(t, k, "x")], nx, loss[(t, k, "y")], ny, cfg.significance.alpha)
            u = cfg.jsd.units
            out.append(ctx_rows(t)(
                comparison=comp.name, estimator=f"jsd_clf_{k}", kernel=k, value=to_units(st["bound"], u),
                se=to_units(st["se"], u), ci_low=to_units(st["lo"], u), ci_high=to_units(st["hi"], u), p=st["p"],
                p_method="heldout_t", units=u, n_tokens=int(nx.sum() + ny.sum()),
                conventions={"what": "lower bound: log 2 - balanced held-out log-loss", "p": HELDOUT_P,
                             "heldout_buckets": int((~train_K).sum()), "epochs": cfg.jsd.epochs,
                             "max_train_tokens": cfg.jsd.max_train_tokens, "inputs": "standardised",
                             "max_value": 1.0 if u == "bits" else math.log(2)}))
    return out
