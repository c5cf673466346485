"""MaLoRAModel on a tiny random Qwen2.5-VL: exact no-op at init, routing, save/load, merge, recompute."""

from __future__ import annotations

import copy

import pytest
import torch

from kscale.train.malora import MALORA_PARAM_NAMES, MaLoRAConfig, MaLoRAModel
from tests.unit.train.tiny_qwen import tiny_batch, tiny_qwen


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def _randomize(wrapped: MaLoRAModel, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in wrapped.adapter_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_zero_b_gives_exactly_the_base_logits(tiny, batch) -> None:
    expected = _logits(tiny.model, batch)
    wrapped = MaLoRAModel(tiny.model, MaLoRAConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]))
    assert len(wrapped.malora_layers()) == 2 * 5
    assert torch.equal(_logits(wrapped, batch), expected)


def test_only_adapter_parameters_train_and_names_are_stable(tiny) -> None:
    wrapped = MaLoRAModel(tiny.model, MaLoRAConfig(layers=[1]))
    trainable = {n for n, p in wrapped.model.named_parameters() if p.requires_grad}
    assert trainable == set(wrapped.adapter_parameters())
    assert sorted(trainable) == sorted(
        f"model.language_model.layers.1.self_attn.k_proj.{n}" for n in MALORA_PARAM_NAMES if "_w" not in n
    )


def test_bad_layer_index_is_reported(tiny) -> None:
    with pytest.raises(ValueError, match=r"malora.layers\[0\]: layer 5 out of range \(model has 2\)"):
        MaLoRAModel(tiny.model, MaLoRAConfig(layers=[5]))


def test_model_gradients_route_by_modality(tiny) -> None:
    wrapped = MaLoRAModel(tiny.model, MaLoRAConfig(init="random"))
    text_only = tiny_batch(tiny, with_image=[False, False], seed=2)
    wrapped(**text_only).loss.backward()
    grads = {n: p.grad for n, p in wrapped.adapter_parameters().items()}
    assert all(g.abs().max() == 0 for n, g in grads.items() if "_img" in n)
    assert all(g.abs().max() > 0 for n, g in grads.items() if "_txt" in n)


def test_image_tokens_change_only_through_the_image_branch(tiny, batch) -> None:
    """Perturbing the text branch leaves the image-token keys of layer 0 untouched."""
    wrapped = MaLoRAModel(tiny.model, MaLoRAConfig(init="random"))
    k_proj = wrapped.model.model.language_model.layers[0].self_attn.k_proj
    keys = []
    handle = k_proj.register_forward_hook(lambda m, i, o: keys.append(o.detach().clone()))
    try:
        _logits(wrapped, batch)
        with torch.no_grad():
            k_proj.malora_B_txt.add_(1.0)
        _logits(wrapped, batch)
    finally:
        handle.remove()
    img_BT = batch["input_ids"] == tiny.image_token_id
    assert img_BT.any() and (~img_BT).any()
    assert torch.equal(keys[0][img_BT], keys[1][img_BT])
    assert not torch.allclose(keys[0][~img_BT], keys[1][~img_BT])


def test_save_load_round_trip_gives_identical_logits(tiny, batch, tmp_path) -> None:
    config = MaLoRAConfig(gate="token", target_modules=["k_proj", "v_proj"])
    wrapped = MaLoRAModel(tiny.model, config)
    _randomize(wrapped)
    expected = _logits(wrapped, batch)
    wrapped.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = MaLoRAModel.from_pretrained(tiny_qwen(seed=0).model, tmp_path / "adapter")
    assert loaded.malora_config == config
    assert torch.equal(_logits(loaded, batch), expected)
    assert not torch.equal(_logits(tiny_qwen(seed=0).model, batch), expected)


def test_merge_text_branch_keeps_logits_and_changes_w(tiny, batch) -> None:
    wrapped = MaLoRAModel(tiny.model, MaLoRAConfig(target_modules=["k_proj", "o_proj"]))
    _randomize(wrapped)
    expected = _logits(wrapped, batch)
    with wrapped.branches(image=False):
        expected_no_img = _logits(wrapped, batch)
    k_proj = wrapped.model.model.language_model.layers[0].self_attn.k_proj
    w_before = k_proj.base_layer.weight.clone()
    wrapped.merge_text_branch()
    assert not torch.allclose(k_proj.base_layer.weight, w_before)
    torch.testing.assert_close(_logits(wrapped, batch), expected, rtol=1e-4, atol=1e-5)
    with wrapped.branches(image=False):
        torch.testing.assert_close(_logits(wrapped, batch), expected_no_img, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("image", [True, False], ids=["image-on", "image-off"])
def test_merged_text_branch_switched_off_takes_the_update_back_out(tiny, batch, image) -> None:
    """Merging folds the text update into W; switching the text branch off afterwards must still remove it
    from every token, as before the merge (PEFT's ``disable_adapter`` on a merged LoRA gives the base model
    likewise: test_malora_export.py). With both branches off this is the frozen base the objective compares
    against: the logits of the model MaLoRA wraps, before any adapter."""
    base = _logits(tiny_qwen(seed=0).model, batch)
    wrapped = MaLoRAModel(tiny.model, MaLoRAConfig(target_modules=["k_proj", "o_proj"]))
    _randomize(wrapped)
    with wrapped.branches(image=image, text=False):
        before = _logits(wrapped, batch)
    wrapped.merge_text_branch()
    with wrapped.branches(image=image, text=False):
        after = _logits(wrapped, batch)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    if not image:
        torch.testing.assert_close(after, base, rtol=1e-4, atol=1e-5)
    assert (after - _logits(wrapped, batch)).abs().max() > 1e-3  # the text update is large enough to see


def test_unload_restores_the_base_model(tiny, batch) -> None:
    expected = _logits(tiny.model, batch)
    wrapped = MaLoRAModel(tiny.model, MaLoRAConfig(init="random"))
    assert not torch.equal(_logits(wrapped, batch), expected)
    assert torch.equal(_logits(wrapped.unload(), batch), expected)


def _grads_of(wrapped: MaLoRAModel, batch_a, batch_b, checkpointing: str) -> dict[str, torch.Tensor]:
    """Forward a, then forward b (which overwrites the hook's mask), then backward a."""
    if checkpointing == "malora":
        wrapped.enable_activation_checkpointing()
    elif checkpointing == "hf":
        wrapped.model.activation_checkpointing_enable({"use_reentrant": False})
    wrapped.train()
    loss_a = wrapped(**batch_a).loss
    if batch_b is not None:
        wrapped(**batch_b)
    loss_a.backward()
    return {n: p.grad.clone() for n, p in wrapped.adapter_parameters().items()}


def test_mask_is_right_during_activation_recomputation(tiny) -> None:
    batch_a = tiny_batch(tiny, with_image=[True, True], seed=3)
    batch_b = tiny_batch(tiny, with_image=[False, False], seed=4, text_len=12)
    batch_b = {k: v[:, : batch_a["input_ids"].shape[1]] for k, v in batch_b.items()}  # same shape, other mask
    config = MaLoRAConfig(init="random")
    models = [copy.deepcopy(tiny.model) for _ in range(3)]
    torch.manual_seed(5)
    reference = _grads_of(MaLoRAModel(models[0], config), batch_a, None, "none")
    torch.manual_seed(5)
    pinned = _grads_of(MaLoRAModel(models[1], config), batch_a, batch_b, "malora")
    for name, grad in reference.items():
        torch.testing.assert_close(pinned[name], grad, rtol=1e-5, atol=1e-7)
    # Plain checkpointing recomputes with batch b's mask: the gradients differ, so the test has teeth.
    torch.manual_seed(5)
    naive = _grads_of(MaLoRAModel(models[2], config), batch_a, batch_b, "hf")
    assert any(not torch.allclose(naive[n], g, atol=1e-6) for n, g in reference.items())
