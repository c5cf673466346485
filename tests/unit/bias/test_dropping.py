"""Token dropping removes exactly the requested tokens and keeps every kept token's position (M-RoPE).

References: deleting the dropped rows of ``inputs_embeds`` and running the language model on the rest
with the full-sequence positions; the model's own eager attention probabilities for the ranking.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kscale.attention.stats import select_queries
from kscale.bias.dropping import attention_received, context_text_BT, drop_plan, dropped_inputs, full_positions
from kscale.bias.worker import score
from kscale.extract.hooks import capture
from kscale.models import IMAGE
from tests.unit.bias.conftest import records


@pytest.fixture(params=["qwen", "llava"])
def model(request):
    return request.getfixturevalue(request.param)


def _batch(lm, recs):
    return lm.adapter.build_batch(lm, [r.image for r in recs], [r.text for r in recs], [r.answer for r in recs])


def _embeds(lm, inputs):
    """inputs_embeds the language model receives (image features already scattered in)."""
    got = {}

    def hook(_m, args, kwargs):
        got["e"] = kwargs["inputs_embeds"].detach()

    h = lm.model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            lm.model(**inputs, logits_to_keep=1)
    finally:
        h.remove()
    return got["e"]


def _deleted_ll(lm, batch, drop_T, pos):
    """Mean answer log-likelihood of sample 0 with the dropped rows deleted from the sequence."""
    n = int(batch.inputs["attention_mask"][0].sum())
    keep = (~drop_T[:n]).nonzero().flatten()
    assert batch.inputs["input_ids"].shape[0] == 1
    emb = _embeds(lm, batch.inputs)
    p = pos[..., :1, :n][..., keep] if pos.ndim == 3 else pos[:1, :n][:, keep]
    with torch.no_grad():
        h = lm.model.model.language_model(inputs_embeds=emb[:, keep], position_ids=p).last_hidden_state
        logp = torch.log_softmax(lm.model.lm_head(h).float(), -1)[0]
    ids, ans = batch.inputs["input_ids"][0, :n][keep], batch.answer_mask_BT[0, :n][keep]
    t = ans[1:].nonzero().flatten()  # kept index t predicts kept index t + 1
    return float(logp[t, ids[t + 1]].mean())


@pytest.mark.parametrize("order", ["random", "text", "least_attended"])
def test_dropped_forward_equals_deleting_the_tokens(model, order) -> None:
    _, recs = records(1, size=112)
    batch = _batch(model, recs)
    pos = full_positions(model, batch.inputs)
    received = attention_received(model, batch, [0, 1], "after_image", 8)
    for frac in (0.5, 1.0):
        drop_BT = drop_plan(batch, order, frac, 0, [0], received)
        ref = _deleted_ll(model, batch, drop_BT[0], pos)
        got = score(model, dropped_inputs(model, batch.inputs, drop_BT, pos), batch.answer_mask_BT).ll_mean[0]
        assert got == pytest.approx(ref, abs=2e-5)
    none = torch.zeros_like(batch.answer_mask_BT)
    undropped = score(model, dropped_inputs(model, batch.inputs, none, pos), batch.answer_mask_BT).ll_mean[0]
    assert undropped == pytest.approx(score(model, batch.inputs, batch.answer_mask_BT).ll_mean[0], abs=1e-5)


def test_positions_are_the_full_sequence_ones_qwen(qwen) -> None:
    _, recs = records(3, size=112)
    batch = _batch(qwen, recs)
    pos_RBT = full_positions(qwen, batch.inputs)
    with torch.no_grad(), capture({}, qwen.adapter.rotary_module(qwen.model)) as cap:
        qwen.model(**batch.inputs, logits_to_keep=1)
    assert torch.equal(cap.positions_BTR.permute(2, 0, 1), pos_RBT)  # what the model computes unmasked
    assert (pos_RBT[1] != pos_RBT[2]).any()  # really 3-D on image tokens
    drop_BT = drop_plan(batch, "random", 0.5, 0, [0, 1, 2], None)
    with torch.no_grad(), capture({}, qwen.adapter.rotary_module(qwen.model)) as cap:
        qwen.model(**dropped_inputs(qwen, batch.inputs, drop_BT, pos_RBT), logits_to_keep=1)
    assert torch.equal(cap.positions_BTR.permute(2, 0, 1), pos_RBT)
    # the pitfall the explicit positions avoid: masking alone re-numbers Qwen's M-RoPE positions
    # (transformers 5.23 even fails on it: get_rope_index fills only the unmasked slots)
    masked = dict(batch.inputs, attention_mask=batch.inputs["attention_mask"] * (~drop_BT).long())
    try:
        with torch.no_grad(), capture({}, qwen.adapter.rotary_module(qwen.model)) as cap:
            qwen.model(**masked, logits_to_keep=1)
        assert not torch.equal(cap.positions_BTR.permute(2, 0, 1), pos_RBT)
    except RuntimeError as e:
        assert "shape mismatch" in str(e)


def test_drop_plan_counts_pools_and_orders(qwen) -> None:
    _, recs = records(3, size=112)
    batch = _batch(qwen, recs)
    received = torch.rand(batch.modality_BT.shape, generator=torch.Generator().manual_seed(0))
    img_BT = batch.modality_BT == IMAGE
    ctx_BT = context_text_BT(batch.modality_BT, batch.answer_mask_BT)
    assert not (ctx_BT & batch.answer_mask_BT).any() and ctx_BT.sum() > 0
    first_answer_B = batch.answer_mask_BT.int().argmax(1)
    assert not ctx_BT[torch.arange(3), first_answer_B - 1].any()  # the query predicting the answer stays
    for frac in (0.25, 0.5, 1.0):
        for order in ("random", "least_attended", "most_attended", "text"):
            d = drop_plan(batch, order, frac, 3, [0, 1, 2], received)
            pool = ctx_BT if order == "text" else img_BT
            assert not (d & ~pool).any()
            assert d.sum(1).tolist() == [round(frac * int(n)) for n in pool.sum(1)]
            for b in range(3):
                n = int(d[b].sum())
                idx = pool[b].nonzero().flatten()
                r = received[b, idx]
                if order == "most_attended":
                    assert set(idx[r.argsort(descending=True)[:n]].tolist()) == set(d[b].nonzero().flatten().tolist())
                if order == "least_attended":
                    assert set(idx[r.argsort()[:n]].tolist()) == set(d[b].nonzero().flatten().tolist())
            assert torch.equal(d, drop_plan(batch, order, frac, 3, [0, 1, 2], received))  # seeded
    assert not torch.equal(drop_plan(batch, "random", 0.5, 3, [0, 1, 2], None),
                           drop_plan(batch, "random", 0.5, 4, [0, 1, 2], None))


def test_attention_received_matches_eager_attention(qwen_dir) -> None:
    from kscale.models import load_model
    from kscale.spec import ModelSpec

    lm = load_model(ModelSpec(path=qwen_dir, dtype="float32", attn_implementation="eager"))
    _, recs = records(3, size=112)
    batch = _batch(lm, recs)
    got = attention_received(lm, batch, [0, 1], "after_image", 8)
    with torch.no_grad():
        att = lm.model(**batch.inputs, output_attentions=True).attentions  # L x (B, H, T, T)
    q_BT = select_queries(batch, "after_image", 8).float()
    ref = sum((a * q_BT[:, None, :, None]).sum((1, 2)) for a in att) / (
        q_BT.sum(1, keepdim=True) * att[0].shape[1] * len(att))
    np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=1e-5)
