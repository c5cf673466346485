"""``train.method: lora``: the plain-LoRA baseline against a closed form, PEFT's own loader and the spec.

The closed form is ``W x + (alpha / r) B A x`` on every token, image or text: a modality gate (MaLoRA's
image/text split) would leave some tokens without the update and fail it.
"""

from __future__ import annotations

import pytest
import torch

from kscale.spec.malora import MaLoRAConfig
from tests.testing_utils import require_module
from tests.unit.train.tiny_qwen import tiny_batch

peft = require_module("peft", install="pip install -e '.[train]'")

from kscale.train.lora import LoRAModel, is_lora_adapter, load_trained  # noqa: E402  (needs peft)

RANK, ALPHA = 4, 8.0


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def _lora(tiny, **over) -> LoRAModel:
    torch.manual_seed(0)
    config = MaLoRAConfig(rank=RANK, alpha=ALPHA, init="random", target_modules=["k_proj", "v_proj"], **over)
    return LoRAModel(tiny.model, config)


def test_forward_is_w_x_plus_scaled_b_a_x_on_every_token(tiny, batch) -> None:
    wrapped = _lora(tiny)
    k_proj = wrapped.model.model.language_model.layers[0].self_attn.k_proj
    seen = {}
    handle = k_proj.register_forward_hook(lambda m, args, out: seen.update(x=args[0].detach(), out=out.detach()))
    try:
        _logits(wrapped, batch)
    finally:
        handle.remove()
    x_BTC, out_BTO = seen["x"], seen["out"]
    A_RC, B_OR = k_proj.lora_A["default"].weight, k_proj.lora_B["default"].weight
    W, b = k_proj.base_layer.weight, k_proj.base_layer.bias
    expected_BTO = x_BTC @ W.T + b + (ALPHA / RANK) * (x_BTC @ A_RC.T @ B_OR.T)
    img_BT = batch["input_ids"] == tiny.image_token_id
    assert img_BT.any() and (~img_BT).any()  # both modalities present: the update must reach each
    update_BTO = expected_BTO - (x_BTC @ W.T + b)
    assert update_BTO[img_BT].abs().max() > 1e-3
    assert update_BTO[~img_BT].abs().max() > 1e-3
    torch.testing.assert_close(out_BTO[img_BT], expected_BTO[img_BT], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_BTO[~img_BT], expected_BTO[~img_BT], rtol=1e-5, atol=1e-6)


def test_only_the_language_models_targets_are_adapted_and_train(tiny) -> None:
    wrapped = _lora(tiny, layers=[1])
    assert sorted(wrapped.lora_layers()) == [f"model.language_model.layers.1.self_attn.{t}" for t in ("k_proj", "v_proj")]
    trainable = {n for n, p in wrapped.model.named_parameters() if p.requires_grad}
    assert trainable == set(wrapped.adapter_parameters()) and len(trainable) == 4
    assert wrapped.gate_values() == {}


def test_branches_off_is_the_base_model_and_half_off_is_refused(tiny, batch) -> None:
    base = _logits(tiny.model, batch)
    wrapped = _lora(tiny)
    adapted = _logits(wrapped, batch)
    assert not torch.allclose(adapted, base, atol=1e-4)
    with wrapped.branches(image=False, text=False):
        assert torch.equal(_logits(wrapped, batch), base)
    torch.testing.assert_close(_logits(wrapped, batch), adapted, rtol=0, atol=0)  # switched back on
    with pytest.raises(ValueError, match="no image or text branch"):
        with wrapped.branches(image=False, text=True):
            pass


def test_saved_adapter_is_a_peft_adapter_and_the_eval_stage_loads_the_run(tiny, batch, tmp_path) -> None:
    """PEFT's own loader reads the saved adapter/ (the field's reference) with the same logits; so does the
    eval stage's ``kind: lora`` variant given the train run directory."""
    import copy

    from kscale.eval.variants import apply_variant
    from types import SimpleNamespace

    from kscale.spec import EvalVariant

    fresh = copy.deepcopy(tiny.model)
    wrapped = _lora(tiny)
    expected = _logits(wrapped, batch)
    wrapped.save_pretrained(tmp_path / "run" / "adapter")
    assert is_lora_adapter(tmp_path / "run" / "adapter")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(fresh), str(tmp_path / "run" / "adapter"))
    assert torch.equal(_logits(reloaded, batch), expected)
    ours = load_trained(copy.deepcopy(fresh), tmp_path / "run" / "adapter")
    assert isinstance(ours, LoRAModel) and torch.equal(_logits(ours, batch), expected)
    out = apply_variant(SimpleNamespace(model=fresh), EvalVariant(name="lora", kind="lora", path=str(tmp_path / "run")))
    assert torch.equal(_logits(out.model, batch), expected)


def test_lora_gradients_reach_the_update_from_text_only_batches(tiny) -> None:
    """No modality routing: a batch without images still trains every LoRA parameter (MaLoRA's image branch
    would get none)."""
    wrapped = _lora(tiny)
    text_only = tiny_batch(tiny, with_image=[False, False], seed=2)
    wrapped(**text_only).loss.backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in wrapped.adapter_parameters().values())


def test_spec_errors_name_train_method(tmp_path) -> None:
    from kscale.spec import SpecError, spec_from_dict

    def raw(**train):
        return {"kind": "train", "model": {"path": "debug:qwen2_5_vl"},
                "data": {"source": "generated"}, "output": {"path": str(tmp_path / "run")}, "train": train}

    assert spec_from_dict(raw(method="lora")).train.method == "lora"
    assert spec_from_dict(raw()).train.method == "malora"
    with pytest.raises(SpecError, match=r"train\.method.*dora"):
        spec_from_dict(raw(method="dora"))
    with pytest.raises(SpecError, match=r"train\.method: lora applies one update to every token"):
        spec_from_dict(raw(method="lora", malora={"image_branch": False}))
