"""The device plan of a model spread over the GPUs of one actor, checked on the meta device (no memory).

72B on 4 x 80 GiB and 2 x 139 GiB: whole decoder layers, vision tower and embeddings on device 0, the
LM head on the last, and every device within two decoder layers of the mean (balanced, not filled in
order). A budget the model does not fit is refused before anything loads.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from kscale.models.checkpoints import qwen2_5_vl_config
from kscale.models.registry import plan_device_map

GiB = 2**30
CLASS = "Qwen2_5_VLForConditionalGeneration"


def _bytes_per_device(plan: dict[str, int], config) -> dict[int, int]:
    from accelerate import init_empty_weights
    from accelerate.utils import compute_module_sizes
    from transformers import Qwen2_5_VLForConditionalGeneration

    with init_empty_weights():
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    sizes = compute_module_sizes(model, dtype=torch.bfloat16)
    out: dict[int, int] = defaultdict(int)
    for name, dev in plan.items():
        out[dev] += sizes[name]
    return dict(out)


@pytest.mark.parametrize("n,gib", [(4, 80), (2, 139)])
def test_72b_plan_is_balanced_in_whole_layers(n, gib):
    cfg = qwen2_5_vl_config("72b")
    plan = plan_device_map(CLASS, cfg, n, torch.bfloat16, gib * GiB)
    assert set(plan.values()) == set(range(n))
    layer_names = [k for k in plan if k.startswith("model.language_model.layers")]
    assert all(k.count(".") == 3 for k in layer_names) or layer_names == ["model.language_model.layers"]
    assert len(layer_names) == 80  # each decoder layer placed whole, by itself
    assert plan["model.visual"] == 0 and plan["model.language_model.embed_tokens"] == 0
    assert plan["lm_head"] == n - 1
    per = _bytes_per_device(plan, cfg)
    layer = 2 * 0.87e9  # one 72B decoder layer in bf16 (~0.87 B parameters)
    mean = sum(per.values()) / n
    assert max(per.values()) <= gib * GiB and max(abs(v - mean) for v in per.values()) <= 2 * layer, per


def test_plan_refuses_a_model_that_does_not_fit():
    with pytest.raises(ValueError, match="does not fit 2 device"):
        plan_device_map(CLASS, qwen2_5_vl_config("72b", num_layers=40), 2, torch.bfloat16, 30 * GiB)
