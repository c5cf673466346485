"""Metric functions on constructed logits and arrays with known answers (exact values)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from kscale.bias.aggregate import bootstrap_means, group_rows
from kscale.bias.metrics import blind_share, choose, conflict_outcome, curve_area
from kscale.scoring import answer_positions, answer_scores, derangement


def test_answer_scores_on_constructed_logits() -> None:
    V = 5
    input_ids_BT = torch.tensor([[0, 1, 2, 3], [0, 1, 4, 3]])
    answer_BT = torch.tensor([[False, False, True, True], [False, False, False, True]])
    keep_K = answer_positions(answer_BT)
    assert keep_K.tolist() == [1, 2]  # logit k predicts token k + 1
    logits_BKV = torch.zeros(2, 2, V)
    logits_BKV[0, 0, 2] = math.log(4.0)  # p(2) = 4 / (4 + 4) = 1/2, argmax 2: a hit
    # row 0, k=1: uniform, p(3) = 1/5, argmax 0 (first of ties): a miss
    logits_BKV[1, 1, 3] = 10.0  # row 1 scores only its last token: p(3) = e^10 / (e^10 + 4), a hit
    s = answer_scores(logits_BKV, input_ids_BT, answer_BT, keep_K)
    assert s.ll_sum[0] == pytest.approx(-math.log(2) - math.log(5), abs=1e-6)
    assert s.ll_sum[1] == pytest.approx(10 - math.log(math.exp(10) + 4), abs=1e-6)
    assert s.n_tokens.tolist() == [2, 1]
    assert s.exact.tolist() == [False, True]
    assert s.greedy == ["2 0", "3"]
    assert s.ll_mean[0] == pytest.approx((-math.log(2) - math.log(5)) / 2, abs=1e-6)


def test_choice_conflict_area_share() -> None:
    assert choose(np.array([-1.0, -0.5, -2.0])) == 1
    assert choose(np.array([-1.0, -1.0])) == 0  # ties go to the first (the correct answer)
    assert conflict_outcome(-1.0, -2.0) == (1.0, 0.0)
    assert conflict_outcome(-3.0, -2.0) == (0.0, 1.0)
    assert conflict_outcome(-2.0, -2.0) == (0.5, 0.5)
    # trapezoid of (0, -1), (0.5, -2), (1, -4): (0.5 * -1.5 + 0.5 * -3) / 1
    assert curve_area(np.array([0, 0.5, 1.0]), np.array([-1.0, -2.0, -4.0])) == pytest.approx(-2.25)
    assert curve_area(np.array([0, 0.25, 1.0]), np.array([-1.0, -1.0, -1.0])) == pytest.approx(-1.0)
    floor = -math.log(100)
    assert blind_share(np.array([floor, floor]), np.array([-1.0, -2.0]), floor) == pytest.approx(0.0)
    assert blind_share(np.array([-1.0, -2.0]), np.array([-1.0, -2.0]), floor) == pytest.approx(1.0)
    assert blind_share(np.array([-3.0]), np.array([-1.0]), floor) == pytest.approx((floor + 3) / (floor + 1))


@pytest.mark.parametrize("n", [2, 3, 10, 101])
def test_derangement_has_no_fixed_point_and_is_seeded(n: int) -> None:
    d = derangement(n, seed=3)
    assert sorted(d.tolist()) == list(range(n))  # a permutation: every image is used once
    assert (d != np.arange(n)).all()
    assert np.array_equal(d, derangement(n, seed=3))
    if n > 3:
        assert not np.array_equal(d, derangement(n, seed=4))
    with pytest.raises(ValueError, match="at least 2"):
        derangement(1, 0)


def test_bootstrap_means_against_explicit_resampling() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 2))
    X[3, 1] = np.nan
    boot = bootstrap_means(X, n_boot=20, seed=5)
    # the same multinomial draws, applied by explicit index resampling
    draws = np.random.default_rng([5, 30]).multinomial(30, np.full(30, 1 / 30), size=20)
    for r in range(20):
        idx = np.repeat(np.arange(30), draws[r])
        assert boot[r, 0] == pytest.approx(X[idx, 0].mean())
        assert boot[r, 1] == pytest.approx(np.nanmean(X[idx, 1]))


def test_group_rows_intervals_pairing_and_blind_share() -> None:
    rng = np.random.default_rng(1)
    real = rng.normal(-2, 1, size=200)
    D = pd.DataFrame({"ll_real": real, "dependency_blank": np.full(200, 0.3),
                      "_blind_num": real + 5.0 - 1.0, "_blind_den": real + 5.0})
    rows = {r["metric"]: r for r in group_rows(D, n_boot=400, confidence=0.9, seed=0)}
    # a constant paired difference has a degenerate interval at its value
    assert rows["dependency_blank"]["ci_low"] == pytest.approx(0.3) == rows["dependency_blank"]["ci_high"]
    m = rows["ll_real"]
    assert m["value"] == pytest.approx(real.mean())
    half = 1.645 * real.std(ddof=1) / np.sqrt(200)  # normal theory, 90%
    assert m["ci_high"] - m["ci_low"] == pytest.approx(2 * half, rel=0.2)
    assert rows["blind_share"]["value"] == pytest.approx((real.mean() + 4) / (real.mean() + 5))
    assert "_blind_num" not in rows and rows["blind_share"]["n"] == 200
