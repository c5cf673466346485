"""The referee's table of an eval run: its mechanism rows are the analysis stage's numbers on the same images.

A real extraction (attention statistics and query vectors on) of the debug Qwen2.5-VL, analysed twice
(two analysis seeds: two slightly different "variants"); :func:`kscale.eval.referee.build_report` then reads
the runs named per variant. Each row is checked against a table the analysis stage wrote itself for its own
report (``attention_vs_gap_<store>.csv``: key MMD² ``mmd_cross`` beside ``mass_image`` /
``efficiency_image`` per layer, KV heads pooled) and against ``query_gap_<store>.csv``; deltas equal the
differences from the base variant.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

import pytest

from kscale.runner import run_job
from kscale.spec import spec_from_dict
from tests.conftest import extract_spec
from tests.testing_utils import require_module

LIGHT = {"mmd": {"n_features": 256, "kernels": ["rbf"], "normalisations": ["none"], "bandwidth_multiples": [1.0]},
         "jsd": {"classifiers": [], "histogram": ["marginal"]}, "embed": {"methods": []}}


def _variant(name: str, kind: str, analysis: str) -> SimpleNamespace:
    return SimpleNamespace(name=name, kind=kind, analysis_run=analysis, bias_run=None, bias_variant=None)


def check_rows_equal_the_analysis_run(mech: pd.DataFrame, name: str, run: Path) -> None:
    """Variant ``name``'s mechanism rows == the tables the analysis run ``run`` wrote for its own report."""
    joined = pd.read_csv(run / "attention_vs_gap_store.csv")
    joined = joined[joined["head"] == -1].set_index("layer")
    mine = mech[mech.variant == name]
    for measure, column in (("key_mmd2", "mmd_cross"), ("attention_mass_image", "mass_image"),
                            ("attention_efficiency_image", "efficiency_image")):
        got = mine[mine.measure == measure].set_index("layer").value
        assert sorted(got.index) == [0, 1], (name, measure)
        np.testing.assert_allclose(got.to_numpy(), joined.loc[got.index, column].to_numpy(), rtol=1e-12,
                                   err_msg=f"{name} {measure}")
    qgap = pd.read_csv(run / "query_gap_store.csv").set_index(["layer", "head"])
    got = mine[mine.measure == "query_gap"].set_index(["layer", "head"])
    assert len(got) == len(qgap) > 0
    np.testing.assert_allclose(got.value.to_numpy(), qgap.loc[got.index, "gap_post"].to_numpy(), rtol=1e-12)


def test_mechanism_rows_equal_the_analysis_stage_and_deltas_are_differences(tmp_path) -> None:
    from kscale.eval.referee import build_report

    ext = extract_spec(tmp_path, data={"generated": {"n_samples": 12, "image_size": 112}, "shard_size": 6},
                       extract={"attention": {"enabled": True, "store_queries": True}})
    run_job(spec_from_dict(ext), show_bar=False)
    runs = {}
    for name, seed in (("base", 0), ("after", 1)):
        runs[name] = tmp_path / f"analysis_{name}"
        run_job(spec_from_dict({"kind": "analyze", "analyze": {"stores": [ext["output"]["path"]], "seed": seed,
                                                               **LIGHT},
                                "output": {"path": str(runs[name])}}), show_bar=False)
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    scores = [{"variant": v, "task": "t", "metric": "acc,none", "score": s, "stderr": 0.1, "n": 12,
               "blind_score": 1 / 6, "blind_stderr": 0.1, "blind_n": 12, "gain": s - 1 / 6, "gain_stderr": 0.14}
              for v, s in (("base", 0.25), ("after", 0.5))]
    (eval_dir / "scores.json").write_text(json.dumps(scores))
    # both runs read the base model's store: "after" is another analysis of it (a base-kind variant)
    page = build_report(eval_dir, [_variant("base", "base", str(runs["base"])),
                                   _variant("after", "base", str(runs["after"]))]).read_text()
    mech = pd.read_csv(eval_dir / "mechanism.csv")
    assert set(mech.measure) == {"key_mmd2", "attention_mass_image", "attention_efficiency_image", "query_gap"}
    for name, run in runs.items():
        check_rows_equal_the_analysis_run(mech, name, run)
    # the two analysis seeds differ in their random features: the key MMD moves, attention does not
    a = mech[mech.variant == "after"].set_index(["measure", "layer", "head"])
    b = mech[mech.variant == "base"].set_index(["measure", "layer", "head"])
    np.testing.assert_allclose(a.delta.to_numpy(), (a.value - b.value.reindex(a.index)).to_numpy(), rtol=1e-12)
    assert (a.loc["key_mmd2"].delta.abs() > 0).all()
    assert b.delta.isna().all()
    half = ((a.ci_high - a.ci_low) ** 2 + (b.ci_high - b.ci_low).reindex(a.index) ** 2) ** 0.5 / 2
    np.testing.assert_allclose((a.delta_ci_high - a.delta).to_numpy(), half.to_numpy(), rtol=1e-9)
    assert "Mechanism, before and after" in page and "0.25 → 0.5" in page
    # `kscale report` rebuilds the page from the run's own files (scores.json, mechanism.csv/json)
    (eval_dir / "report.html").unlink()
    r = subprocess.run([sys.executable, "-m", "kscale.cli", "report", str(eval_dir)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (eval_dir / "report.html").read_text() == page
    pd.testing.assert_frame_equal(pd.read_csv(eval_dir / "mechanism.csv"), mech)


# ------------------------------------------------------------------------- variants extracted with their adapter


def adapter_mechanism_runs(tmp_path: Path, model_dir: str, adapters: dict[str, Path]) -> dict[str, Path]:
    """variant -> analysis run of a store extracted with that variant's adapter (``extract.adapter``; none for
    base), the same images and the same analysis seed for all: only the adapter differs."""
    runs = {}
    for name in ("base", *adapters):
        adapter = {"adapter": {"kind": name, "path": str(adapters[name])}} if name in adapters else {}
        ext = extract_spec(tmp_path / name, model=model_dir,
                           data={"generated": {"n_samples": 6, "image_size": 112}, "shard_size": 6},
                           extract={"attention": {"enabled": True, "store_queries": True}, **adapter})
        run_job(spec_from_dict(ext), show_bar=False)
        runs[name] = tmp_path / name / "analysis"
        run_job(spec_from_dict({"kind": "analyze", "analyze": {"stores": [ext["output"]["path"]], "seed": 0, **LIGHT},
                                "output": {"path": str(runs[name])}}), show_bar=False)
    return runs


def eval_variants(adapters: dict[str, Path], runs: dict[str, Path]) -> list[dict]:
    return [{"name": "base", "analysis_run": str(runs["base"])}] + [
        {"name": k, "kind": k, "path": str(p), "analysis_run": str(runs[k])} for k, p in adapters.items()]


def check_adapter_rows(mech: pd.DataFrame, adapters: dict[str, Path], runs: dict[str, Path]) -> None:
    """Each variant's rows are its own analysis run's numbers, and the adapters moved the mechanism: a store
    extracted without its adapter (or a variant reading another's run) fails here."""
    import kscale.store

    for name, run in runs.items():
        check_rows_equal_the_analysis_run(mech, name, run)
        attrs = kscale.store.open(run.parent / "store").attrs  # the store that run analysed
        assert (attrs.get("adapter") or {}).get("path") == (str(adapters[name]) if name in adapters else None)
    by = mech.set_index(["variant", "measure", "layer", "head"]).value
    for name in adapters:
        for measure in ("key_mmd2", "attention_mass_image", "query_gap"):
            moved = (by[name][measure] - by["base"][measure]).abs()
            assert moved.max() > 1e-6, (name, measure)


def test_adapter_variants_read_stores_extracted_with_their_adapters(tmp_path, qwen_dir) -> None:
    """The referee's table of an eval job whose variants (base, malora, lora) each name an analysis run of a
    store extracted with that variant's adapter (random saved adapters): the rows equal those runs' numbers.
    The eval spec is loaded as a job would be; the scores are given (the lmms-eval run is the slow test below)."""
    from kscale.eval.referee import build_report
    from tests.integration.test_adapters import save_random_adapters

    adapters = save_random_adapters(qwen_dir, tmp_path / "adapters")
    runs = adapter_mechanism_runs(tmp_path, qwen_dir, adapters)
    spec = spec_from_dict({"kind": "eval", "model": {"path": qwen_dir, "device": "cpu", "dtype": "float32"},
                           "eval": {"tasks": ["t"], "variants": eval_variants(adapters, runs)},
                           "output": {"path": str(tmp_path / "eval")}})
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    (eval_dir / "scores.json").write_text(json.dumps([
        {"variant": v.name, "task": "t", "metric": "acc,none", "score": 0.5, "stderr": 0.1, "n": 12,
         "blind_score": 1 / 6, "blind_stderr": 0.1, "blind_n": 12, "gain": 1 / 3, "gain_stderr": 0.14}
        for v in spec.eval.variants]))
    build_report(eval_dir, list(spec.eval.variants))
    check_adapter_rows(pd.read_csv(eval_dir / "mechanism.csv"), adapters, runs)
    # a variant naming the analysis of another model's store is refused, not shown as its mechanism
    for name, wrong in (("lora", "base"), ("malora", "lora"), ("base", "malora")):
        variants = [dataclasses.replace(v, analysis_run=str(runs[wrong])) if v.name == name else v
                    for v in spec.eval.variants]
        with pytest.raises(ValueError, match=rf"\({name}\)\.analysis_run: .*extract its store with that adapter"):
            build_report(eval_dir, variants)


@pytest.fixture(scope="module")
def colour_task(tmp_path_factory):
    """tests/integration/test_eval.py's local lmms-eval task (imported here only when a test needs it)."""
    require_module("lmms_eval", install="pip install -e '.[eval]' && pip install --no-deps lmms-eval==0.7.3")
    from tests.integration import test_eval

    return test_eval.colour_task.__wrapped__(tmp_path_factory)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two DeepSpeed runs, three extractions and analyses, 3 variants through lmms-eval
def test_eval_job_of_trained_adapters_reports_their_stores_mechanism(tmp_path, qwen_dir, colour_task) -> None:
    """End to end: kscale trains MaLoRA and the plain-LoRA baseline (2 steps), extracts a store with each run
    directory as ``extract.adapter``, analyses it, and an eval job through lmms-eval names those analysis runs
    per variant: its report's mechanism rows equal the runs' numbers."""
    from tests.integration.test_adapters import TRAIN_METHODS, train_adapter_runs
    from tests.integration.test_eval import TASK

    task_dir, docs = colour_task
    adapters = train_adapter_runs(qwen_dir, tmp_path)
    assert tuple(adapters) == TRAIN_METHODS
    runs = adapter_mechanism_runs(tmp_path, qwen_dir, adapters)
    spec = spec_from_dict({
        "kind": "eval", "model": {"path": qwen_dir, "device": "cpu", "dtype": "float32"},
        "eval": {"tasks": [TASK], "include_path": [str(task_dir)], "batch_size": 6, "bootstrap_iters": 10,
                 "limit": 6, "blind": False, "variants": eval_variants(adapters, runs)},
        "output": {"path": str(tmp_path / "eval")}, "resources": {"executor": "local"}})
    run_job(spec, show_bar=False)
    check_adapter_rows(pd.read_csv(tmp_path / "eval" / "mechanism.csv"), adapters, runs)
    assert "Mechanism, before and after" in (tmp_path / "eval" / "report.html").read_text()
