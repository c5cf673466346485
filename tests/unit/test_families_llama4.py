"""Llama 4 (``debug:llama4``: the real ``Llama4ForConditionalGeneration`` with 4 text layers, layer 2 a NoPE
layer, QK-norm and chunked attention (chunk 8) on the RoPE layers, MoE on layers 1 and 3).

There is no CPU torchvision, so transformers' only Llama 4 image processor cannot run; kscale builds the
pixels itself (``kscale.models.llama4.Llama4Pixels``). References kscale did not compute:

- pixels: transformers' own ``Llama4ImageProcessor._preprocess`` (canvas choice, upscale limit, padding,
  bfloat16 normalisation, tiling, global tile), executed from the installed source with the two torchvision
  calls it makes (``resize``, ``pad``) supplied by a stub that does what torchvision's tensor kernels do;
  the resize kernel itself against PIL's bilinear resize; the canvas helpers against transformers' own
  functions on many sizes;
- tokens: transformers' ``Llama4Processor`` (its text side: ``_prompt_split_image``) with a stand-in image
  processor that hands it kscale's pixels and aspect ratios;
- tags: the positions the model itself fills with image features (``get_placeholder_mask``), the tokenizer's
  special tokens; the feature count the vision tower returns;
- keys: a real extraction against the model's own ``k_proj`` outputs (forward hooks; on QK-norm layers the
  closed-form L2 norm of them), its KV cache through the store reader's RoPE, and the positions its rotary
  module receives.

Legend: T tokens, H kv heads, D head dim.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import kscale.store
from kscale.models import IMAGE, SPECIAL, TEXT, load_model
from kscale.models.debug import debug_model_dir
from kscale.models.llama4 import Llama4Pixels, best_canvas, fit_without_distortion, supported_canvases
from kscale.runner import run_job
from kscale.spec import ModelSpec, spec_from_dict
from kscale.store.layout import MODALITIES
from kscale.store.rope import rope_keys, store_rotary
from tests.conftest import extract_spec
from tests.unit.test_processors import SIZES, TEXT as QUESTION, _image

PROMPT = ("<|begin_of_text|><|header_start|>user<|header_end|>\n\n<|image|>{text}<|eot|>"
          "<|header_start|>assistant<|header_end|>\n\n")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lm():
    return load_model(ModelSpec(path=debug_model_dir("llama4"), device="cpu", dtype="float32"))


# -- transformers' own image processing code, run without torchvision

def _tv_pad(images, padding, fill):
    """torchvision's ``pad`` as Llama 4 calls it: [left, top, right, bottom] with a constant fill."""
    left, top, right, bottom = padding
    assert len(set(fill)) == 1
    return torch.nn.functional.pad(images, (left, right, top, bottom), value=fill[0])


def _tv_resize_uint8(images, hw):
    """torchvision's tensor ``resize`` of uint8 images, bilinear with antialias (its ``resize_image``)."""
    if tuple(images.shape[-2:]) == tuple(hw):
        return images
    native = "AVX2" in torch.backends.cpu.get_cpu_capability()
    x = images if native else images.float()
    out = torch.nn.functional.interpolate(x, size=list(hw), mode="bilinear", align_corners=False, antialias=True)
    return out if native else out.round_().to(torch.uint8)


@pytest.fixture(scope="module")
def transformers_llama4():
    """transformers' ``image_processing_llama4`` module, loaded from the installed file under a private name
    with a stub for the one torchvision module it imports (of which the code run here calls only ``pad``)."""
    import transformers.models.llama4 as pkg

    stub = {n: types.ModuleType(n) for n in ("torchvision", "torchvision.transforms", "torchvision.transforms.v2",
                                             "torchvision.transforms.v2.functional")}
    stub["torchvision.transforms.v2.functional"].pad = _tv_pad
    saved = {n: sys.modules.get(n) for n in stub}
    sys.modules.update(stub)
    try:
        name = "transformers.models.llama4._kscale_reference_image_processing"
        spec = importlib.util.spec_from_file_location(name, Path(pkg.__file__).parent / "image_processing_llama4.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # transformers' auto_docstring reads the class's module
        spec.loader.exec_module(mod)
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
    return mod


def _reference_pixels(mod, pixels: Llama4Pixels, image: Image.Image):
    """(pixel_values, aspect_ratios) from transformers' ``Llama4ImageProcessor._preprocess`` itself."""
    from transformers.image_transforms import convert_to_rgb
    from transformers.image_utils import PILImageResampling, SizeDict

    class Backend:  # the torchvision backend's two tensor methods Llama 4's _preprocess calls
        def resize(self, images, size, resample=None):
            assert resample == PILImageResampling.BILINEAR
            return _tv_resize_uint8(images, (size.height, size.width))

        def normalize(self, images, mean, std):  # torchvision's normalize: in the image's dtype
            mean = torch.as_tensor(mean, dtype=images.dtype).view(-1, 1, 1)
            std = torch.as_tensor(std, dtype=images.dtype).view(-1, 1, 1)
            return images.sub(mean).div_(std)

        rescale_and_normalize = mod.Llama4ImageProcessor.rescale_and_normalize

    img = torch.from_numpy(convert_to_rgb(image, return_numpy=True)).permute(2, 0, 1).contiguous()
    out = mod.Llama4ImageProcessor._preprocess(
        Backend(), [img], do_resize=True, size=SizeDict(**pixels.size), resample=PILImageResampling.BILINEAR,
        do_rescale=True, rescale_factor=pixels.rescale_factor, do_normalize=True, image_mean=pixels.image_mean,
        image_std=pixels.image_std, max_patches=pixels.max_patches, resize_to_max_canvas=pixels.resize_to_max_canvas,
        disable_grouping=None, return_tensors="pt")
    return out["pixel_values"], out["aspect_ratios"]


IMAGE_SIZES = SIZES + [(28, 28), (1, 1), (3, 500), (500, 3), (56, 28), (84, 84), (29, 57), (1000, 999)]


@pytest.mark.parametrize("settings", [dict(size={"height": 28, "width": 28}, max_patches=4),
                                      dict(size={"height": 28, "width": 28}, max_patches=6, resize_to_max_canvas=True),
                                      dict(size={"height": 56, "width": 56}, max_patches=16)])
def test_pixels_equal_transformers_preprocess(transformers_llama4, settings) -> None:
    pixels = Llama4Pixels(**settings)
    for i, (w, h) in enumerate(IMAGE_SIZES):
        img = _image(w, h, seed=i)
        want, ratios = _reference_pixels(transformers_llama4, pixels, img)
        ours = pixels([img])
        assert ours["pixel_values"].dtype == want.dtype == torch.bfloat16
        assert ours["aspect_ratios"].tolist() == ratios.tolist(), (w, h)
        assert torch.equal(ours["pixel_values"], want), (settings, w, h)


def test_canvas_helpers_equal_transformers(transformers_llama4) -> None:
    from transformers.image_utils import SizeDict

    mod = transformers_llama4
    rng = np.random.default_rng(0)
    sizes = [(int(a), int(b)) for a, b in rng.integers(1, 5000, size=(300, 2))] + [(336, 672), (672, 336), (1, 1)]
    for max_tiles, tile in ((1, 336), (4, 28), (16, 336), (9, 448)):
        mod.find_supported_resolutions.cache_clear()
        want = mod.find_supported_resolutions(max_num_chunks=max_tiles, patch_size=SizeDict(height=tile, width=tile))
        ours = supported_canvases(max_tiles, tile)
        assert ours == [tuple(r) for r in want]
        cand = torch.tensor(want)
        for hw in sizes:
            for to_max in (False, True):
                assert best_canvas(hw, ours, to_max) == tuple(mod.get_best_fit(hw, cand, to_max).tolist()), (hw, to_max)
            target = best_canvas(hw, ours)
            assert fit_without_distortion(hw, target) == tuple(mod.get_max_res_without_distortion(hw, target))


@pytest.mark.parametrize("native", [True, False])
def test_resize_is_pils_bilinear(native, monkeypatch) -> None:
    """Both torchvision paths (native uint8 on AVX2, float32 and round elsewhere) against PIL: within 1 level."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2" if native else "AVX512")
    for i, (w, h) in enumerate([(200, 90), (57, 83), (640, 480), (30, 20)]):
        img = _image(w, h, seed=i)
        for hw in ((28, 28), (41, 13), (h * 2, w * 2)):
            ours = Llama4Pixels.resize(torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous(), hw)
            pil = np.asarray(img.resize((hw[1], hw[0]), Image.BILINEAR)).transpose(2, 0, 1).astype(int)
            assert np.abs(ours.numpy().astype(int) - pil).max() <= 1, (w, h, hw)


def test_pixels_refuse_settings_they_do_not_implement(tmp_path) -> None:
    import json

    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"resample": 3, "size": {"height": 336,
                                                                                            "width": 336}}))
    with pytest.raises(ValueError, match=r"preprocessor_config.json: resample: 3"):
        Llama4Pixels.from_pretrained(tmp_path)


# -- tokens and tags against transformers' processor and the model

def _processor(lm):
    from transformers import Llama4Processor
    from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

    class StandIn(BaseImageProcessor):  # hands the processor kscale's pixels; its text side does the rest
        def __call__(self, images, **_kw):
            return BatchFeature(lm.image_processor(images))

    v = lm.model.config.vision_config
    return Llama4Processor(image_processor=StandIn(), tokenizer=lm.tokenizer, patch_size=v.patch_size,
                           pixel_shuffle_ratio=v.pixel_shuffle_ratio)


def _model_image_positions(lm, inputs) -> torch.Tensor:
    """(B, T) positions the model fills with image features (its own placeholder mask, checked there against
    the number of features the vision tower returns)."""
    with torch.inference_mode():
        feats = lm.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).last_hidden_state
        flat = lm.model.multi_modal_projector(feats.view(-1, feats.size(-1)))
        embeds = lm.model.get_input_embeddings()(inputs["input_ids"])
        return lm.model.get_placeholder_mask(inputs["input_ids"], embeds, flat)[..., 0]


def _expected_tags(lm, ids, attn, image_BT) -> torch.Tensor:
    special = torch.tensor(sorted(set(lm.tokenizer.all_special_ids) - {lm.tokenizer.unk_token_id}))
    want = torch.full(ids.shape, TEXT, dtype=torch.int8)
    want[torch.isin(ids, special)] = SPECIAL
    want[image_BT] = IMAGE
    want[attn == 0] = -1
    return want


def test_tokens_and_tags_equal_the_processor_and_the_model(lm) -> None:
    proc = _processor(lm)
    for w, h in SIZES:
        img = _image(w, h)
        ours = lm.adapter.build_batch(lm, [img], [QUESTION])
        theirs = proc(images=[img], text=[PROMPT.format(text=QUESTION)], return_tensors="pt", padding_side="right",
                      return_mm_token_type_ids=True)
        assert torch.equal(ours.inputs["input_ids"], theirs["input_ids"]), (w, h)
        assert torch.equal(ours.inputs["attention_mask"], theirs["attention_mask"])
        assert torch.equal(ours.inputs["pixel_values"], theirs["pixel_values"].float())
        image_BT = _model_image_positions(lm, ours.inputs)
        want = _expected_tags(lm, theirs["input_ids"], theirs["attention_mask"], image_BT)
        assert torch.equal(ours.modality_BT, want), (w, h)
        # the processor's mm_token_type_ids marks its image_token (<|image|>, one per image), not the patches
        mm = theirs["mm_token_type_ids"]
        assert int(mm.sum()) == 1 and ours.modality_BT[mm == 1].item() == SPECIAL
        assert ours.n_image_tokens == [int(image_BT.sum())]
        assert (ours.image_index_BT[want == IMAGE] == 0).all() and (ours.image_index_BT[want != IMAGE] == -1).all()


def test_batch_of_two_sizes_and_a_text_only_sample(lm) -> None:
    images = [_image(200, 90), _image(57, 83, seed=1)]
    texts = [QUESTION, "and here , what shape is it ?"]
    ours = lm.adapter.build_batch(lm, images, texts)
    theirs = _processor(lm)(images=images, text=[PROMPT.format(text=t) for t in texts], padding=True,
                            padding_side="right", return_tensors="pt")
    assert torch.equal(ours.inputs["input_ids"], theirs["input_ids"])
    assert torch.equal(ours.inputs["pixel_values"], theirs["pixel_values"].float())
    want = _expected_tags(lm, theirs["input_ids"], theirs["attention_mask"], _model_image_positions(lm, ours.inputs))
    assert torch.equal(ours.modality_BT, want)
    mixed = lm.adapter.build_batch(lm, [images[0], None], [QUESTION, "no image here"])
    alone = lm.adapter.build_batch(lm, [images[0]], [QUESTION])
    n = int(alone.inputs["attention_mask"].sum())
    with torch.inference_mode():
        a, b = lm.model(**mixed.inputs).logits[0, :n], lm.model(**alone.inputs).logits[0, :n]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


# -- keys: a real extraction against k_proj, the KV cache and the model's RoPE positions

@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llama4")
    d = extract_spec(tmp, model="debug:llama4", data={"generated": {"n_samples": 3, "image_size": 84}, "shard_size": 2},
                     extract={"batch_size": 2, "key_dtype": "float32"})
    d["model"]["device"] = "cpu"
    spec = spec_from_dict(d)
    assert run_job(spec, show_bar=False).state == "succeeded"
    return spec, kscale.store.open(spec.output.path)


@pytest.mark.parametrize("extract, field", [({"attention": {"enabled": True}}, "extract.attention.enabled"),
                                            ({"attention": {"store_queries": True}}, "extract.attention.store_queries"),
                                            ({"vectors": ["q", "k"]}, "extract.vectors")])
def test_extract_refuses_attention_and_queries(tmp_path, extract, field) -> None:
    """Llama 4 does not offer attention statistics or queries (``supports``): the stage says so up front,
    however queries are asked for (``attention.store_queries`` or ``vectors: [q, ...]``)."""
    from kscale.extract.run import run_extract

    d = extract_spec(tmp_path, model="debug:llama4", data={"generated": {"n_samples": 2, "image_size": 56}},
                     extract=extract)
    with pytest.raises(ValueError, match=rf"{field}: model family 'llama4' does not support"):
        run_extract(spec_from_dict(d), executor=None)
    assert not (tmp_path / "store").exists()


def _l2norm(k_THD: np.ndarray, eps: float) -> np.ndarray:
    """Llama4TextL2Norm in closed form (float64): x / sqrt(mean(x^2) + eps) per head."""
    k = k_THD.astype(np.float64)
    return k / np.sqrt((k ** 2).mean(-1, keepdims=True) + eps)


def _reference(lm, inputs):
    """k_proj outputs (T, H, D) per layer, the KV cache and the positions the rotary module received."""
    layers = lm.model.language_model.model.layers
    seen, pos = {}, {}
    hooks = [layer.self_attn.k_proj.register_forward_hook(lambda _m, _a, out, i=i: seen.__setitem__(i, out))
             for i, layer in enumerate(layers)]
    hooks.append(lm.model.language_model.model.rotary_emb.register_forward_hook(
        lambda _m, args, _out: pos.__setitem__("ids", args[1])))
    try:
        with torch.inference_mode():
            cache = lm.model(**inputs, use_cache=True).past_key_values
    finally:
        for h in hooks:
            h.remove()
    H, D = lm.info.num_kv_heads, lm.info.head_dim
    return {i: out[0].reshape(-1, H, D).numpy() for i, out in seen.items()}, cache, pos["ids"]


def test_stored_keys_equal_k_proj_kv_cache_and_rope_positions(lm, store) -> None:
    from kscale.data import open_source

    spec, st = store
    text = lm.model.config.get_text_config()
    assert text.no_rope_layers == [1, 1, 0, 1] and text.use_qk_norm  # the debug model has both kinds of layer
    facts = st.attrs["model"]
    assert facts["no_rope_layers"] == [2]
    assert facts["key_source"] == ["l2norm(k_proj)", "l2norm(k_proj)", "k_proj", "l2norm(k_proj)"]
    rotary = store_rotary(st)
    src = open_source(spec.data)
    toks = {m: st.tokens(m) for m in MODALITIES}
    assert len(toks["image"]["position"]) > 0 and len(toks["text"]["position"]) > 0
    for sid in range(len(src)):
        rec = src.get(sid)
        batch = lm.adapter.build_batch(lm, [rec.image], [rec.text])
        k_proj, cache, pos_BT = _reference(lm, batch.inputs)
        for layer in st.layers:
            want_pre = k_proj[layer] if text.no_rope_layers[layer] == 0 else _l2norm(k_proj[layer], text.rms_norm_eps)
            post_THD = cache.layers[layer].keys[0].transpose(0, 1).numpy()
            first = want_pre.shape[0] - post_THD.shape[0]  # a chunked layer caches its last chunk's tokens only
            assert first == 0 or text.layer_types[layer] == "chunked_attention"
            n_rows = 0
            for m in MODALITIES:
                sel = toks[m]["sample_id"] == sid
                if not sel.any():
                    continue
                pos = toks[m]["position"][sel]
                np.testing.assert_allclose(st.keys(layer, m).compute()[sel], want_pre[pos], atol=1e-5, rtol=0)
                post = rope_keys(st, layer, m, rotary=rotary).compute()[sel]
                cached = pos >= first
                np.testing.assert_allclose(post[cached], post_THD[pos[cached] - first], atol=1e-5, rtol=0)
                if text.no_rope_layers[layer] == 0:
                    assert np.array_equal(post, st.keys(layer, m).compute()[sel])  # NoPE: post = pre exactly
                assert np.array_equal(toks[m]["rope_pos"][sel][:, 0], pos_BT[0, pos].numpy())
                n_rows += int(sel.sum())
            assert n_rows == want_pre.shape[0]


def test_reader_rope_is_transformers_apply_rotary_emb(lm) -> None:
    """The rotary helpers against transformers' own ``apply_rotary_emb`` (complex, adjacent pairs)."""
    from transformers.models.llama4.modeling_llama4 import apply_rotary_emb

    from kscale.models.rope import apply_rope, rotary_for_layer

    g = torch.Generator().manual_seed(0)
    k_NHD = torch.randn(40, 2, 16, generator=g)
    pos_N = torch.arange(40) * 3
    rotary = lm.adapter.rotary_module(lm.model)
    freqs = rotary(k_NHD, pos_N[None])
    _, want = apply_rotary_emb(k_NHD[None], k_NHD[None], freqs)
    got = apply_rope(k_NHD.numpy(), pos_N[:, None].numpy(), rotary_for_layer(rotary, 0))
    np.testing.assert_allclose(got, want[0].numpy(), atol=1e-5, rtol=0)
    assert np.array_equal(apply_rope(k_NHD.numpy(), pos_N[:, None].numpy(), rotary_for_layer(rotary, 2)), k_NHD.numpy())


def test_value_modules_give_the_cached_values(lm) -> None:
    """``value_modules`` are the projections whose outputs the KV cache holds as values (no RoPE, no norm)."""
    mods = lm.adapter.value_modules(lm.model)
    batch = lm.adapter.build_batch(lm, [_image(200, 90)], [QUESTION])
    seen = {}
    hooks = [m.register_forward_hook(lambda _m, _a, out, i=i: seen.__setitem__(i, out)) for i, m in enumerate(mods)]
    try:
        with torch.inference_mode():
            cache = lm.model(**batch.inputs, use_cache=True).past_key_values
    finally:
        for h in hooks:
            h.remove()
    H, D = lm.info.num_kv_heads, lm.info.head_dim
    assert len(mods) == lm.info.num_layers
    for i in range(lm.info.num_layers):
        want = cache.layers[i].values[0].transpose(0, 1)  # (T kept, H, D)
        got = seen[i][0].view(-1, H, D)[-want.shape[0]:]
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_attention_stats_rotate_pairs_and_skip_nope_layers(tmp_path, monkeypatch) -> None:
    """kscale's attention statistics (what the MaLoRA evaluation reports) against the eager model's own
    attention probabilities and logits, with the chunk widened past the sequence: kscale's statistics do not
    model chunked attention (and temperature tuning only starts at ``floor_scale`` tokens). Checks the
    adjacent-pair rotation, the NoPE layer and the QK-norm query/key taps."""
    import json
    import shutil

    from kscale.attention.stats import batch_stats, flat_columns
    from kscale.extract.hooks import capture
    from kscale.spec import AttentionSpec
    from tests.unit.attention.conftest import STAT_NAMES, eager_reference, reference_queries, reference_stats

    path = tmp_path / "llama4"
    shutil.copytree(debug_model_dir("llama4"), path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["text_config"]["attention_chunk_size"] = 4096
    (path / "config.json").write_text(json.dumps(cfg))
    lm = load_model(ModelSpec(path=str(path), device="cpu", dtype="float32"))
    eager = load_model(ModelSpec(path=str(path), device="cpu", dtype="float32", attn_implementation="eager"))
    batch = lm.adapter.build_batch(lm, [_image(200, 90)], [QUESTION + " and what shape is it ?"])
    layers, heads = list(range(lm.info.num_layers)), list(range(lm.info.num_kv_heads))
    mods = {("q", i): m for i, m in enumerate(lm.adapter.query_modules(lm.model))}
    mods |= {("k", i): m for i, m in enumerate(lm.adapter.key_modules(lm.model))}
    with torch.inference_mode(), capture(mods, lm.adapter.rotary_module(lm.model)) as cap:
        lm.model(**batch.inputs)
    table = flat_columns(batch_stats(lm, layers, heads, batch, cap, AttentionSpec(enabled=True, query_chunk=4), [0]))
    ref = eager_reference(eager, batch, monkeypatch)
    queries = reference_queries(batch, "after_image", 0)
    assert len(queries[0]) > 0 and len(table["layer"]) == len(layers) * lm.info.num_heads
    for r in range(len(table["layer"])):
        want = reference_stats(ref, batch, queries, int(table["layer"][r]), 0, int(table["q_head"][r]))
        for name in STAT_NAMES:
            np.testing.assert_allclose(table[name][r], want[name], rtol=1e-5, atol=1e-5, equal_nan=True,
                                       err_msg=f"row {r} (layer {int(table['layer'][r])}) {name}")
    # the bias stage's most-attended ranking (kscale.bias.dropping) against the eager attention probabilities
    from kscale.bias.dropping import attention_received
    from kscale.attention.stats import select_queries

    got = attention_received(eager, batch, layers, "after_image", 8)
    q_BT = select_queries(batch, "after_image", 8).float()
    att = [torch.as_tensor(a) for a in ref.probs_LBHTT]  # L x (B, H, T, T)
    want = sum((a * q_BT[:, None, :, None].double()).sum((1, 2)) for a in att) / (
        q_BT.sum(1, keepdim=True).double() * att[0].shape[1] * len(att))
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)


# -- training and bias

def test_two_malora_steps_train_the_adapter() -> None:
    from kscale.data.generated import GeneratedSource
    from kscale.spec import GeneratedDataSpec
    from kscale.spec.train import AlignConfig
    from kscale.train.data import collate
    from kscale.train.malora import MaLoRAConfig, MaLoRAModel
    from kscale.train.objective import MaLoRAObjective
    from kscale.train.run import blank_image_inputs

    lm = load_model(ModelSpec(path=debug_model_dir("llama4"), device="cpu", dtype="float32"))  # its own copy
    torch.manual_seed(0)
    malora = MaLoRAModel(lm.model, MaLoRAConfig(rank=4, init="gaussian", target_modules=["k_proj", "v_proj"]))
    objective = MaLoRAObjective(malora, AlignConfig(loss="mmd", weight=1.0), dummy_pixels=blank_image_inputs(lm)).train()
    params = [p for p in objective.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    src = GeneratedSource(GeneratedDataSpec(n_samples=4, image_size=84, seed=1, tasks=["color", "shape"]))
    for step in range(2):
        batch = collate(lm, [src.get(2 * step), src.get(2 * step + 1)])
        assert (batch.modality_BT == IMAGE).any() and batch.answer_mask_BT.any()
        opt.zero_grad()
        loss, terms = objective(batch.inputs, batch.answer_mask_BT, batch.modality_BT)
        loss.backward()
        opt.step()
        assert np.isfinite(float(loss.detach())) and float(terms["align"]) > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, params))


def test_key_taps_follow_a_wrapped_k_proj(lm) -> None:
    """After MaLoRA wraps ``k_proj``, the QK-norm tap sees the wrapped projection's output (with its update)."""
    from kscale.train.malora import MaLoRAConfig, MaLoRAModel

    model = load_model(ModelSpec(path=debug_model_dir("llama4"), device="cpu", dtype="float32")).model
    lm.adapter.key_modules(model)  # taps installed on the plain projections first
    torch.manual_seed(0)
    malora = MaLoRAModel(model, MaLoRAConfig(rank=4, init="gaussian", target_modules=["k_proj"]))
    for layer in malora.malora_layers().values():  # make the update visible
        for p in layer.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.5)
    batch = lm.adapter.build_batch(lm, [_image(200, 90)], [QUESTION])
    taps, projs = {}, {}
    attn = model.language_model.model.layers[0].self_attn
    h1 = lm.adapter.key_modules(model)[0].register_forward_hook(lambda _m, _a, out: taps.__setitem__("k", out))
    h2 = attn.k_proj.register_forward_hook(lambda _m, _a, out: projs.__setitem__("k", out))
    try:
        with torch.inference_mode():
            malora(**batch.inputs)
    finally:
        h1.remove()
        h2.remove()
    B, T, _ = projs["k"].shape
    want = attn.qk_norm(projs["k"].view(B, T, -1, attn.head_dim)).flatten(2)
    torch.testing.assert_close(taps["k"], want, atol=0, rtol=0)


def test_bias_job_completes(tmp_path) -> None:
    import pandas as pd

    from tests.unit.bias.conftest import bias_job

    spec = spec_from_dict(bias_job(
        tmp_path, "debug:llama4", data={"generated": {"n_samples": 2, "image_size": 56, "tasks": ["color"]}},
        bias={"conditions": ["real", "blank"], "bootstrap": 20,
              "dropping": {"fractions": [1.0], "orders": ["random", "most_attended"]}}))
    assert run_job(spec, show_bar=False).state == "succeeded"
    df = pd.read_parquet(tmp_path / "bias" / "samples.parquet")
    assert len(df) == 2 and np.isfinite(df.ll_real).all() and (df.ll_real != df.ll_blank).any()


@pytest.mark.slow
def test_deepspeed_train_follows_plain_pytorch(tmp_path) -> None:
    """A real ``kind: train`` run (DeepSpeed ZeRO-2, one CPU process) of 2 steps against the plain loop."""
    from tests.testing_utils import require_module

    require_module("deepspeed", install="pip install -e '.[train]'")
    from tests.integration.test_train_deepspeed import _generated, _raw_spec, _run, plain_pytorch_losses

    raw = _raw_spec(debug_model_dir("llama4"), tmp_path / "run", _generated(8), max_steps=2, grad_accum=1)
    losses = _run(raw, tmp_path / "run")
    reference = plain_pytorch_losses(raw, world=1)
    assert len(losses) == len(reference) == 2
    assert max(abs(a - b) / abs(b) for a, b in zip(losses, reference)) < 1e-3, (losses, reference)
