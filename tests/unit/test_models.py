"""Family adapters (kscale.models) against what the loaded model itself does.

Legend: B batch, T tokens, R rope rows (3 for M-RoPE).
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from kscale.extract.hooks import capture
from kscale.models import load_model
from kscale.models.debug import debug_model_dir
from kscale.spec import ModelSpec


@pytest.fixture(scope="module", params=["qwen2_5_vl", "llava"])
def loaded(request):
    return load_model(ModelSpec(path=debug_model_dir(request.param), device="cpu", dtype="float32"))


def _batch(lm):
    """Two samples of different lengths (right padding), the first with a real (non-constant) image."""
    img = Image.fromarray(torch.randint(0, 256, (56, 84, 3), generator=torch.Generator().manual_seed(0))
                          .to(torch.uint8).numpy(), "RGB")
    return lm.adapter.build_batch(lm, [img, img.resize((56, 56))], ["what is shown?", "and here, what colour?"],
                                  ["a cat", "red"])


def _model_positions_BTR(lm, inputs) -> torch.Tensor:
    with torch.no_grad(), capture({}, lm.adapter.rotary_module(lm.model)) as cap:
        lm.model(**inputs, use_cache=False, logits_to_keep=1)
    return cap.positions_BTR


def test_position_ids_are_the_ones_the_model_passes_to_its_rotary_embedding(loaded) -> None:
    batch = _batch(loaded)
    pos = loaded.adapter.position_ids(loaded, batch.inputs)
    B, T = batch.inputs["input_ids"].shape
    seen_BTR = _model_positions_BTR(loaded, batch.inputs)
    if loaded.info.family == "qwen2_5_vl":
        assert pos.shape == (3, B, T)
        assert (pos[1] != pos[2]).any()  # really 3-D on the image tokens
        got_BTR = pos.permute(1, 2, 0)
    else:
        assert torch.equal(pos, torch.arange(T).expand(B, T))
        got_BTR = pos[..., None]
    assert torch.equal(got_BTR, seen_BTR)


def test_image_features_are_what_the_forward_computes_from_pixels(loaded) -> None:
    batch = _batch(loaded)
    encoded = {k: v for k, v in batch.inputs.items() if k != "pixel_values"}
    with torch.no_grad():
        encoded["mm_encoder_outputs"] = {"image": loaded.adapter.image_features(loaded.model, batch.inputs)}
        want = loaded.model(**batch.inputs, use_cache=False).logits
        got = loaded.model(**encoded, use_cache=False).logits
    assert torch.equal(got, want)
