"""Stages with an adapter applied: extraction (``extract.adapter``: the stored keys are the adapted model's) and
the bias stage with a PEFT LoRA (``bias.adapter``).

References kscale did not compute: for a PEFT LoRA, the ``k_proj`` outputs of PEFT's own
``PeftModel.from_pretrained`` on a freshly loaded base model, captured with a plain torch forward hook; for
MaLoRA, the ``k_proj`` outputs of a :class:`~kscale.adapters.MaLoRAModel` loaded by hand and called
itself (its own pre-hook sets its modality context from the input ids), and at layer 0 the update written
out from the saved tensors (image branch on image tokens, text branch on the others). Both must differ from the base
model's keys, on image and on text tokens, so a store extracted without the adapter fails the comparison.

The adapters: random saved ones (both MaLoRA branches and the LoRA update far from zero; the default suite)
and the adapters of two 2-step ``kind: train`` runs, MaLoRA and ``train.method: lora``, named by their run
directories (slow: two DeepSpeed runs).

Legend: T tokens, H kv heads, D head dim.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import kscale.store
from kscale.runner import run_job
from kscale.spec import spec_from_dict
from tests.conftest import extract_spec
from tests.integration.test_extract import sample_keys
from tests.testing_utils import require_module

require_module("peft", install="pip install -e '.[train]'")

N_SAMPLES = 4


def save_random_adapters(model_dir: str, out: Path, seed: int = 0) -> dict[str, Path]:
    """A MaLoRA adapter (k_proj and v_proj, both branches random) and a PEFT LoRA (non-zero B) saved in ``out``."""
    from peft import LoraConfig, get_peft_model

    from kscale.adapters import MaLoRAModel
    from kscale.models import load_model
    from kscale.spec import MaLoRAConfig, ModelSpec

    mspec = ModelSpec(path=model_dir, device="cpu", dtype="float32")
    torch.manual_seed(seed)
    wrapped = MaLoRAModel(load_model(mspec).model, MaLoRAConfig(rank=4, init="random", alpha=16.0,
                                                                target_modules=["k_proj", "v_proj"]))
    with torch.no_grad():
        for p in wrapped.adapter_parameters().values():
            p.normal_(0, 0.2)
    wrapped.save_pretrained(out / "malora")
    torch.manual_seed(seed + 1)
    peft = get_peft_model(load_model(mspec).model, LoraConfig(r=4, lora_alpha=16, target_modules=["k_proj", "v_proj"],
                                                              init_lora_weights=False))
    peft.save_pretrained(str(out / "lora"))
    return {"malora": out / "malora", "lora": out / "lora"}


@pytest.fixture(scope="module")
def saved_adapters(qwen_dir, tmp_path_factory) -> dict[str, Path]:
    return save_random_adapters(qwen_dir, tmp_path_factory.mktemp("adapters"))


TRAIN_METHODS = ("malora", "lora")


def train_adapter_runs(model_dir: str, out: Path) -> dict[str, Path]:
    """Two 2-step ``kind: train`` runs in ``out`` (DeepSpeed ZeRO-2, one process): MaLoRA and the plain-LoRA
    baseline, same data, rank and targets (k_proj, v_proj); method -> run directory."""
    require_module("deepspeed", install="pip install -e '.[train]'")
    from tests.integration.test_train_deepspeed import _generated, _raw_spec, _run

    runs = {}
    for method in TRAIN_METHODS:
        runs[method] = out / f"train_{method}"
        raw = _raw_spec(model_dir, runs[method], _generated(8), method=method, max_steps=2, grad_accum=1, lr=2e-2)
        assert len(_run(raw, runs[method])) == 2
    return runs


@pytest.fixture(scope="module")
def train_runs(qwen_dir, tmp_path_factory) -> dict[str, Path]:
    return train_adapter_runs(qwen_dir, tmp_path_factory.mktemp("train_runs"))


def extract_with(tmp: Path, model_dir: str, adapter: dict | None, **over):
    """A small extraction of the debug Qwen2.5-VL with ``adapter`` (an ``extract.adapter`` mapping) applied."""
    d = extract_spec(tmp, model=model_dir, data={"generated": {"n_samples": N_SAMPLES, "image_size": 112},
                                                 "shard_size": 2},
                     extract={"batch_size": 2, "key_dtype": "float32", **({"adapter": adapter} if adapter else {})},
                     **over)
    spec = spec_from_dict(d)
    run_job(spec, show_bar=False)
    return spec, kscale.store.open(spec.output.path)


def reference_keys(spec, kind: str | None, directory: Path | None) -> dict[int, dict[int, np.ndarray]]:
    """sample -> layer -> (T, H, D) ``k_proj`` outputs, from the adapter loaded by its own library (PEFT's
    ``PeftModel`` or kscale's ``MaLoRAModel``, called itself) and plain torch forward hooks."""
    from kscale.data import open_source
    from kscale.models import load_model

    lm = load_model(spec.model)
    if kind == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(lm.model, str(directory))
    elif kind == "malora":
        from kscale.adapters import MaLoRAModel

        model = MaLoRAModel.from_pretrained(lm.model, directory)
    else:
        model = lm.model
    src = open_source(spec.data)
    H = lm.model.config.get_text_config().num_key_value_heads
    layers = lm.model.model.language_model.layers  # named here, not through kscale.models
    out = {}
    for sid in range(N_SAMPLES):
        rec = src.get(sid)
        batch = lm.adapter.build_batch(lm, [rec.image], [rec.text])
        got: dict[int, torch.Tensor] = {}
        handles = [layer.self_attn.k_proj.register_forward_hook(
            lambda _m, _i, o, i=i: got.__setitem__(i, o.detach()[0])) for i, layer in enumerate(layers)]
        try:
            with torch.no_grad():
                model(**batch.inputs)
        finally:
            for h in handles:
                h.remove()
        out[sid] = {i: k.view(k.shape[0], H, -1).numpy() for i, k in got.items()}
    return out


def _image_rows(store, sample_id: int) -> np.ndarray:
    pos, _, _ = sample_keys(store, sample_id, store.layers[0])
    img = store.tokens("image")
    return np.isin(pos, img["position"][img["sample_id"] == sample_id])


def check_adapted_keys(spec, store, kind: str, directory: Path, moved: float = 1e-2) -> None:
    """Stored keys == the adapter's own model; != the base model's (by more than ``moved`` somewhere in each
    layer), on image and on text tokens."""
    wants, bases = reference_keys(spec, kind, directory), reference_keys(spec, None, None)
    for sid in range(N_SAMPLES):
        want, base = wants[sid], bases[sid]
        image = _image_rows(store, sid)
        assert image.any() and (~image).any()
        for li in store.layers:
            pos, got, _ = sample_keys(store, sid, li)
            assert np.array_equal(pos, np.arange(want[li].shape[0]))
            np.testing.assert_allclose(got, want[li], atol=1e-5, rtol=0, err_msg=f"{kind} sample {sid} layer {li}")
            for rows in (image, ~image):  # the adapter moved both modalities' keys
                assert np.abs(want[li][rows] - base[li][rows]).max() > moved, (kind, sid, li)


def malora_layer0_closed_form(spec, directory: Path, sample_id: int) -> np.ndarray:
    """(T, H, D) layer-0 keys of MaLoRA written out from the saved file, without kscale's MaLoRA code:
    ``k = W x + b + s * g_img * B_img A_img x`` on image tokens and ``... g_txt * B_txt A_txt x`` on the others,
    ``x`` the layer's normed input (the same with or without the adapter: nothing before layer 0 is adapted)."""
    from safetensors.torch import load_file

    from kscale.data import open_source
    from kscale.models import load_model

    lm = load_model(spec.model)
    cfg = json.loads((directory / "adapter_config.json").read_text())["malora"]
    weights = load_file(str(directory / "adapter_model.safetensors"))
    rec = open_source(spec.data).get(sample_id)
    batch = lm.adapter.build_batch(lm, [rec.image], [rec.text])
    layer = lm.model.model.language_model.layers[0]
    with torch.no_grad():
        x_TC = layer.input_layernorm(lm.model(**batch.inputs, output_hidden_states=True).hidden_states[0])[0]
        k_TO = layer.self_attn.k_proj(x_TC)

        def update(branch: str) -> torch.Tensor:
            (name,) = [n for n in weights if n.endswith(f"layers.0.self_attn.k_proj.malora_A_{branch}")]
            w = {p: weights[name.replace("malora_A_", p)] for p in ("malora_A_", "malora_B_", "malora_gate_")}
            return cfg["alpha"] / cfg["rank"] * w["malora_gate_"] * (x_TC @ w["malora_A_"].T) @ w["malora_B_"].T

        image_T1 = (batch.inputs["input_ids"][0] == lm.model.config.image_token_id)[:, None]
        k_TO = k_TO + torch.where(image_T1, update("img"), update("txt"))
    return k_TO.view(k_TO.shape[0], lm.model.config.get_text_config().num_key_value_heads, -1).numpy()


@pytest.mark.parametrize("kind", ["malora", "lora"])
def test_keys_extracted_with_an_adapter_equal_its_own_model(kind, qwen_dir, saved_adapters, tmp_path) -> None:
    spec, store = extract_with(tmp_path, qwen_dir, {"kind": kind, "path": str(saved_adapters[kind])})
    check_adapted_keys(spec, store, kind, saved_adapters[kind])
    if kind == "malora":  # the gate by modality, independently of MaLoRAModel: each token got its own branch
        for sid in (0, 3):
            _, got, _ = sample_keys(store, sid, 0)
            np.testing.assert_allclose(got, malora_layer0_closed_form(spec, saved_adapters[kind], sid), atol=1e-5,
                                       rtol=0)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("kind", ["malora", "lora"])
def test_keys_extracted_with_a_train_run_equal_its_adapter(kind, qwen_dir, train_runs, tmp_path) -> None:
    """``extract.adapter.path`` a ``kind: train`` run directory: its ``adapter/``, MaLoRA or PEFT's LoRA."""
    spec, store = extract_with(tmp_path, qwen_dir, {"kind": kind, "path": str(train_runs[kind])})
    check_adapted_keys(spec, store, kind, train_runs[kind] / "adapter", moved=1e-4)  # 2 steps: a small update


def test_merged_keys_equal_the_unmerged_adapter(qwen_dir, saved_adapters, tmp_path) -> None:
    """``merge: true`` folds the adapter into the weights (MaLoRA: its text branch): the same keys up to rounding."""
    for kind in ("malora", "lora"):
        path = str(saved_adapters[kind])
        _, plain = extract_with(tmp_path / kind, qwen_dir, {"kind": kind, "path": path})
        _, merged = extract_with(tmp_path / f"{kind}_merged", qwen_dir, {"kind": kind, "path": path, "merge": True})
        assert merged.attrs["adapter"]["merge"] is True
        for m in ("image", "text"):
            for li in plain.layers:
                np.testing.assert_allclose(merged.keys(li, m).compute(), plain.keys(li, m).compute(), atol=1e-4,
                                           err_msg=f"{kind} {m} layer {li}")


def test_the_store_records_its_adapter_and_resume_refuses_another(qwen_dir, saved_adapters, tmp_path) -> None:
    from click.testing import CliRunner

    from kscale.cli import main
    from kscale.extract.run import StoreExistsError
    from kscale.store.layout import marker_path

    adapter = tmp_path / "lora"
    save_random_adapters(qwen_dir, tmp_path / "first", seed=3)["lora"].rename(adapter)
    spec, store = extract_with(tmp_path, qwen_dir, {"kind": "lora", "path": str(adapter)})
    rec = store.attrs["adapter"]
    files = {f: hashlib.sha256((adapter / f).read_bytes()).hexdigest()
             for f in ("adapter_config.json", "adapter_model.safetensors")}
    assert rec["kind"] == "lora" and rec["path"] == str(adapter) and rec["merge"] is False
    assert rec["files"] == files and rec["dir"] == str(adapter.resolve())
    info = CliRunner().invoke(main, ["info", "--json", spec.output.path])
    assert info.exit_code == 0, info.output
    assert json.loads(info.output)["adapter"] == f"lora {adapter} (files {rec['fingerprint']})"
    # same adapter: resume redoes only the shard un-committed here
    marker_path(spec.output.path, "s000001").unlink()
    assert run_job(spec, show_bar=False).shards_done == 1
    # the adapter retrained in place (same path, other weights): resume refuses, nothing is written
    marker_path(spec.output.path, "s000001").unlink()
    for f in adapter.iterdir():
        f.unlink()
    for f in save_random_adapters(qwen_dir, tmp_path / "second", seed=5)["lora"].iterdir():
        f.rename(adapter / f.name)
    with pytest.raises(StoreExistsError, match=r"extract\.adapter: store .* was extracted with lora adapter"):
        run_job(spec, show_bar=False)
    assert not marker_path(spec.output.path, "s000001").exists()


# ----------------------------------------------------------------------------------------- the bias stage


def test_the_slot_applies_a_lora_and_removes_it_for_the_next_variant(qwen_dir, saved_adapters) -> None:
    """``VariantSlot``: base -> LoRA (PEFT's layers in, logits move) -> base (layers out, logits exactly back)
    -> MaLoRA (re-injected after the LoRA left)."""
    from kscale.adapters import MaLoRALinear
    from kscale.bias.variants import Variant, VariantSlot, adapter_variant
    from kscale.models import load_model
    from kscale.spec import ModelSpec
    from tests.unit.bias.conftest import records

    lm = load_model(ModelSpec(path=qwen_dir, device="cpu", dtype="float32"))
    _, recs = records(2, tasks=("color",))
    b = lm.adapter.build_batch(lm, [r.image for r in recs], [r.text for r in recs], [r.answer for r in recs])

    def logits() -> torch.Tensor:
        with torch.no_grad():
            return lm.model(**b.inputs).logits

    slot = VariantSlot(lm)
    slot.apply(Variant("base", "base"))
    base = logits()
    lora = adapter_variant(str(saved_adapters["lora"]))
    assert lora.method == "lora"
    slot.apply(lora)
    assert type(lm.adapter.key_modules(lm.model)[0]).__module__.startswith("peft.")
    assert (logits() - base).abs().max() > 1e-3
    slot.apply(Variant("base", "base"))
    assert isinstance(lm.adapter.key_modules(lm.model)[0], torch.nn.Linear) and slot.lora is None
    assert torch.equal(logits(), base)
    slot.apply(adapter_variant(str(saved_adapters["malora"])))
    assert isinstance(lm.adapter.key_modules(lm.model)[0], MaLoRALinear)


def test_bias_job_with_a_lora_adapter_equals_the_peft_model(qwen_dir, saved_adapters, tmp_path) -> None:
    """``bias.adapter`` a PEFT LoRA: the job completes, each answer's log-likelihood equals PEFT's own model
    scored one sample at a time, and the variant's visual dependency differs from the base model's."""
    import pandas as pd
    from peft import PeftModel

    from kscale.bias.worker import score
    from kscale.models import load_model
    from tests.unit.bias.conftest import bias_job, records

    spec = spec_from_dict(bias_job(tmp_path, qwen_dir, bias={
        "adapter": str(saved_adapters["lora"]), "conditions": ["real", "blank", "none"],
        "dropping": {"enabled": False}, "bootstrap": 50}))
    out = run_job(spec, show_bar=False)
    assert out.state == "succeeded" and out.variants == ["base", "adapter"]
    df = pd.read_parquet(tmp_path / "bias" / "samples.parquet")
    by = {v: g.set_index("sample_id").sort_index() for v, g in df.groupby("variant")}
    lm = load_model(spec.model)
    peft = PeftModel.from_pretrained(lm.model, str(saved_adapters["lora"]))
    _, recs = records(8, tasks=("color", "conflict"))
    for r in recs[:3]:
        b = lm.adapter.build_batch(lm, [r.image], [r.text], [r.answer])
        lm.model = peft  # scored through PEFT's own forward
        assert by["adapter"].ll_real[r.sample_id] == pytest.approx(score(lm, b.inputs, b.answer_mask_BT).ll_mean[0],
                                                                   abs=1e-5)
    agg = pd.read_csv(tmp_path / "bias" / "aggregate.csv")
    dep = agg[(agg.task == "all") & agg.metric.str.startswith("dependency_")].set_index(["variant", "metric"]).value
    for metric in ("dependency_blank", "dependency_none"):
        assert abs(dep["adapter", metric] - dep["base", metric]) > 1e-3, metric
