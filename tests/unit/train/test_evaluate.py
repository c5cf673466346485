"""The before/after table: variant switches and image conditions against direct recomputation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kscale.train.evaluate import evaluate, key_gap
from kscale.train.malora import MaLoRAConfig, MaLoRAModel


def _records(n: int):
    from kscale.data.generated import GeneratedSource
    from kscale.spec import GeneratedDataSpec

    src = GeneratedSource(GeneratedDataSpec(n_samples=n, seed=2, tasks=["color", "shape"]))
    return [src.get(i) for i in range(n)]


def test_fresh_adapter_rows_equal_base_and_ablation_is_distinct(loaded_qwen) -> None:
    records = _records(4)
    malora = MaLoRAModel(loaded_qwen.model, MaLoRAConfig())  # B = 0: identical to the base model
    table = evaluate(loaded_qwen, malora, records, layers=[0, 1], batch_size=3)
    assert table["malora"] == pytest.approx(table["base"], rel=1e-6)
    with torch.no_grad():
        for name, p in malora.adapter_parameters().items():
            if "_B_img" in name:
                p.normal_()
    table = evaluate(loaded_qwen, malora, records, layers=[0, 1], batch_size=3)
    assert table["malora_no_image_branch"] == pytest.approx(table["base"], rel=1e-6)  # text B still 0
    assert table["malora"]["key_mmd2_layer0"] != pytest.approx(table["base"]["key_mmd2_layer0"], rel=1e-3)
    row = table["base"]
    assert row["visual_dependency"] == pytest.approx(row["ll_real"] - row["ll_blank"])
    assert row["ll_real"] != row["ll_blank"] and row["ll_real"] != row["ll_swapped"]
    assert row["lm_loss"] > 0 and row["ll_real"] < 0


def test_key_gap_is_zero_for_one_distribution_and_grows_with_a_shift() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    same, _ = key_gap(a, b, n_heads=2)
    shifted, _ = key_gap(a + 1.0, b, n_heads=2)
    assert abs(same) < 0.01 < shifted


def test_attention_rows_match_a_direct_eager_computation(loaded_qwen) -> None:
    """attn_mass_image of the base variant equals softmax attention recomputed with eager attention."""
    records = _records(3)
    malora = MaLoRAModel(loaded_qwen.model, MaLoRAConfig())
    table = evaluate(loaded_qwen, malora, records, layers=[1], batch_size=3)
    batch = loaded_qwen.adapter.build_batch(loaded_qwen, [r.image for r in records], [r.text for r in records],
                                            [r.answer for r in records])
    loaded_qwen.model.config._attn_implementation = "eager"
    loaded_qwen.model.config.get_text_config()._attn_implementation = "eager"
    with torch.no_grad():
        attn_BHTT = malora(**batch.inputs, output_attentions=True).attentions[1]
    answer_BT, image_BT = batch.answer_mask_BT, batch.modality_BT == 1
    mass = [attn_BHTT[b][:, answer_BT[b]][..., image_BT[b]].sum(-1).mean(-1) for b in range(3)]  # (H,) each
    assert table["base"]["attn_mass_image"] == pytest.approx(torch.stack(mass).mean().item(), rel=1e-4)
    assert 0 < table["base"]["attn_efficiency_image"]
