"""Answer scores from logits, and the per-sample measures built on them: pure tensor/array functions.

How it connects: the bias worker (:mod:`kscale.bias.worker`) runs the model with ``logits_to_keep`` set
to :func:`answer_positions` (only logits that predict an answer token are materialised), then calls
:func:`answer_scores` for the teacher-forced log-likelihood and exact match of each row's answer span.
The other functions turn those scores into the measures of the bias table (candidate choice, evidence
conflict, curve areas, the blind share). ``kscale.train.evaluate`` scores its before/after table with
the same two functions, and the MaLoRA objective (``kscale.train.objective``) keeps only the logits of
:func:`answer_positions` for its LM loss.

Legend: B rows (sample x candidate), T tokens, K kept logit positions, V vocabulary, C candidates, F fractions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class AnswerScores:
    """Teacher-forced scores of each row's answer span (float64 / bool numpy, length B)."""

    ll_sum: np.ndarray  # sum of log p(answer token | prefix)
    n_tokens: np.ndarray  # answer tokens scored
    exact: np.ndarray  # every answer token is the argmax (greedy decoding would produce the answer)
    greedy: list[str]  # argmax token ids at the answer positions, space-joined (for agreement)

    @property
    def ll_mean(self) -> np.ndarray:
        """Mean per-token log-likelihood (NaN for rows without answer tokens)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.ll_sum / self.n_tokens


def answer_positions(answer_mask_BT: torch.Tensor) -> torch.Tensor:
    """Positions whose next token is an answer token in any row: the logits ``answer_scores`` needs (K,)."""
    return torch.nonzero(answer_mask_BT[:, 1:].any(dim=0)).squeeze(-1)


def answer_scores(logits_BKV: torch.Tensor, input_ids_BT: torch.Tensor, answer_mask_BT: torch.Tensor,
                  keep_K: torch.Tensor) -> AnswerScores:
    """Log-likelihood and exact match of the answer span from logits at positions ``keep_K``.

    Logit position ``k`` predicts token ``k + 1``; a row's answer tokens are where ``answer_mask_BT`` is set.
    """
    keep_K = keep_K.to(input_ids_BT.device)
    targets_BK = input_ids_BT[:, keep_K + 1]
    valid_BK = answer_mask_BT[:, keep_K + 1]
    logp_BKV = torch.log_softmax(logits_BKV.float(), dim=-1)
    logp_BK = logp_BKV.gather(-1, targets_BK.unsqueeze(-1)).squeeze(-1)
    argmax_BK = logits_BKV.argmax(-1)
    hit_BK = (argmax_BK == targets_BK) | ~valid_BK
    ll = (logp_BK.double() * valid_BK).sum(1)
    greedy = [" ".join(str(int(t)) for t in argmax_BK[b][valid_BK[b]]) for b in range(len(argmax_BK))]
    return AnswerScores(ll.cpu().numpy(), valid_BK.sum(1).cpu().numpy(), hit_BK.all(1).cpu().numpy(), greedy)


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


def derangement(n: int, seed: int) -> np.ndarray:
    """donor[i] != i for every i (n >= 2): a seeded random cycle through all indices."""
    if n < 2:
        raise ValueError(f"a swapped image needs at least 2 samples, got {n}")
    order = np.random.default_rng([seed, n, 0x5A]).permutation(n)
    donor = np.empty(n, dtype=np.int64)
    donor[order] = np.roll(order, -1)  # each index takes the next one in the shuffled cycle
    return donor
