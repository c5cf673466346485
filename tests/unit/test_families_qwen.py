"""Every Qwen-VL family (qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe) against transformers itself.

References kscale did not compute, per family, on its ``debug:<family>`` tiny random model built from the
real transformers classes:

- the family's own processor class (``Qwen2VLProcessor``, ``Qwen2_5_VLProcessor``, ``Qwen3VLProcessor``,
  image-only: no CPU torchvision, see NOTES.md) for ids, pixels and ``mm_token_type_ids``; every token's
  tag follows from the processor's output (1 image, 2 video, the tokenizer's special tokens special);
- transformers' own ``k_proj`` modules (hooked here, and Qwen3's ``k_norm`` applied here) for the stored
  pre-RoPE keys, its KV cache for the post-RoPE keys the reader rebuilds, and the model's
  ``get_rope_index`` for the stored RoPE positions, through a real extraction (``run_job``);
- slow: a 2-step MaLoRA train (DeepSpeed, ``python -m kscale.train``) and a bias run complete.

Legend: B batch, T tokens, H kv heads, D head dim.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import kscale.store
from kscale.models import IMAGE, SPECIAL, TEXT, VIDEO, load_model
from kscale.models.debug import debug_model_dir
from kscale.models.inputs import Media, Sample, Turn
from kscale.runner import run_job
from kscale.spec import ModelSpec, spec_from_dict
from kscale.store.layout import MODALITIES
from tests.conftest import REPO, extract_spec
from tests.unit.test_processors import _image

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"]
FAMILIES_WITH_VIDEO = FAMILIES
PROCESSORS = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor",
              "qwen3_vl_moe": "Qwen3VLProcessor"}
VS, IMG, VE = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


def _load(family: str):
    return load_model(ModelSpec(path=debug_model_dir(family), device="cpu", dtype="float32"))


def family_processor(family: str, path: str):
    """The family's transformers processor, without a video processor (its ``__call__`` unchanged)."""
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.processing_utils import ProcessorMixin

    class _ImageOnly(getattr(transformers, PROCESSORS[family])):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = IMG, "<|video_pad|>"
            self.vision_start_token, self.vision_end_token = VS, VE  # Qwen3-VL's processor reads them (>= 5.25)
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return _ImageOnly(image_processor=AutoImageProcessor.from_pretrained(path),
                      tokenizer=AutoTokenizer.from_pretrained(path))


def _conversation() -> tuple[Sample, str]:
    """Two images interleaved with the text and an answer, and the same prompt as the processor's text."""
    user = Turn("user", (Media("image", 0), "the left one , and", Media("image", 1), "the right one ?"))
    s = Sample((user, Turn("assistant", ("red",))), [_image(200, 90), _image(57, 83, seed=1)])
    prompt = (f"<|im_start|>user\n{VS}{IMG}{VE}the left one , and{VS}{IMG}{VE}the right one ?<|im_end|>\n"
              "<|im_start|>assistant\n red<|im_end|>")
    return s, prompt


def processor_tags(proc, out) -> torch.Tensor:
    """Tags from the processor's output alone: its mm_token_type_ids (1 image, 2 video), the tokenizer's
    special tokens special (an unknown word stays text), text otherwise."""
    ids, mm = out["input_ids"], out["mm_token_type_ids"]
    tags = torch.full(ids.shape, TEXT, dtype=torch.int8)
    special = set(proc.tokenizer.all_special_ids) - {proc.tokenizer.unk_token_id}
    tags[torch.isin(ids, torch.tensor(sorted(special)))] = SPECIAL
    tags[mm == 1], tags[mm == 2] = IMAGE, VIDEO
    return tags


def test_inputs_and_tags_equal_the_family_processor(family) -> None:
    lm = _load(family)
    proc = family_processor(family, lm.info.path)
    s, prompt = _conversation()
    ours = lm.adapter.batch(lm, [s])
    theirs = proc(images=s.images, text=[prompt], return_tensors="pt")
    for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"):
        assert torch.equal(ours.inputs[k].to(theirs[k].dtype), theirs[k]), k
    assert torch.equal(ours.modality_BT, processor_tags(proc, theirs))
    cfg = lm.model.config
    ids = theirs["input_ids"][0]
    wrappers = torch.isin(ids, torch.tensor([cfg.vision_start_token_id, cfg.vision_end_token_id]))
    assert int(wrappers.sum()) == 4 and (ours.modality_BT[0][wrappers] == SPECIAL).all()
    merge = proc.image_processor.merge_size
    assert int((ours.modality_BT == IMAGE).sum()) == int(theirs["image_grid_thw"].prod(1).sum()) // merge ** 2


def test_wrappers_stay_special_where_a_processor_counts_them_as_image(family, monkeypatch) -> None:
    """Some processors (Gemma 3, Idefics3) put begin/end-of-image tokens in ``image_token_ids``: the tag of a
    wrapper (``Adapter.wrapper_ids``) is special whatever ``mm_token_type_ids`` says."""
    lm = _load(family)
    cfg, adapter = lm.model.config, lm.adapter
    monkeypatch.setattr(adapter, "special_ids", lambda loaded: set())  # the wrapper rule alone decides
    wide = [cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id]
    monkeypatch.setattr(adapter, "mm_token_ids", lambda config: {1: wide, 2: [cfg.video_token_id]})
    b = adapter.batch(lm, [Sample.simple(_image(56, 56), "what is it ?")])
    ids = b.inputs["input_ids"][0]
    assert (b.modality_BT[0][torch.isin(ids, torch.tensor(wide[1:]))] == SPECIAL).all()
    assert (b.inputs["mm_token_type_ids"][0][ids == cfg.vision_start_token_id] == 1).all()  # the contract as given
    assert (b.modality_BT[0][ids == cfg.image_token_id] == IMAGE).all()


# ----------------------------------------------------------------------------- a real extraction


@pytest.fixture(scope="module")
def extracted(family, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"store-{family}")
    spec = spec_from_dict(extract_spec(
        tmp, model=f"debug:{family}", extract={"batch_size": 2, "key_dtype": "float32"},
        data={"source": "generated", "generated": {"n_samples": 4, "image_size": 112}, "shard_size": 2}))
    run_job(spec, show_bar=False)
    return spec, kscale.store.open(spec.output.path)


def _sample_rows(store, sid: int, layer: int, rope: bool = False):
    """(positions, keys_THD, rope_pos_TR) of one sample over every modality, in sequence order."""
    pos, keys, rp = [], [], []
    for m in MODALITIES:
        t = store.tokens(m)
        sel = t["sample_id"] == sid
        if sel.any():
            pos.append(t["position"][sel])
            keys.append(store.keys(layer, m, rope=rope).compute()[sel])
            rp.append(t["rope_pos"][sel])
    order = np.argsort(np.concatenate(pos))
    return np.concatenate(pos)[order], np.concatenate(keys)[order], np.concatenate(rp)[order]


def _transformers_keys(lm, inputs) -> tuple[dict[int, torch.Tensor], object]:
    """Pre-RoPE keys (T, H, D) per layer from transformers' own modules: k_proj's output, through the
    attention's k_norm where it has one (Qwen3's QK-norm, applied before RoPE), and the KV cache."""
    outs, handles = {}, []
    layers = lm.model.model.language_model.layers
    for i, layer in enumerate(layers):
        handles.append(layer.self_attn.k_proj.register_forward_hook(
            lambda _m, _a, out, i=i: outs.__setitem__(i, out.detach())))
    try:
        with torch.no_grad():
            cache = lm.model(**inputs, use_cache=True).past_key_values
    finally:
        for h in handles:
            h.remove()
    H, D = lm.info.num_kv_heads, lm.info.head_dim
    keys = {}
    for i, out in outs.items():
        k = out[0].view(-1, H, D)
        attn = layers[i].self_attn
        keys[i] = attn.k_norm(k).detach() if hasattr(attn, "k_norm") else k
    return keys, cache


def test_stored_keys_equal_k_proj_kv_cache_and_rope_index(extracted) -> None:
    spec, store = extracted
    lm = load_model(spec.model)
    src = __import__("kscale.data", fromlist=["x"]).open_source(spec.data)
    assert store.layers == list(range(lm.info.num_layers))
    for sid in range(len(src)):
        rec = src.get(sid)
        b = lm.adapter.build_batch(lm, [rec.image], [rec.text])
        inputs = b.inputs
        ref, cache = _transformers_keys(lm, inputs)
        want_pos, _ = lm.model.model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs["attention_mask"])
        for li in store.layers:
            pos, pre, rope_TR = _sample_rows(store, sid, li)
            assert np.array_equal(pos, np.arange(ref[li].shape[0]))  # every token, none padded
            np.testing.assert_allclose(pre, ref[li].numpy(), atol=1e-5, rtol=0)
            _, post, _ = _sample_rows(store, sid, li, rope=True)
            np.testing.assert_allclose(post, cache.layers[li].keys[0].permute(1, 0, 2).numpy(), atol=1e-5, rtol=0)
            assert np.array_equal(rope_TR, want_pos[:, 0].T.numpy())
        assert (rope_TR[:, 1] != rope_TR[:, 2]).any()  # really 3-D on the image tokens


def test_store_records_deepstack_layers_and_info_shows_them(extracted, family) -> None:
    from click.testing import CliRunner

    from kscale.cli import main

    spec, store = extracted
    cfg = json.loads((Path(debug_model_dir(family)) / "config.json").read_text())
    n = len(cfg["vision_config"].get("deepstack_visual_indexes", []))
    want = list(range(n)) if family.startswith("qwen3") else None
    assert store.attrs["model"].get("deepstack_layers") == want
    out = CliRunner().invoke(main, ["info", spec.output.path])
    assert out.exit_code == 0, out.output
    line = [ln for ln in out.output.splitlines() if ln.startswith("deepstack_layers")]
    assert line == ([f"{'deepstack_layers':18s} {want}"] if want else [])
    # Qwen3's keys are k_norm(k_proj(x)) (QK-norm, transformers' Qwen3VLTextAttention has k_norm), the others k_proj's
    has_norm = hasattr(load_model(spec.model).model.model.language_model.layers[0].self_attn, "k_norm")
    assert has_norm == family.startswith("qwen3")
    source = "k_norm" if has_norm else "k_proj"
    assert store.attrs["key_source"] == source
    assert f"{'key_source':18s} {source}" in out.output.splitlines()
    if want:  # the model really adds visual features after those layers: the hidden states differ there
        lm = load_model(spec.model)
        rec = __import__("kscale.data", fromlist=["x"]).open_source(spec.data).get(0)
        b = lm.adapter.build_batch(lm, [rec.image], [rec.text])
        seen = []
        hooks = [layer.register_forward_hook(lambda _m, _a, out, i=i: seen.append(i))
                 for i, layer in enumerate(lm.model.model.language_model.layers)]
        calls = []
        orig = lm.model.model.language_model._deepstack_process
        lm.model.model.language_model._deepstack_process = lambda *a: (calls.append(seen[-1]), orig(*a))[1]
        try:
            with torch.no_grad():
                lm.model(**b.inputs)
        finally:
            for h in hooks:
                h.remove()
            del lm.model.model.language_model._deepstack_process
        assert calls == want


# ----------------------------------------------------------------------------- train and bias (slow)


@pytest.mark.slow
def test_two_step_malora_train_completes(family, tmp_path) -> None:
    from kscale.models import MALORA_TARGETS

    targets = [t for t in ("k_proj", "v_proj", "gate_proj") if t in MALORA_TARGETS[family]]
    raw = {"kind": "train", "model": {"path": f"debug:{family}", "device": "cpu", "dtype": "float32"},
           "data": {"source": "generated", "generated": {"n_samples": 8, "image_size": 56, "tasks": ["color"]}},
           "train": {"max_steps": 2, "micro_batch_size": 2, "grad_accum": 1, "checkpoint_every": 0,
                     "eval": {"at_end": False}, "malora": {"rank": 2, "target_modules": targets},
                     "align": {"loss": "mmd", "weight": 1.0}, "deepspeed": {"zero_stage": 2, "bf16": False}},
           "output": {"path": str(tmp_path / "train")}}
    job = tmp_path / "train.yaml"
    job.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-m", "kscale.train", str(job)], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    losses = [json.loads(ln)["loss"] for ln in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


@pytest.mark.slow
def test_bias_run_completes(family, tmp_path) -> None:
    from tests.unit.bias.conftest import bias_job

    spec = spec_from_dict(bias_job(tmp_path, f"debug:{family}"))
    out = run_job(spec, show_bar=False)
    assert out.shards_done == 2, out


# ----------------------------------------------------------------------------- kscale models


def test_kscale_models_lists_every_family_and_the_readme_shows_its_output() -> None:
    from click.testing import CliRunner

    from kscale.cli import main
    from kscale.models import FAMILIES

    out = CliRunner().invoke(main, ["models"])
    assert out.exit_code == 0, out.output
    rows = [ln for ln in out.output.splitlines() if ln.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == list(__import__("kscale.models.registry", fromlist=["x"]).ADAPTERS)
    assert sorted(r.split("`")[1] for r in rows) == sorted(FAMILIES)
    readme = (REPO / "README.md").read_text()
    section = readme.split("<!-- kscale models -->\n", 1)[1].split("<!-- /kscale models -->", 1)[0]
    assert section.strip() == out.output.strip()
    data = json.loads(CliRunner().invoke(main, ["models", "--json"]).output)
    video = {r["family"] for r in data if r["supports"]["video"]}
    assert set(FAMILIES_WITH_VIDEO) <= video and "llava" not in video


def test_a_family_that_supports_video_takes_a_video(family) -> None:
    """``supports`` is not a label: a family that says video builds video inputs its model's forward takes."""
    from tests.unit.test_video_qwen import _video

    lm = _load(family)
    assert "video" in lm.adapter.supports
    side = 2 * lm.image_processor.patch_size * lm.image_processor.merge_size
    b = lm.adapter.batch(lm, [Sample((Turn("user", (Media("video", 0), "what ?")),), videos=[_video(2, side)])])
    with torch.no_grad():
        assert torch.isfinite(lm.model(**b.inputs).logits).all()
    assert int((b.modality_BT == VIDEO).sum()) > 0
