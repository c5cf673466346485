"""The eval stage through the real lmms-eval evaluator, on a task built here from local files.

The task (``kscale_colors``): generated images of one coloured shape, "what color is the <shape> ?", the six
colour names as choices; the answer is only in the image. Colours are balanced (two documents each), and
every document has the same text (one shape), so a model that does not see the image gives one answer to all and
scores exactly 1/6 -- with or without the image.

- Every score equals a direct computation of the same answers: the model's full logits on kscale's
  one-image batch (``Adapter.build_batch``), the mean log-likelihood of each choice's tokens, argmax over
  choices -- computed here, not through :class:`kscale.eval.lmms_model.KscaleLMM`;
- variants base, MaLoRA (gated and merged) and a PEFT LoRA each equal the direct computation with that
  adapter loaded by hand;
- blind baseline: the positive control (a model with a colour read-out of its last hidden state: it reads
  the image by construction, tests/unit/bias/test_dependency.py) scores well above chance with the image
  and exactly chance without it; the negative control (the same model with every image token masked out of
  attention: it cannot see) has gain exactly 0.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from tests.testing_utils import require_module

require_module("lmms_eval", install="pip install -e '.[eval]' && pip install --no-deps lmms-eval==0.7.3")

TASK = "kscale_colors"
STOP = "e"  # a stop string the random model's text contains (tests/integration: the cut is exercised)
PER_COLOUR = 2


@pytest.fixture(scope="module")
def colour_task(tmp_path_factory):
    """(task folder, documents): a local lmms-eval task (YAML, utils.py, a jsonl and PNGs)."""
    from kscale.data.generated import COLORS
    from tests.unit.bias.conftest import records

    out = tmp_path_factory.mktemp("colour_task")
    (out / "images").mkdir()
    _, recs = records(240, tasks=("color",), size=112)
    text = recs[0].text  # the question names the shape: one question for all, so the text tells nothing
    colours = list(COLORS)
    picked = [r for c in colours for r in [r for r in recs if r.meta["color"] == c and r.text == text][:PER_COLOUR]]
    assert len(picked) == PER_COLOUR * len(colours)
    docs = []
    for i, r in enumerate(picked):
        path = out / "images" / f"{i}.png"
        r.image.save(path)
        docs.append({"id": i, "image": str(path), "question": r.text, "choices": colours,
                     "answer": colours.index(r.meta["color"])})
    (out / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (out / "utils.py").write_text("from PIL import Image\n\n\ndef doc_to_visual(doc):\n"
                                  "    return [Image.open(doc['image']).convert('RGB')]\n")
    (out / "colors.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {out}/data.jsonl
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: question
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    (out / "colors_gen.yaml").write_text(f"""task: {TASK}_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {out}/data.jsonl
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: question
doc_to_choice: choices
doc_to_target: answer
generation_kwargs:
  until: ["{STOP}"]
  max_new_tokens: 6
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    return out, docs


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    from kscale.models import load_model
    from kscale.spec import ModelSpec

    return load_model(ModelSpec(path=qwen_dir, device="cpu", dtype="float32"))


def direct_ll(lm, docs, blind: bool = False) -> np.ndarray:
    """Mean log-likelihood per token of each choice's tokens (the end token the adapter appends excluded),
    from the model's full logits: docs x choices."""
    from PIL import Image

    out = np.zeros((len(docs), len(docs[0]["choices"])))
    eos = lm.tokenizer.eos_token_id
    for i, d in enumerate(docs):
        image = None if blind else Image.open(d["image"]).convert("RGB")
        n = len(d["choices"])
        b = lm.adapter.build_batch(lm, [image] * n, [d["question"]] * n, list(d["choices"]))
        with torch.no_grad():
            logp_BTV = torch.log_softmax(lm.model(**b.inputs).logits.double(), -1)
        for j, choice in enumerate(d["choices"]):
            ids = b.inputs["input_ids"][j]
            pos = [p for p in torch.nonzero(b.answer_mask_BT[j]).squeeze(-1).tolist() if int(ids[p]) != eos]
            assert pos and len(pos) == len(lm.tokenizer(" " + choice, add_special_tokens=False).input_ids)
            out[i, j] = float(np.mean([float(logp_BTV[j, p - 1, ids[p]]) for p in pos]))
    return out


def accuracy(ll: np.ndarray, docs) -> float:
    return float(np.mean(ll.argmax(1) == np.array([d["answer"] for d in docs])))


def run_lmms(lm, task_dir, blind: bool = False, batch_size: int = 6) -> dict:
    from kscale.eval.harness import evaluate
    from kscale.eval.lmms_model import KscaleLMM

    return evaluate(KscaleLMM(lm, batch_size=batch_size, blind=blind), [TASK], [str(task_dir)], bootstrap_iters=100)


def _choice_nll(results: dict) -> np.ndarray:
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    return np.array([[r[0] for r in s["filtered_resps"]] for s in samples])


def _acc(results: dict) -> float:
    return results["results"][TASK]["acc,none"]


@pytest.mark.parametrize("blind", [False, True], ids=["image", "blind"])
def test_lmms_eval_scores_equal_the_direct_computation(qwen, colour_task, blind) -> None:
    task_dir, docs = colour_task
    res = run_lmms(qwen, task_dir, blind)
    want = direct_ll(qwen, docs, blind)
    np.testing.assert_allclose(-_choice_nll(res), want, atol=1e-4, rtol=0)
    assert _acc(res) == pytest.approx(accuracy(want, docs), abs=1e-12)
    assert res["n-samples"][TASK]["effective"] == len(docs)
    if blind:  # same text for every document: one answer for all, chance exactly
        assert len(set(want.argmax(1))) == 1 and _acc(res) == pytest.approx(1 / 6)
    else:  # the random model does look at the image: the choices' scores differ between documents
        assert np.ptp(want, axis=0).max() > 1e-4


@pytest.mark.slow
def test_blind_baseline_positive_and_negative_controls(qwen, colour_task) -> None:
    from tests.unit.bias.test_dependency import _blind, _with_colour_readout

    task_dir, docs = colour_task
    reader, train_acc = _with_colour_readout(qwen)
    assert train_acc > 0.5
    # one request per forward: identical inputs give identical numbers (the read-out's blind scores are
    # near ties, which batch shapes would break at random)
    seeing, blind = _acc(run_lmms(reader, task_dir, batch_size=1)), _acc(run_lmms(reader, task_dir, True, 1))
    # positive control: 6 of 12 measured; P(>= 5 of 12 right | chance 1/6) = 0.036; the blind run is chance
    assert seeing > 1 / 3 and blind == pytest.approx(1 / 6)
    handle = _blind(reader)  # negative control: image tokens masked out of attention, positions kept
    try:
        seeing_masked = _acc(run_lmms(reader, task_dir, batch_size=1))
        blind_masked = _acc(run_lmms(reader, task_dir, True, 1))
    finally:
        handle.remove()
    assert seeing_masked == pytest.approx(1 / 6) and blind_masked == pytest.approx(1 / 6)  # gain 0


@pytest.fixture(scope="module")
def adapters(qwen_dir, tmp_path_factory):
    """A saved MaLoRA adapter (random init: both branches non-zero) and a PEFT LoRA (non-zero B)."""
    from peft import LoraConfig, get_peft_model

    from kscale.models import load_model
    from kscale.spec import MaLoRAConfig, ModelSpec
    from kscale.train.malora import MaLoRAModel

    out = tmp_path_factory.mktemp("adapters")
    mspec = ModelSpec(path=qwen_dir, device="cpu", dtype="float32")
    torch.manual_seed(0)
    wrapped = MaLoRAModel(load_model(mspec).model, MaLoRAConfig(rank=4, init="random", alpha=64.0,
                                                                target_modules=["k_proj", "v_proj"]))
    with torch.no_grad():
        for p in wrapped.adapter_parameters().values():
            p.normal_(0, 0.2)
    wrapped.save_pretrained(out / "malora")
    torch.manual_seed(1)
    peft = get_peft_model(load_model(mspec).model, LoraConfig(r=4, lora_alpha=64, target_modules=["k_proj", "v_proj"],
                                                              init_lora_weights=False))
    peft.save_pretrained(str(out / "lora"))
    return out / "malora", out / "lora"


@pytest.mark.slow
def test_eval_job_variants_equal_the_adapters_loaded_by_hand(qwen_dir, colour_task, adapters, tmp_path) -> None:
    from peft import PeftModel

    from kscale.models import load_model
    from kscale.runner import run_job
    from kscale.spec import spec_from_dict
    from kscale.train.malora import MaLoRAModel

    task_dir, docs = colour_task
    malora, lora = adapters
    spec = spec_from_dict({
        "kind": "eval", "model": {"path": qwen_dir, "device": "cpu", "dtype": "float32"},
        "eval": {"tasks": [TASK], "include_path": [str(task_dir)], "batch_size": 6, "bootstrap_iters": 100,
                 "variants": [{"name": "base"}, {"name": "malora", "kind": "malora", "path": str(malora)},
                              {"name": "malora_merged", "kind": "malora", "path": str(malora), "merge": True},
                              {"name": "lora", "kind": "lora", "path": str(lora)}]},
        "output": {"path": str(tmp_path / "eval")}, "resources": {"executor": "local"}})
    result = run_job(spec, show_bar=False)
    scores = pd.read_csv(tmp_path / "eval" / "scores.csv").set_index("variant")
    samples = pd.read_csv(tmp_path / "eval" / "samples.csv")
    assert list(scores.index) == ["base", "malora", "malora_merged", "lora"] and result.rows

    def nll(variant: str, blind: bool) -> np.ndarray:
        rows = samples[(samples.variant == variant) & (samples.blind == blind)].sort_values("doc_id")
        return np.array([json.loads(c) for c in rows.choice_nll])

    base = load_model(spec.model)
    by_hand = {"base": base}
    m = load_model(spec.model)
    MaLoRAModel.from_pretrained(m.model, malora)
    by_hand["malora"] = by_hand["malora_merged"] = m
    m = load_model(spec.model)
    PeftModel.from_pretrained(m.model, str(lora))
    by_hand["lora"] = m
    direct = {name: direct_ll(lm, docs) for name, lm in by_hand.items()}
    for name, want in direct.items():
        np.testing.assert_allclose(-nll(name, False), want, atol=1e-4, rtol=0, err_msg=name)
        assert scores.loc[name, "score"] == pytest.approx(accuracy(want, docs), abs=1e-12), name
        blind_want = direct_ll(by_hand[name], docs, blind=True)
        np.testing.assert_allclose(-nll(name, True), blind_want, atol=1e-4, rtol=0, err_msg=name)
        assert scores.loc[name, "gain"] == pytest.approx(scores.loc[name, "score"] - scores.loc[name, "blind_score"])
        assert scores.loc[name, "n"] == len(docs) and scores.loc[name, "metric"] == "acc,none"
    for name in ("malora", "lora"):  # each adapter changes the answers' scores
        assert np.abs(direct[name] - direct["base"]).max() > 1e-3, name


def test_generate_until_equals_greedy_decoding_cut_at_the_stop_string(qwen, colour_task) -> None:
    from PIL import Image

    from kscale.eval.harness import evaluate
    from kscale.eval.lmms_model import KscaleLMM

    task_dir, docs = colour_task
    res = evaluate(KscaleLMM(qwen), [f"{TASK}_gen"], [str(task_dir)], limit=4, bootstrap_iters=0)
    got = [s["filtered_resps"][0] for s in sorted(res["samples"][f"{TASK}_gen"], key=lambda s: s["doc_id"])]
    want, cut = [], 0
    for d in docs[:4]:
        b = qwen.adapter.build_batch(qwen, [Image.open(d["image"]).convert("RGB")], [d["question"]])
        with torch.no_grad():
            ids = qwen.model.generate(**b.inputs, max_new_tokens=6, do_sample=False,
                                      pad_token_id=qwen.tokenizer.eos_token_id)
        text = qwen.tokenizer.decode(ids[0, b.inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        cut += STOP in text
        want.append(text.split(STOP)[0])
    assert [g.strip() for g in got] == [w.strip() for w in want]
    assert cut > 0  # the stop string did cut some answers


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two DeepSpeed runs, then 3 variants x (image, blind) through lmms-eval
def test_trained_malora_and_lora_runs_evaluate_end_to_end(qwen_dir, colour_task, tmp_path) -> None:
    """kscale trains MaLoRA and the plain-LoRA baseline (same data, steps, rank, targets; DeepSpeed ZeRO-2, one
    process), and the eval job takes both train run directories as variants: every variant's choice scores
    (with and without the image) equal the direct computation with that run's adapter loaded by hand (MaLoRA
    by kscale, LoRA by PEFT's own loader), and the referee's page is written."""
    require_module("deepspeed", install="pip install -e '.[train]'")
    from peft import PeftModel

    from kscale.models import load_model
    from kscale.runner import run_job
    from kscale.spec import spec_from_dict
    from kscale.train.malora import MaLoRAModel
    from tests.integration.test_train_deepspeed import _generated, _raw_spec, _run

    task_dir, docs = colour_task
    docs = docs[:6]  # eval.limit: the first 6 documents (three colours, two each)
    runs = {}
    for method in ("malora", "lora"):
        runs[method] = tmp_path / method
        raw = _raw_spec(qwen_dir, runs[method], _generated(16), method=method, max_steps=3, grad_accum=1, lr=2e-2)
        assert len(_run(raw, runs[method])) == 3
    spec = spec_from_dict({
        "kind": "eval", "model": {"path": qwen_dir, "device": "cpu", "dtype": "float32"},
        "eval": {"tasks": [TASK], "include_path": [str(task_dir)], "batch_size": 6, "bootstrap_iters": 100,
                 "limit": len(docs),
                 "variants": [{"name": "base"}, {"name": "malora", "kind": "malora", "path": str(runs["malora"])},
                              {"name": "lora", "kind": "lora", "path": str(runs["lora"])}]},
        "output": {"path": str(tmp_path / "eval")}, "resources": {"executor": "local"}})
    run_job(spec, show_bar=False)
    scores = pd.read_csv(tmp_path / "eval" / "scores.csv").set_index("variant")
    samples = pd.read_csv(tmp_path / "eval" / "samples.csv")
    assert list(scores.index) == ["base", "malora", "lora"]
    by_hand = {"base": load_model(spec.model), "malora": load_model(spec.model), "lora": load_model(spec.model)}
    MaLoRAModel.from_pretrained(by_hand["malora"].model, runs["malora"] / "adapter")
    PeftModel.from_pretrained(by_hand["lora"].model, str(runs["lora"] / "adapter"))
    direct = {}
    for name, lm in by_hand.items():
        for blind in (False, True):
            rows = samples[(samples.variant == name) & (samples.blind == blind)].sort_values("doc_id")
            got = -np.array([json.loads(c) for c in rows.choice_nll])
            direct[name, blind] = direct_ll(lm, docs, blind=blind)
            np.testing.assert_allclose(got, direct[name, blind], atol=1e-4, rtol=0, err_msg=f"{name} blind={blind}")
        assert scores.loc[name, "score"] == pytest.approx(accuracy(direct[name, False], docs), abs=1e-12), name
        assert scores.loc[name, "blind_score"] == pytest.approx(accuracy(direct[name, True], docs), abs=1e-12), name
    for name in ("malora", "lora"):  # the trained adapters moved the answers' scores
        assert np.abs(direct[name, False] - direct["base", False]).max() > 1e-4, name
    page = (tmp_path / "eval" / "report.html").read_text()
    assert "Benchmark scores" in page and "<b>lora</b> on kscale_colors" in page


@pytest.mark.slow  # an in-process run and two torchrun ranks, each importing lmms-eval and loading the model
def test_one_task_shard_per_worker_merges_to_the_single_process_run(qwen_dir, colour_task, tmp_path) -> None:
    """``torchrun --nproc_per_node 2 -m kscale.eval``: each rank answers every other document (lmms-eval's
    rank::world split, recorded as ``kscale_shards``), rank 0 alone writes the run, and its scores and every
    choice's score equal the in-process run's."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from kscale.runner import run_job
    from kscale.spec import spec_from_dict

    task_dir, docs = colour_task

    def raw(out: Path) -> dict:
        return {"kind": "eval", "model": {"path": qwen_dir, "device": "cpu", "dtype": "float32"},
                "eval": {"tasks": [TASK], "include_path": [str(task_dir)], "batch_size": 6, "bootstrap_iters": 100,
                         "blind": False}, "output": {"path": str(out)}, "resources": {"executor": "local"}}

    run_job(spec_from_dict(raw(tmp_path / "one")), show_bar=False)
    job = tmp_path / "two.yaml"
    job.write_text(yaml.safe_dump(raw(tmp_path / "two")))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), "-m", "kscale.eval", str(job)], env=env, cwd=repo, capture_output=True,
                          text=True, timeout=500)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    shards = json.loads((tmp_path / "two" / "runs" / "base.json").read_text())["kscale_shards"]
    ids = [sorted(d for t, d in shard if t == TASK) for shard in shards]
    assert ids == [list(range(0, len(docs), 2)), list(range(1, len(docs), 2))]  # one shard per rank, disjoint
    one, two = (json.loads((tmp_path / r / "scores.json").read_text()) for r in ("one", "two"))
    assert len(one) == len(two) == 1
    for key in ("score", "stderr", "n"):
        assert two[0][key] == pytest.approx(one[0][key], abs=1e-12), key
    a, b = (pd.read_csv(tmp_path / r / "samples.csv").sort_values("doc_id") for r in ("one", "two"))
    assert list(a.doc_id) == list(b.doc_id) == list(range(len(docs)))
    np.testing.assert_allclose(np.array([json.loads(c) for c in b.choice_nll]),
                               np.array([json.loads(c) for c in a.choice_nll]), atol=1e-5, rtol=0)
