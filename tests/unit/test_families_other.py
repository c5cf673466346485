"""The non-Qwen families (LLaVA-NeXT, LLaVA-OneVision, Idefics3, Gemma 3, PaliGemma, InternVL, Llama 4), each
on its ``debug:<family>`` tiny random model built from the real transformers class.

References kscale did not compute, per family:

- inputs: transformers' own processor class for the family, built in code from the checkpoint's tokenizer and
  image processor, at several image sizes and aspect ratios: ``input_ids``, ``attention_mask`` and the pixel
  tensors must be identical;
- tags: the processor's ``mm_token_type_ids`` (1 image, 0 text); wrapper tokens inside an image block
  (ids other than the image token) and the tokenizer's special tokens are ``special``; positions where the
  model's language-model input is its learned ``image_newline`` vector (LLaVA-NeXT, OneVision; found by
  hooking the language model, not by kscale's formula) are ``special`` too;
- keys: a real extraction job (``run_extract`` through ``run_job``) against the model's own ``k_proj``
  outputs (forward hooks) and its KV cache (post-RoPE keys rebuilt by the store's reader);
- training and bias: two MaLoRA optimizer steps run and move the adapter; a bias job completes.

Legend: T tokens, H kv heads, D head dim.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import kscale.store
from kscale.models import IMAGE, SPECIAL, TEXT, load_model
from kscale.models.debug import debug_model_dir
from kscale.runner import run_job
from kscale.spec import ModelSpec, spec_from_dict
from kscale.store.layout import MODALITIES
from kscale.store.rope import rope_keys, store_rotary
from tests.conftest import extract_spec
from tests.unit.test_processors import SIZES, TEXT as QUESTION, _image

FAMILIES = ["llava_next", "llava_onevision", "idefics3", "paligemma", "internvl", "gemma3"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest single-threaded on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def loaded():
    cache: dict[str, object] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = load_model(ModelSpec(path=debug_model_dir(family), device="cpu", dtype="float32"))
        return cache[family]
    return get


# -- each family's own processor, built in code, and the prompt that gives kscale's template

def _llava_next_processor(lm):
    from transformers import LlavaNextProcessor

    cfg = lm.model.config
    return LlavaNextProcessor(image_processor=lm.image_processor, tokenizer=lm.tokenizer,
                              patch_size=cfg.vision_config.patch_size,
                              vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                              num_additional_image_tokens=1)  # CLIP's class token


def _llava_prompt(lm, text: str) -> str:
    tok = lm.tokenizer  # the debug WordLevel tokenizer does not add BOS itself
    return tok.bos_token + f"USER: <image>\n{text} ASSISTANT:"


def _llava_onevision_processor(lm):
    from transformers import LlavaOnevisionProcessor
    from transformers.processing_utils import ProcessorMixin

    class _ImageOnly(LlavaOnevisionProcessor):  # no CPU torchvision: no video processor (NOTES.md)
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            cfg = lm.model.config
            self.num_image_tokens = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
            self.vision_feature_select_strategy = cfg.vision_feature_select_strategy
            self.vision_aspect_ratio = cfg.vision_aspect_ratio
            self.image_token, self.video_token = "<image>", "<video>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return _ImageOnly(image_processor=lm.image_processor, tokenizer=lm.tokenizer)


def _qwen_chat_prompt(lm, text: str, n_images: int = 1) -> str:
    return f"<|im_start|>user\n{'<image>' * n_images}\n{text}<|im_end|>\n<|im_start|>assistant\n"


def _idefics3_processor(lm):
    from transformers import Idefics3Processor

    v, scale = lm.model.config.vision_config, lm.model.config.scale_factor
    return Idefics3Processor(image_processor=lm.image_processor, tokenizer=lm.tokenizer,
                             image_seq_len=(v.image_size // v.patch_size) ** 2 // scale ** 2)


def _smolvlm_prompt(lm, text: str) -> str:
    return f"<|im_start|>User:<image>{text}<end_of_utterance>\nAssistant:"


def _paligemma_processor(lm):
    from transformers import AutoImageProcessor, AutoTokenizer, PaliGemmaProcessor

    # its own tokenizer and image processor from the checkpoint: the processor adds 1,152 location tokens
    # to the tokenizer it gets, and needs the saved image_seq_length
    return PaliGemmaProcessor(image_processor=AutoImageProcessor.from_pretrained(lm.info.path),
                              tokenizer=AutoTokenizer.from_pretrained(lm.info.path))


def _paligemma_prompt(lm, text: str) -> str:
    return "<image>" + text  # the processor adds BOS after the image tokens and the closing newline


def _internvl_processor(lm):
    from transformers import InternVLProcessor
    from transformers.processing_utils import ProcessorMixin

    class _ImageOnly(InternVLProcessor):  # no CPU torchvision: no video processor (NOTES.md)
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
            self.image_seq_length = lm.model.config.image_seq_length
            self.start_image_token, self.end_image_token = tokenizer.start_image_token, tokenizer.end_image_token
            self.start_image_token_id = tokenizer.start_image_token_id
            self.end_image_token_id = tokenizer.end_image_token_id
            self.image_token, self.video_token = tokenizer.context_image_token, tokenizer.video_token
            self.image_token_id = tokenizer.context_image_token_id
            self.multimodal_pattern = re.compile(
                f"(?P<image>{re.escape(self.image_token)})|(?P<video>{re.escape(self.video_token)})")

    return _ImageOnly(image_processor=lm.image_processor, tokenizer=lm.tokenizer)


def _internvl_prompt(lm, text: str) -> str:
    return f"<|im_start|>user\n<IMG_CONTEXT>\n{text}<|im_end|>\n<|im_start|>assistant\n"


def _gemma3_processor(lm):
    from transformers import Gemma3Processor

    return Gemma3Processor(image_processor=lm.image_processor, tokenizer=lm.tokenizer,
                           image_seq_length=lm.model.config.mm_tokens_per_image)


def _gemma3_prompt(lm, text: str) -> str:
    return f"<bos><start_of_turn>user\n<start_of_image>{text}<end_of_turn>\n<start_of_turn>model\n"


PROCESSORS = {"llava_next": (_llava_next_processor, _llava_prompt),
              "gemma3": (_gemma3_processor, _gemma3_prompt),
              "internvl": (_internvl_processor, _internvl_prompt),
              "paligemma": (_paligemma_processor, _paligemma_prompt),
              "llava_onevision": (_llava_onevision_processor, _qwen_chat_prompt),
              "idefics3": (_idefics3_processor, _smolvlm_prompt)}
PIXEL_KEYS = {"llava_next": ("pixel_values", "image_sizes"),
              "llava_onevision": ("pixel_values", "image_sizes", "batch_num_images"),
              "idefics3": ("pixel_values", "pixel_attention_mask"),
              "paligemma": ("pixel_values", "token_type_ids"),
              "internvl": ("pixel_values",),
              "gemma3": ("pixel_values", "token_type_ids")}


def _processor_inputs(lm, family: str, images: list, texts: list[str]):
    make, prompt = PROCESSORS[family]
    proc = make(lm)
    out = proc(images=images, text=[prompt(lm, t) for t in texts], padding=True, padding_side="right",
               return_tensors="pt", return_mm_token_type_ids=True)
    out["image_token_id"] = proc.image_token_ids[0]  # the processor's own reading of the tokenizer (its mm ids)
    return out


def _newline_positions(lm, inputs: dict) -> torch.Tensor:
    """(B, T) True where the language model's input embedding is the model's ``image_newline`` vector."""
    newline = getattr(lm.model.model, "image_newline", None)
    if newline is None:
        return torch.zeros(inputs["input_ids"].shape, dtype=torch.bool)
    seen = {}

    def hook(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    h = lm.model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            lm.model(**inputs)
    finally:
        h.remove()
    return (seen["embeds"] == newline.to(seen["embeds"].dtype)).all(-1)


def _expected_tags(lm, theirs, newline_BT: torch.Tensor) -> torch.Tensor:
    """Tags from the processor's ``mm_token_type_ids`` and the model's own newline positions."""
    ids = theirs["input_ids"]
    # Gemma3Processor returns its mm_token_type_ids as token_type_ids
    mm = theirs["mm_token_type_ids"] if "mm_token_type_ids" in theirs else theirs["token_type_ids"]
    special = torch.tensor(sorted(set(lm.tokenizer.all_special_ids) - {lm.tokenizer.unk_token_id}))
    want = torch.full(ids.shape, TEXT, dtype=torch.int8)
    want[torch.isin(ids, special)] = SPECIAL
    image_id = theirs["image_token_id"]
    want[(mm == 1) & (ids == image_id)] = IMAGE
    want[(mm == 1) & (ids != image_id)] = SPECIAL  # wrappers inside an image block
    want[newline_BT] = SPECIAL
    want[theirs["attention_mask"] == 0] = -1
    return want


@pytest.mark.parametrize("family", FAMILIES)
def test_inputs_and_tags_equal_the_processor(loaded, family) -> None:
    lm = loaded(family)
    for w, h in SIZES:
        img = _image(w, h)
        ours = lm.adapter.build_batch(lm, [img], [QUESTION])
        theirs = _processor_inputs(lm, family, [img], [QUESTION])
        for k in ("input_ids", "attention_mask") + PIXEL_KEYS[family]:
            assert ours.inputs[k].shape == theirs[k].shape, (family, w, h, k)
            assert torch.equal(ours.inputs[k].to(theirs[k].dtype), theirs[k]), (family, w, h, k)
        newline = _newline_positions(lm, ours.inputs)
        want = _expected_tags(lm, theirs, newline)
        assert torch.equal(ours.modality_BT, want), (family, w, h, ours.modality_BT, want)
        assert ours.n_image_tokens == [int((want == IMAGE).sum())]
        assert (ours.image_index_BT[want == IMAGE] == 0).all() and (ours.image_index_BT[want != IMAGE] == -1).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_of_two_sizes_equals_the_processor(loaded, family) -> None:
    """Two images of different aspect ratios (different token counts) in one right-padded batch."""
    lm = loaded(family)
    images, texts = [_image(200, 90), _image(57, 83, seed=1)], [QUESTION, "and here , what shape is it ?"]
    ours = lm.adapter.build_batch(lm, images, texts)
    lm.tokenizer.padding_side = "right"
    # Gemma3Processor reads a flat list as one sample's images
    theirs = _processor_inputs(lm, family, [[im] for im in images] if family == "gemma3" else images, texts)
    for k in ("input_ids", "attention_mask") + PIXEL_KEYS[family]:
        assert torch.equal(ours.inputs[k].to(theirs[k].dtype), theirs[k]), (family, k)
    assert torch.equal(ours.modality_BT, _expected_tags(lm, theirs, _newline_positions(lm, ours.inputs)))


def test_onevision_tiles_only_a_lone_image(loaded) -> None:
    """A sample of two images: each is one untiled block (base features + one newline), as the processor
    and the model do; the lone image of another sample in the same batch is still tiled."""
    from kscale.models.inputs import Media, Sample, Turn

    lm = loaded("llava_onevision")
    a, b, c = _image(200, 90), _image(57, 83, seed=1), _image(112, 112, seed=2)
    two = Sample((Turn("user", (Media("image", 0), Media("image", 1), QUESTION)),), [a, b])
    ours = lm.adapter.batch(lm, [two, Sample.simple(c, QUESTION)])
    make, prompt = PROCESSORS["llava_onevision"]
    lm.tokenizer.padding_side = "right"
    proc = make(lm)
    theirs = proc(images=[[a, b], [c]], text=[prompt(lm, QUESTION, 2), prompt(lm, QUESTION)], padding=True,
                  return_tensors="pt", return_mm_token_type_ids=True)
    theirs["image_token_id"] = proc.image_token_ids[0]
    for k in ("input_ids", "attention_mask") + PIXEL_KEYS["llava_onevision"]:
        assert torch.equal(ours.inputs[k].to(theirs[k].dtype), theirs[k]), k
    want = _expected_tags(lm, theirs, _newline_positions(lm, ours.inputs))
    assert torch.equal(ours.modality_BT, want)
    base = lm.adapter.base_features(lm.model.config)
    assert ours.n_image_tokens[0] == 2 * base and ours.n_image_tokens[1] > base  # untiled pair, tiled single
    image_id = lm.model.config.image_token_id
    assert int(((want[0] == SPECIAL) & (theirs["input_ids"][0] == image_id)).sum()) == 2  # a newline per image


def test_paligemma_answer_is_the_suffix(loaded) -> None:
    """With an answer, ``token_type_ids`` mark it (1) as the processor does for a ``suffix``: the model's
    prefix-LM mask (bidirectional image + prompt) ends where the answer starts."""
    lm = loaded("paligemma")
    img = _image(200, 90)
    ours = lm.adapter.build_batch(lm, [img], [QUESTION], ["red"])
    make, prompt = PROCESSORS["paligemma"]
    theirs = make(lm)(images=[img], text=[prompt(lm, QUESTION)], suffix=["red"], return_tensors="pt")
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(ours.inputs[k], theirs[k]), k
    assert torch.equal(ours.inputs["token_type_ids"].bool(), ours.answer_mask_BT) and ours.answer_mask_BT.any()


@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_sample_next_to_an_image_sample(loaded, family) -> None:
    """A batch mixing an image sample and a text-only one (training manifests have both) runs, and gives the
    image sample the same logits as alone."""
    lm = loaded(family)
    img = _image(200, 90)
    mixed = lm.adapter.build_batch(lm, [img, None], [QUESTION, "no image here"])
    alone = lm.adapter.build_batch(lm, [img], [QUESTION])
    assert not (mixed.modality_BT[1] == IMAGE).any() and (mixed.modality_BT[0] == IMAGE).any()
    n = int(alone.inputs["attention_mask"].sum())
    with torch.inference_mode():
        a = lm.model(**mixed.inputs).logits[0, :n]
        b = lm.model(**alone.inputs).logits[0, :n]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


# -- keys: a real extraction against the model's own k_proj and KV cache

@pytest.fixture(scope="module", params=FAMILIES)
def store(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    d = extract_spec(tmp, model=f"debug:{request.param}",
                     data={"generated": {"n_samples": 3, "image_size": 84}, "shard_size": 2},
                     extract={"batch_size": 2, "key_dtype": "float32"})
    d["model"]["device"] = "cpu"
    spec = spec_from_dict(d)
    result = run_job(spec, show_bar=False)
    assert result.state == "succeeded"
    return request.param, spec, kscale.store.open(spec.output.path)


def _language_pre_rope_keys(model) -> tuple[list[torch.nn.Module], bool]:
    """The modules whose output the language model rotates, found by name (not through kscale's adapter):
    ``k_norm`` where keys are normalised after the projection (Gemma 3; output (B, H, T, D)), else ``k_proj``
    ((B, T, H*D)); and whether they are the norms."""
    def find(suffix):
        mods = [(n, m) for n, m in model.named_modules()
                if n.endswith("self_attn." + suffix) and ("language_model" in n or "text_model" in n)]
        return [m for _, m in sorted(mods, key=lambda nm: int(nm[0].split("layers.")[1].split(".")[0]))]
    norms = find("k_norm")
    return (norms, True) if norms else (find("k_proj"), False)


def test_stored_keys_equal_k_proj_and_kv_cache(loaded, store) -> None:
    from kscale.data import open_source

    family, spec, st = store
    lm = loaded(family)
    rotary = store_rotary(st)
    src = open_source(spec.data)
    toks = {m: st.tokens(m) for m in MODALITIES}
    assert len(toks["image"]["position"]) > 0 and len(toks["text"]["position"]) > 0
    for sid in range(len(src)):
        rec = src.get(sid)
        batch = lm.adapter.build_batch(lm, [rec.image], [rec.text])
        seen: dict[int, torch.Tensor] = {}
        mods, heads_first = _language_pre_rope_keys(lm.model)
        # the store says which module's output its keys are: the one the model rotates, found by name
        assert st.attrs["key_source"] == ("k_norm" if heads_first else "k_proj")
        hooks = [m.register_forward_hook(lambda mod, a, out, i=i: seen.__setitem__(
            i, out.transpose(1, 2) if heads_first else out)) for i, m in enumerate(mods)]
        try:
            with torch.inference_mode():
                cache = lm.model(**batch.inputs, use_cache=True).past_key_values
        finally:
            for h in hooks:
                h.remove()
        H, D = lm.info.num_kv_heads, lm.info.head_dim
        for layer in st.layers:
            pre_THD = seen[layer][0].reshape(-1, H, D).numpy()
            post_THD = cache.layers[layer].keys[0].transpose(0, 1).numpy()
            first = pre_THD.shape[0] - post_THD.shape[0]  # a sliding-window layer caches the last tokens only
            assert first == 0 or lm.model.config.get_text_config().layer_types[layer] == "sliding_attention"
            n_rows = 0
            for m in MODALITIES:
                sel = toks[m]["sample_id"] == sid
                if not sel.any():
                    continue
                pos = toks[m]["position"][sel]
                np.testing.assert_allclose(st.keys(layer, m).compute()[sel], pre_THD[pos], atol=1e-5, rtol=0)
                post = rope_keys(st, layer, m, rotary=rotary).compute()[sel]
                cached = pos >= first
                np.testing.assert_allclose(post[cached], post_THD[pos[cached] - first], atol=1e-5, rtol=0)
                n_rows += int(sel.sum())
            assert n_rows == pre_THD.shape[0]  # every token stored once


# -- training and bias

@pytest.mark.parametrize("family", FAMILIES)
def test_two_malora_steps_train_the_adapter(loaded, family) -> None:
    from kscale.data.generated import GeneratedSource
    from kscale.spec import GeneratedDataSpec
    from kscale.spec.train import AlignConfig
    from kscale.train.data import collate
    from kscale.train.malora import MaLoRAConfig, MaLoRAModel
    from kscale.train.objective import MaLoRAObjective
    from kscale.train.run import blank_image_inputs

    lm = load_model(ModelSpec(path=debug_model_dir(family), device="cpu", dtype="float32"))  # its own copy
    torch.manual_seed(0)
    malora = MaLoRAModel(lm.model, MaLoRAConfig(rank=4, init="gaussian", target_modules=["k_proj", "v_proj"]))
    objective = MaLoRAObjective(malora, AlignConfig(loss="mmd", weight=1.0),
                                dummy_pixels=blank_image_inputs(lm)).train()
    params = [p for p in objective.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    src = GeneratedSource(GeneratedDataSpec(n_samples=4, image_size=84, seed=1, tasks=["color", "shape"]))
    losses = []
    for step in range(2):
        batch = collate(lm, [src.get(2 * step), src.get(2 * step + 1)])
        assert (batch.modality_BT == IMAGE).any() and batch.answer_mask_BT.any()
        opt.zero_grad()
        loss, terms = objective(batch.inputs, batch.answer_mask_BT, batch.modality_BT)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        assert float(terms["align"]) > 0
    assert all(np.isfinite(losses))
    assert any(not torch.equal(a, b) for a, b in zip(before, params))


@pytest.mark.parametrize("family", FAMILIES)
def test_bias_job_completes(family, tmp_path) -> None:
    import pandas as pd

    from tests.unit.bias.conftest import bias_job

    spec = spec_from_dict(bias_job(
        tmp_path, f"debug:{family}", data={"generated": {"n_samples": 2, "image_size": 56, "tasks": ["color"]}},
        bias={"conditions": ["real", "blank"], "bootstrap": 20,
              "dropping": {"fractions": [1.0], "orders": ["random", "most_attended"]}}))
    out = run_job(spec, show_bar=False)
    assert out.state == "succeeded"
    df = pd.read_parquet(tmp_path / "bias" / "samples.parquet")
    assert len(df) == 2 and np.isfinite(df.ll_real).all() and (df.ll_real != df.ll_blank).any()


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_deepspeed_train_follows_plain_pytorch(family, tmp_path) -> None:
    """A real ``kind: train`` run (DeepSpeed ZeRO-2, one CPU process, ``python -m kscale.train``) of 2 steps
    per family, against the hand-written PyTorch loop on the same model and data."""
    from tests.testing_utils import require_module

    require_module("deepspeed", install="pip install -e '.[train]'")
    from tests.integration.test_train_deepspeed import _generated, _raw_spec, _run, plain_pytorch_losses

    raw = _raw_spec(debug_model_dir(family), tmp_path / "run", _generated(8), max_steps=2, grad_accum=1)
    losses = _run(raw, tmp_path / "run")
    reference = plain_pytorch_losses(raw, world=1)
    assert len(losses) == len(reference) == 2
    assert max(abs(a - b) / abs(b) for a, b in zip(losses, reference)) < 1e-3, (losses, reference)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_gemma3_attention_stats_use_each_layers_rope(tmp_path, monkeypatch) -> None:
    """Attention statistics of Gemma 3 (local layers RoPE base 10k, global 1M) against the eager model's own
    attention probabilities and logits. The debug checkpoint's sliding window (8) is widened here: kscale's
    statistics do not model windows (docs/models.md), this checks the per-layer RoPE."""
    import json
    import shutil

    from kscale.attention.stats import batch_stats, flat_columns
    from kscale.extract.hooks import capture
    from kscale.spec import AttentionSpec
    from tests.unit.attention.conftest import STAT_NAMES, eager_reference, reference_queries, reference_stats

    path = tmp_path / "gemma3"
    shutil.copytree(debug_model_dir("gemma3"), path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["text_config"]["sliding_window"] = 4096
    (path / "config.json").write_text(json.dumps(cfg))
    lm = load_model(ModelSpec(path=str(path), device="cpu", dtype="float32"))
    eager = load_model(ModelSpec(path=str(path), device="cpu", dtype="float32", attn_implementation="eager"))
    types = lm.model.config.get_text_config().layer_types
    assert len(set(types)) == 2
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
                                       err_msg=f"row {r} ({types[int(table['layer'][r])]}) {name}")
