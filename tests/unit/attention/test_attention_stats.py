"""Attention statistics from hooked q/k (SDPA forward) against the model's own eager attention.

Legend: B batch, T tokens, H query heads, L layers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kscale.attention.stats import batch_stats, flat_columns
from kscale.extract.worker import ExtractState, forward_capture
from kscale.spec import AttentionSpec
from tests.unit.attention.conftest import STAT_NAMES, eager_reference, reference_queries, reference_stats


def run_stats(lm, batch, attn: AttentionSpec, heads: list[int], sample_ids: list[int]) -> dict[str, np.ndarray]:
    """kscale's path: the SDPA model under the extraction hooks, then batch_stats."""
    state = ExtractState(lm, list(range(lm.info.num_layers)), heads, None)
    cap = forward_capture(state, batch, queries=True)
    return flat_columns(batch_stats(lm, state.layers, heads, batch, cap, attn, sample_ids))


def assert_matches_reference(got, ref, batch, attn: AttentionSpec) -> int:
    """Every row of ``got`` equals the eager reference to 1e-5; returns the number of rows checked."""
    queries_B = reference_queries(batch, attn.queries, attn.last_k)
    sid_to_b = {sid: b for b, sid in enumerate(sorted(set(got["sample_id"].tolist())))}
    for r in range(len(got["sample_id"])):
        want = reference_stats(ref, batch, queries_B, int(got["layer"][r]), sid_to_b[int(got["sample_id"][r])],
                               int(got["q_head"][r]))
        for name in STAT_NAMES:
            np.testing.assert_allclose(got[name][r], want[name], rtol=1e-5, atol=1e-5, equal_nan=True,
                                       err_msg=f"row {r} {name}")
    return len(got["sample_id"])


@pytest.mark.parametrize("heads", [[0, 1], [1]], ids=["all-heads", "kv-head-1"])
def test_stats_equal_eager_attention(family_models, records, heads, monkeypatch):
    """after_image queries, several query chunks, a batch mixing images and a text-only sample."""
    sdpa, eager = family_models
    recs = records[:3]
    images = [recs[0].image, None, recs[2].image]  # the text-only sample has no after_image queries
    batch = sdpa.adapter.build_batch(sdpa, images, [r.text for r in recs])
    attn = AttentionSpec(enabled=True, queries="after_image", query_chunk=3)
    got = run_stats(sdpa, batch, attn, heads, [10, 11, 12])
    G = sdpa.info.num_heads // sdpa.info.num_kv_heads
    assert sorted(set(got["q_head"].tolist())) == [k * G + g for k in heads for g in range(G)]
    assert np.array_equal(got["kv_head"], got["q_head"] // G)
    assert (got["n_queries"][got["sample_id"] == 11] == 0).all()
    assert (got["n_queries"][got["sample_id"] != 11] > attn.query_chunk).all()  # really chunked
    # sharpened attention is far from uniform, so this comparison has teeth
    img = got["sample_id"] != 11
    assert np.nanmax(np.abs(got["efficiency_image"][img] - 1)) > 0.05
    n = assert_matches_reference(got, eager_reference(eager, batch, monkeypatch), batch, attn)
    assert n == 3 * sdpa.info.num_layers * len(heads) * G


@pytest.mark.parametrize("queries", ["last_k", "answer"])
def test_query_selections_equal_eager_attention(family_models, records, queries, monkeypatch):
    sdpa, eager = family_models
    recs = records[:2]
    batch = sdpa.adapter.build_batch(sdpa, [r.image for r in recs], [r.text for r in recs],
                                     answers=[r.answer for r in recs])
    attn = AttentionSpec(enabled=True, queries=queries, last_k=5, query_chunk=2)
    got = run_stats(sdpa, batch, attn, [0, 1], [0, 1])
    assert (got["n_queries"] > 0).all()
    assert_matches_reference(got, eager_reference(eager, batch, monkeypatch), batch, attn)


def test_right_padding_equals_batch_size_one(family_models, records):
    """Samples of different lengths padded on the right give the statistics they get alone."""
    sdpa, _ = family_models
    recs = records[:4]
    images = [r.image for r in recs[:3]] + [None]
    attn = AttentionSpec(enabled=True, queries="last_k", last_k=12, query_chunk=5)
    batch = sdpa.adapter.build_batch(sdpa, images, [r.text for r in recs])
    lengths = batch.inputs["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1  # padding really present
    together = run_stats(sdpa, batch, attn, [0, 1], list(range(4)))
    for b in range(4):
        alone_batch = sdpa.adapter.build_batch(sdpa, [images[b]], [recs[b].text])
        alone = run_stats(sdpa, alone_batch, attn, [0, 1], [b])
        rows = together["sample_id"] == b
        for name in STAT_NAMES + ["layer", "q_head"]:
            np.testing.assert_allclose(together[name][rows], alone[name], rtol=1e-5, atol=1e-5, equal_nan=True,
                                       err_msg=f"sample {b} {name}")


class TensorSizes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any op creates and how many row maxima (one per query chunk) are taken."""

    def __init__(self):
        super().__init__()
        self.max_numel, self.n_amax = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        self.n_amax += func is torch.ops.aten.amax.default
        return out


def test_long_sequence_never_materialises_full_attention(family_models, records):
    """~3000 tokens, ~3000 queries: no tensor bigger than one (H, chunk, T) block per layer; many blocks."""
    sdpa, _ = family_models
    text = " ".join(["red green blue square"] * 750)
    batch = sdpa.adapter.build_batch(sdpa, [records[0].image], [text])
    T = batch.inputs["input_ids"].shape[1]
    state = ExtractState(sdpa, list(range(sdpa.info.num_layers)), [0, 1], None)
    cap = forward_capture(state, batch, queries=True)
    attn = AttentionSpec(enabled=True, queries="after_image", query_chunk=128)
    with TensorSizes() as sizes:
        got = flat_columns(batch_stats(sdpa, state.layers, state.heads, batch, cap, attn, [0]))
    H, L, nq = sdpa.info.num_heads, sdpa.info.num_layers, int(got["n_queries"][0])
    assert T > 3000 and nq > 2900
    assert sizes.max_numel <= L * H * attn.query_chunk * T  # layers may share a block; H*T*T is 12x more
    assert sizes.n_amax >= -(-nq // attn.query_chunk)  # one row max per block of queries
    assert np.isfinite(got["entropy"]).all() and np.allclose(sum(got[f"mass_{m}"] for m in
                                                                  ("text", "image", "video", "special")), 1)
