"""Visual dependency against models whose use of the image is known by construction.

- A model that cannot see the image (every image token masked out as a key, positions of the full
  sequence kept) must show dependency 0 for blank / noise / swapped images, within sampling error.
- The positive controls: the model given a colour read-out (its output rows for the colour words fitted to
  its own last hidden state on labelled images: seconds, default suite), and the same model trained on a
  task whose answer is only in the image (colour; ``slow``), must show dependency clearly above 0.
"""

from __future__ import annotations

import copy

import pytest
import torch

from kscale.bias.aggregate import aggregate
from kscale.bias.dropping import full_positions
from kscale.bias.plan import BiasShard
from kscale.bias.variants import Variant, VariantSlot
from kscale.bias.worker import BiasState, score_records
from kscale.spec import spec_from_dict
from tests.unit.bias.conftest import bias_job, records

CONDITIONS = ["real", "blank", "noise", "swapped"]


def _table(tmp_path, lm, n: int, tasks, size: int = 56, **bias):
    spec = spec_from_dict(bias_job(tmp_path, lm.info.path, bias={"conditions": CONDITIONS, "dropping": {"enabled": False},
                                                                 "bootstrap": 500, **bias},
                                   data={"generated": {"n_samples": n, "image_size": size, "tasks": list(tasks)}}))
    src, recs = records(n, tasks=tasks, size=size)
    state = BiasState(lm, src, VariantSlot(lm), [0, 1])
    df = score_records(spec, state, BiasShard(Variant("base", "base"), 0, 0, n), recs)
    agg = aggregate(df, spec.bias)
    return df, agg[agg.task == "all"].set_index("metric")


def _blind(lm):
    """Mask image tokens out of every attention (keys and values), keeping full-sequence positions."""
    image_id = lm.adapter.image_token_id(lm.model.config)

    def hook(_m, args, kwargs):
        if "position_ids" not in kwargs or kwargs["position_ids"] is None:
            kwargs["position_ids"] = full_positions(lm, kwargs)
        kwargs["attention_mask"] = kwargs["attention_mask"] * (kwargs["input_ids"] != image_id).long()
        return args, kwargs

    return lm.model.register_forward_pre_hook(hook, with_kwargs=True)


def test_blind_model_has_no_visual_dependency(qwen, tmp_path) -> None:
    _, seeing = _table(tmp_path / "a", qwen, 24, ("color", "shape", "conflict"))
    handle = _blind(qwen)
    try:
        df, agg = _table(tmp_path / "b", qwen, 24, ("color", "shape", "conflict"))
    finally:
        handle.remove()
    for c in ("blank", "noise", "swapped"):
        row = agg.loc[f"dependency_{c}"]
        assert row.ci_low <= 0 <= row.ci_high
        assert abs(row.value) < 1e-5
        assert (df[f"greedy_{c}"] == df["greedy_real"]).all()
    # the same measure does register the random model's (small, chance) use of the image
    assert max(abs(seeing.loc[f"dependency_{c}"].value) for c in ("blank", "noise")) > 1e-3
    assert (df.n_image_tokens > 0).all()


def _with_colour_readout(lm, n: int = 192, seed: int = 1):
    """A copy of ``lm`` whose output rows for the colour words are a logistic read-out of its last hidden
    state (at the position that predicts the answer), fitted on ``n`` labelled colour images (seed 1; the
    scored records use seed 0) and on ``n // 2`` images without a shape (plain grey, pixel noise; their own
    seed) labelled "any colour". Only the image tells the colour: the answer depends on it by construction.
    """
    import numpy as np
    from PIL import Image

    from kscale.data.generated import COLORS

    _, recs = records(n, tasks=("color",), seed=seed, size=112)
    rng = np.random.default_rng(seed)
    plain = [Image.new("RGB", (112, 112), (int(g),) * 3) for g in rng.integers(0, 256, n // 4)]
    plain += [Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)) for _ in range(n // 4)]
    images = [r.image for r in recs] + plain
    texts = [r.text for r in recs] + [recs[i].text for i in range(len(plain))]
    C = len(COLORS)
    target = torch.cat([torch.nn.functional.one_hot(torch.tensor([list(COLORS).index(r.meta["color"]) for r in recs]), C)
                        .float(), torch.full((len(plain), C), 1 / C)])
    feats = []
    with torch.no_grad():
        for a in range(0, len(images), 32):
            b = lm.adapter.build_batch(lm, images[a:a + 32], texts[a:a + 32])
            hidden_BTC = lm.model(**b.inputs, output_hidden_states=True).hidden_states[-1]
            feats.append(hidden_BTC[torch.arange(len(b.n_image_tokens)), b.inputs["attention_mask"].sum(1) - 1])
    H = torch.cat(feats)
    W = torch.zeros(H.shape[1], C, requires_grad=True)
    opt = torch.optim.LBFGS([W], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(H @ W, target) + 1e-3 * (W ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    ids = [lm.tokenizer(" " + c, add_special_tokens=False).input_ids for c in COLORS]
    assert all(len(i) == 1 for i in ids)
    out = copy.copy(lm)
    out.model = copy.deepcopy(lm.model)
    with torch.no_grad():
        out.model.lm_head.weight[[i[0] for i in ids]] = W.detach().T
    return out, float(((H[:n] @ W).argmax(1) == target[:n].argmax(1)).float().mean())


def test_model_with_a_colour_readout_depends_on_the_image(qwen, tmp_path) -> None:
    """Fast positive control: the measure registers a dependency the model has by construction."""
    reader, train_acc = _with_colour_readout(qwen)
    assert train_acc > 0.5  # the read-out works (chance: 1/6)
    df, agg = _table(tmp_path, reader, 48, ("color",), size=112)
    for c in ("blank", "noise", "swapped"):
        row = agg.loc[f"dependency_{c}"]
        assert row.ci_low > 0.1, (c, row.value, row.ci_low)
    assert (df.n_image_tokens == 16).all()


def _train_on_colour(lm, steps: int = 400, seed: int = 0):
    """A copy of ``lm`` fine-tuned (all weights, Adam) on the colour task: the answer is only in the image."""
    lm = copy.copy(lm)
    lm.model = copy.deepcopy(lm.model).train()
    torch.manual_seed(seed)
    opt = torch.optim.Adam(lm.model.parameters(), lr=1e-3)
    _, recs = records(64, tasks=("color",), seed=1, size=112)  # held out: seed 0
    for step in range(steps):
        batch_recs = [recs[(step * 8 + j) % len(recs)] for j in range(8)]
        b = lm.adapter.build_batch(lm, [r.image for r in batch_recs], [r.text for r in batch_recs],
                                   [r.answer for r in batch_recs])
        logits = lm.model(**b.inputs).logits[:, :-1]
        target, valid = b.inputs["input_ids"][:, 1:], b.answer_mask_BT[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[valid], target[valid])
        opt.zero_grad()
        loss.backward()
        opt.step()
    lm.model.eval()
    return lm, float(loss.detach())


@pytest.mark.slow  # ~15 s of training on 2 cores
def test_model_trained_on_an_image_only_task_depends_on_the_image(qwen, tmp_path) -> None:
    trained, loss = _train_on_colour(qwen)
    assert loss < 0.6  # below the colour prior (about 0.9 nats per answer token)
    df, agg = _table(tmp_path, trained, 24, ("color",), size=112)
    for c in ("blank", "noise", "swapped"):
        row = agg.loc[f"dependency_{c}"]
        assert row.ci_low > 0.2, (c, row.value, row.ci_low, loss)
    assert agg.loc["acc_real"].value > agg.loc["acc_blank"].value + 0.3
    assert (df.n_image_tokens == 16).all()
