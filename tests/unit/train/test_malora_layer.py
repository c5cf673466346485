"""MaLoRALinear against independent references: PEFT LoRA, a hand-written per-token formula, autograd."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kscale.train.malora import MaLoRAConfig, MaLoRALinear, ModalityContext
from kscale.spec.malora import KNOWN_TARGETS
from tests.testing_utils import require_module

# Legend: B batch, T tokens, C in features, O out features.
B, T, C, O, R = 2, 5, 16, 12, 4


def _layer(ctx: ModalityContext, **cfg) -> MaLoRALinear:
    torch.manual_seed(0)
    config = MaLoRAConfig(rank=R, alpha=8.0, init="random", **cfg)
    return MaLoRALinear(nn.Linear(C, O), config, ctx)


def _mixed_mask() -> torch.Tensor:
    mask_BT = torch.zeros(B, T, dtype=torch.bool)
    mask_BT[0, 1:3] = True
    mask_BT[1, 4] = True
    return mask_BT


def test_tied_branches_with_unit_gate_equal_peft_lora() -> None:
    peft = require_module("peft", install="pip install -e '.[train]'")

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(C, O)

        def forward(self, x):
            return self.lin(x)

    torch.manual_seed(0)
    base = Wrap()
    ctx = ModalityContext(image_mask_BT=_mixed_mask())
    malora = MaLoRALinear(nn.Linear(C, O), MaLoRAConfig(rank=R, alpha=8.0, gate="fixed"), ctx)
    malora.base_layer.load_state_dict(base.lin.state_dict())
    lora = peft.get_peft_model(base, peft.LoraConfig(r=R, lora_alpha=8, target_modules=["lin"], init_lora_weights=False))
    A_RC = lora.base_model.model.lin.lora_A["default"].weight
    B_OR = lora.base_model.model.lin.lora_B["default"].weight
    assert B_OR.abs().sum() > 0  # a non-trivial update, else the comparison proves nothing
    with torch.no_grad():
        for branch in ("img", "txt"):
            getattr(malora, f"malora_A_{branch}").copy_(A_RC)
            getattr(malora, f"malora_B_{branch}").copy_(B_OR)
    x_BTC = torch.randn(B, T, C)
    expected = lora(x_BTC)
    torch.testing.assert_close(malora(x_BTC), expected, rtol=0, atol=1e-6)
    assert not torch.allclose(malora.base_layer(x_BTC), expected, atol=1e-3)


def test_each_token_uses_only_its_own_branch() -> None:
    ctx = ModalityContext(image_mask_BT=_mixed_mask())
    layer = _layer(ctx, gate="scalar")
    with torch.no_grad():
        layer.malora_gate_img.fill_(0.7)
        layer.malora_gate_txt.fill_(-1.3)
    x_BTC = torch.randn(B, T, C)
    s = 8.0 / R
    base_BTO = x_BTC @ layer.base_layer.weight.T + layer.base_layer.bias
    img_BTO = base_BTO + 0.7 * s * (x_BTC @ layer.malora_A_img.T @ layer.malora_B_img.T)
    txt_BTO = base_BTO - 1.3 * s * (x_BTC @ layer.malora_A_txt.T @ layer.malora_B_txt.T)
    expected = torch.where(_mixed_mask().unsqueeze(-1), img_BTO, txt_BTO)
    torch.testing.assert_close(layer(x_BTC), expected, rtol=1e-5, atol=1e-6)


def test_token_gate_is_a_sigmoid_of_the_input() -> None:
    ctx = ModalityContext(image_mask_BT=torch.ones(B, T, dtype=torch.bool))
    layer = _layer(ctx, gate="token", text_branch=False)
    with torch.no_grad():
        layer.malora_gate_img_w.normal_()
    x_BTC = torch.randn(B, T, C)
    g_BT1 = torch.sigmoid(x_BTC @ layer.malora_gate_img_w.unsqueeze(-1) + layer.malora_gate_img)
    upd = (x_BTC @ layer.malora_A_img.T @ layer.malora_B_img.T) * (8.0 / R)
    torch.testing.assert_close(layer(x_BTC), layer.base_layer(x_BTC) + g_BT1 * upd, rtol=1e-5, atol=1e-6)
    assert torch.sigmoid(_layer(ctx, gate="token").malora_gate_txt).item() == pytest.approx(0.5)


@pytest.mark.parametrize("all_image", [False, True])
def test_gradients_route_by_modality(all_image: bool) -> None:
    ctx = ModalityContext(image_mask_BT=torch.full((B, T), all_image))
    layer = _layer(ctx, gate="scalar")
    layer(torch.randn(B, T, C)).square().sum().backward()
    used, unused = ("img", "txt") if all_image else ("txt", "img")
    for name in ("A", "B", "gate"):
        assert getattr(layer, f"malora_{name}_{unused}").grad.abs().max() == 0
        assert getattr(layer, f"malora_{name}_{used}").grad.abs().max() > 0


def test_switched_off_branch_has_no_parameters_and_no_effect() -> None:
    ctx = ModalityContext(image_mask_BT=_mixed_mask())
    layer = _layer(ctx, image_branch=False)
    assert not hasattr(layer, "malora_A_img")
    x_BTC = torch.randn(B, T, C)
    out_BTO, base_BTO = layer(x_BTC), layer.base_layer(x_BTC)
    assert torch.equal(out_BTO[_mixed_mask()], base_BTO[_mixed_mask()])
    assert not torch.allclose(out_BTO[~_mixed_mask()], base_BTO[~_mixed_mask()])


def test_mask_shape_mismatch_is_reported() -> None:
    layer = _layer(ModalityContext(image_mask_BT=torch.zeros(1, 3, dtype=torch.bool)))
    with pytest.raises(RuntimeError, match="does not match"):
        layer(torch.randn(B, T, C))


def test_config_validation_names_fields() -> None:
    from kscale.spec import section_problems

    errors = dict(section_problems(MaLoRAConfig(rank=0, target_modules=["k_proj", "qkv"], image_branch=False,
                                                text_branch=False)))
    assert errors == {"rank": "must be >= 1 (got 0)",
                      "target_modules[1]": f"'qkv' is not one of {', '.join(map(repr, KNOWN_TARGETS))}",
                      "image_branch": "both branches are off: nothing to train"}
