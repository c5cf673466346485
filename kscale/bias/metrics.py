"""The per-sample measures of the bias table, built on answer scores: pure array functions.

How it connects: the bias worker (:mod:`kscale.bias.worker`) scores each candidate answer with
:func:`kscale.scoring.answer_scores` (the same scores ``kscale.train.evaluate`` uses); these functions turn
those scores into candidate choice, evidence-conflict outcome, dropping-curve areas and the blind share.

Legend: C candidates, F fractions.
"""

from __future__ import annotations

import numpy as np


def choose(score_C: np.ndarray) -> int:
    """Index of the best-scoring candidate (ties: the first, i.e. the correct answer listed first loses no tie)."""
    return int(np.argmax(score_C))


def conflict_outcome(score_answer: float, score_claim: float) -> tuple[float, float]:
    """(follows_image, follows_text) for an evidence conflict: 1 for the side whose answer scores higher."""
    if score_answer > score_claim:
        return 1.0, 0.0
    if score_claim > score_answer:
        return 0.0, 1.0
    return 0.5, 0.5


def curve_area(fractions_F: np.ndarray, values_F: np.ndarray) -> float:
    """Normalised trapezoid area under a dropping curve: the mean value over [fractions[0], fractions[-1]]."""
    x = np.asarray(fractions_F, dtype=float)
    y = np.asarray(values_F, dtype=float)
    if len(x) < 2:
        return float(y[0])
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0 / (x[-1] - x[0]))


def blind_share(ll_blind: np.ndarray, ll_real: np.ndarray, floor: float) -> float:
    """Share of the answer's log-likelihood gain (over a uniform guess, ``floor`` = -log V per token) that
    the blind baseline already reaches: (mean blind - floor) / (mean real - floor).

    1: the image adds nothing to the language prior; 0: without the image the model is no better than
    uniform. Ratio of means, so single samples near the floor do not dominate.
    """
    return float((np.mean(ll_blind) - floor) / (np.mean(ll_real) - floor))
