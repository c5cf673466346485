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


@pytest.fixture(scope="module", params=["qwen2_5_vl", "llava", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe"])
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
    if loaded.adapter.rope_rows == 3:  # the Qwen-VL families
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


# ----------------------------------------------------------------------------- single-source facts


def test_every_family_has_an_adapter_and_the_spec_offers_exactly_those() -> None:
    import typing

    from kscale.models import FAMILIES
    from kscale.models.registry import ADAPTERS

    assert set(FAMILIES) == set(ADAPTERS)
    hint = typing.get_type_hints(ModelSpec)["architecture"]
    assert typing.get_args(hint) == ("auto", *FAMILIES)


def test_the_model_section_is_what_models_read() -> None:
    """models types the ``model:`` section with its own Protocol (it may not import the spec above it):
    every attribute the Protocol names is a field of ModelSpec."""
    from kscale.models.registry import ModelOptions

    assert isinstance(ModelSpec(path="debug:llava"), ModelOptions)


def test_rope_rows_match_the_positions_the_model_uses(loaded) -> None:
    inputs = _batch(loaded).inputs
    assert _model_positions_BTR(loaded, inputs).shape[-1] == loaded.adapter.rope_rows


def test_head_dim_and_model_info_agree_with_the_projection_shapes(loaded) -> None:
    from kscale.models import model_info

    info = model_info(loaded.model)
    k_proj = loaded.adapter.decoder_layers(loaded.model)[0].self_attn.k_proj  # (key_modules: k_norm for QK-norm)
    assert k_proj.out_features == info.num_kv_heads * info.head_dim
    assert (info.num_layers, info.head_dim) == (loaded.info.num_layers, loaded.info.head_dim)


def test_malora_targets_name_real_linear_modules(loaded) -> None:
    from kscale.models import MALORA_TARGETS

    layer = loaded.adapter.decoder_layers(loaded.model)[0]
    for target, parent in MALORA_TARGETS[loaded.info.family].items():
        assert isinstance(getattr(getattr(layer, parent), target), torch.nn.Linear), target
    with pytest.raises(ValueError, match="'qkv' is not a known projection"):
        loaded.adapter.malora_parent("qkv")


@pytest.mark.parametrize("layers, want", [("all", [0, 1, 2, 3]), ([0, -1], [0, 3]), ([2, 0], [0, 2]), ([-4], [0])])
def test_resolve_layers_counts_negative_from_the_end_and_sorts(layers, want) -> None:
    from kscale.models import resolve_layers

    assert resolve_layers(layers, 4, "x.layers") == want


@pytest.mark.parametrize("layers, problem", [
    ([0, 4], ("x.layers[1]", "layer 4 out of range (model has 4)")),
    ([-5], ("x.layers[0]", "layer -5 out of range (model has 4)")),
    ([3, -1], ("x.layers[1]", "layer -1 repeats x.layers[0] (both are layer 3)")),
    ([1, 1], ("x.layers[1]", "layer 1 repeats x.layers[0] (both are layer 1)")),
])
def test_resolve_layers_rejects_out_of_range_and_repeats_naming_the_field(layers, problem) -> None:
    from kscale.models import layer_problems, resolve_layers

    assert layer_problems(layers, 4, "x.layers") == [problem]
    with pytest.raises(ValueError, match=rf"^{__import__('re').escape(': '.join(problem))}$"):
        resolve_layers(layers, 4, "x.layers")


def test_bias_attention_layers_are_checked_at_load(tmp_path) -> None:
    from kscale.spec import SpecError, spec_from_dict

    d = {"kind": "bias", "model": {"path": "debug:qwen2_5_vl"}, "data": {"source": "generated"},
         "bias": {"dropping": {"attention_layers": [1, -1]}}, "output": {"path": str(tmp_path / "run")}}
    with pytest.raises(SpecError) as e:
        spec_from_dict(d)
    assert dict(e.value.problems) == {
        "bias.dropping.attention_layers[1]": "layer -1 repeats bias.dropping.attention_layers[0] (both are layer 1)"}


def test_torch_free_modules_stay_torch_free() -> None:
    import subprocess
    import sys

    code = "import sys, kscale.spec, kscale.store.layout, kscale.cli, kscale.models; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
