"""MaLoRA outside kscale: the one-call loader, and the text branch exported as a PEFT LoRA adapter.

The reference is PEFT itself: ``PeftModel.from_pretrained`` on a fresh copy of the base model must give
the same logits as MaLoRA on text-only input (where MaLoRA applies exactly its text branch).
"""

from __future__ import annotations

import json

import pytest
import torch

from kscale.train.malora import MaLoRAConfig, MaLoRAModel, export_peft, load
from tests.testing_utils import require_module

peft = require_module("peft", install="pip install -e '.[train]'")


def _fresh(debug_qwen_dir):
    from kscale.models.registry import load_model
    from kscale.spec import ModelSpec

    return load_model(ModelSpec(path=debug_qwen_dir, device="cpu", dtype="float32"))


@pytest.fixture
def adapter_dir(debug_qwen_dir, tmp_path):
    """A trained-looking adapter: random A and B in both branches, text gate 0.7, two projections."""
    loaded = _fresh(debug_qwen_dir)
    torch.manual_seed(3)
    cfg = MaLoRAConfig(rank=4, alpha=12.0, init="random", gate="scalar", gate_init=0.7,
                       target_modules=["k_proj", "v_proj"])
    malora = MaLoRAModel(loaded.model, cfg)
    with torch.no_grad():
        for name, p in malora.adapter_parameters().items():
            if "gate_img" in name:
                p.fill_(1.3)
    return malora.save_pretrained(tmp_path / "adapter")


def _text_ids(loaded, n: int = 2) -> torch.Tensor:
    ids = loaded.tokenizer(["what colour is the square", "a red circle on the left"], return_tensors="pt",
                           padding=True)["input_ids"]
    image_id = loaded.adapter.image_token_id(loaded.model.config)
    assert not (ids == image_id).any()  # text only: MaLoRA's image branch is not used
    return ids[:n]


def test_user_loader_from_a_checkpoint_path(debug_qwen_dir, adapter_dir):
    malora = load(debug_qwen_dir, adapter_dir, dtype="float32", device="cpu")
    assert isinstance(malora, MaLoRAModel) and not malora.training
    assert malora.loaded is not None and malora.loaded.tokenizer is not None
    saved = MaLoRAModel.from_pretrained(_fresh(debug_qwen_dir).model, adapter_dir).adapter_state_dict()
    got = malora.adapter_state_dict()
    assert set(got) == set(saved) and all(torch.equal(got[k], saved[k]) for k in got)
    with torch.no_grad():
        out = malora(input_ids=_text_ids(malora.loaded)).logits
    assert torch.isfinite(out).all()


def test_peft_export_equals_malora_on_text_only_input(debug_qwen_dir, adapter_dir, tmp_path):
    out_dir = export_peft(adapter_dir, tmp_path / "peft", base_model_name_or_path=debug_qwen_dir)
    cfg = json.loads((out_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 12.0
    assert all(".language_model." in m for m in cfg["target_modules"])  # never the vision tower

    malora = load(_fresh(debug_qwen_dir).model, adapter_dir)
    base = _fresh(debug_qwen_dir)
    ids = _text_ids(base)
    peft_model = peft.PeftModel.from_pretrained(base.model, str(out_dir)).eval()
    n_lora = sum(1 for n, _ in peft_model.named_modules() if n.endswith("lora_A"))
    assert n_lora == len(cfg["target_modules"]) == 2 * base.info.num_layers
    with torch.no_grad():
        want = malora(input_ids=ids).logits
        got = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            plain = peft_model(input_ids=ids).logits
    assert (want - plain).abs().max() > 1e-3  # the adapter changes the output: the comparison means something
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_merged_text_branch_switches_off_like_a_merged_peft_lora(debug_qwen_dir, adapter_dir, tmp_path):
    """After merging, PEFT's ``disable_adapter`` on a merged LoRA gives the base model back (it unmerges for
    the block); MaLoRA's text branch switched off after ``merge_text_branch`` must do the same, and with it
    on, equal the merged PEFT model (text-only input: MaLoRA applies exactly its text branch)."""
    out_dir = export_peft(adapter_dir, tmp_path / "peft", base_model_name_or_path=debug_qwen_dir)
    malora = load(_fresh(debug_qwen_dir).model, adapter_dir)
    base = _fresh(debug_qwen_dir)
    ids = _text_ids(base)
    peft_model = peft.PeftModel.from_pretrained(base.model, str(out_dir)).eval()
    peft_model.merge_adapter()
    malora.merge_text_branch()
    with torch.no_grad():
        merged_on, want_on = malora(input_ids=ids).logits, peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            want_off = peft_model(input_ids=ids).logits
        merged_off = {}
        for image in (True, False):  # image branch on or off: neither may keep the text update
            with malora.branches(image=image, text=False):
                merged_off[image] = malora(input_ids=ids).logits
    assert (want_on - want_off).abs().max() > 1e-3  # the merged update is visible: switching it off matters
    torch.testing.assert_close(merged_on, want_on, atol=1e-5, rtol=1e-5)
    for image, got in merged_off.items():
        torch.testing.assert_close(got, want_off, atol=1e-5, rtol=1e-5, msg=f"image branch on: {image}")


def test_export_refuses_what_peft_cannot_express(debug_qwen_dir, tmp_path):
    loaded = _fresh(debug_qwen_dir)
    token = MaLoRAModel(loaded.model, MaLoRAConfig(rank=2, gate="token")).save_pretrained(tmp_path / "token")
    with pytest.raises(ValueError, match="token-conditioned gate"):
        export_peft(token, tmp_path / "out1")
    loaded = _fresh(debug_qwen_dir)
    image_only = MaLoRAModel(loaded.model, MaLoRAConfig(rank=2, text_branch=False)).save_pretrained(tmp_path / "img")
    with pytest.raises(ValueError, match="no text branch"):
        export_peft(image_only, tmp_path / "out2")
