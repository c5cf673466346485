"""Stages as a table (``kscale.spec.STAGES``): the loader, the runner, the Slurm render and ``validate
--explain`` read each kind's entry, so a change of an entry changes what they do, and no ``spec.kind ==``
branch is left outside the spec."""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
import typing
from pathlib import Path

import pytest
import yaml

import kscale
from kscale.results import AnalyzeResult
from kscale.spec import STAGES, JobSpec, SpecError, spec_from_dict
from tests.conftest import extract_spec

ROOT = Path(kscale.__file__).parent
CALLS: list = []


def _fake_entry(spec, ctx):
    CALLS.append((spec.kind, ctx.show_bar))
    Path(spec.output.path).mkdir(parents=True, exist_ok=True)
    return AnalyzeResult(spec.name, spec.output.path, 0, 0.0)


def test_every_entry_is_a_callable_and_every_section_a_field_of_the_job() -> None:
    hints = typing.get_type_hints(JobSpec)
    assert tuple(STAGES) == typing.get_args(hints["kind"])
    for kind, stage in STAGES.items():
        module, function = stage.entry.split(":")
        assert callable(getattr(importlib.import_module(module), function)), stage.entry
        assert stage.section in typing.get_args(hints[kind]), kind


def test_the_loader_reads_needs_and_sections_from_the_table(tmp_path, monkeypatch) -> None:
    d = extract_spec(tmp_path)
    d.pop("data")
    with pytest.raises(SpecError, match="data: required for kind 'extract'"):
        spec_from_dict(d)
    monkeypatch.setitem(STAGES, "extract", dataclasses.replace(STAGES["extract"], needs=("model",)))
    spec_from_dict(d, check_model=False)  # no longer required
    d2 = extract_spec(tmp_path)
    d2["analyze"] = {}
    with pytest.raises(SpecError, match="section 'analyze' does not belong in a job of kind 'extract'"):
        spec_from_dict(d2)


def test_the_runner_calls_the_entry_and_records_as_the_table_says(tmp_path, monkeypatch) -> None:
    from kscale.runner import run_job

    # an analysis job without its section (the stage is faked: no store needed)
    spec = dataclasses.replace(spec_from_dict(extract_spec(tmp_path), check_model=False), kind="analyze",
                               extract=None)
    monkeypatch.setitem(STAGES, "analyze", dataclasses.replace(STAGES["analyze"], entry=f"{__name__}:_fake_entry"))
    CALLS.clear()
    run_job(spec, show_bar=False)
    assert CALLS == [("analyze", False)]
    progress = json.loads((Path(spec.output.path) / "_progress.json").read_text())
    assert progress["stage"] == "analyze" and progress["state"] == "succeeded"
    # final_progress off: the result file only
    (Path(spec.output.path) / "_progress.json").unlink()
    monkeypatch.setitem(STAGES, "analyze", dataclasses.replace(STAGES["analyze"], final_progress=False))
    run_job(spec, show_bar=False)
    assert not (Path(spec.output.path) / "_progress.json").exists()
    assert (Path(spec.output.path) / "result.json").exists()


def test_the_slurm_render_reads_runtime_and_cpus_from_the_table(tmp_path, monkeypatch) -> None:
    from kscale.targets.slurm import runtime_for, shape

    spec = spec_from_dict({**extract_spec(tmp_path), "resources": {"executor": "local", "cpus_per_worker": 2}})
    assert runtime_for(spec) == "none" and shape(spec).cpus_per_node == 2
    monkeypatch.setitem(STAGES, "extract", dataclasses.replace(STAGES["extract"], runtime="dask",
                                                               cluster_cpus=lambda s: 7))
    assert runtime_for(spec) == "dask" and shape(spec).cpus_per_node == 7


def test_path_fields_of_the_table_are_made_absolute(tmp_path, monkeypatch) -> None:
    from kscale.runner import absolutize

    from kscale.spec import AnalyzeConfig

    base = dataclasses.replace(spec_from_dict(extract_spec(tmp_path), check_model=False), kind="analyze",
                               extract=None, analyze=AnalyzeConfig(stores=["a", "b/c"]))
    spec = absolutize(base, cwd=str(tmp_path))
    assert spec.analyze.stores == [str(tmp_path / "a"), str(tmp_path / "b" / "c")]
    monkeypatch.setitem(STAGES, "analyze", dataclasses.replace(STAGES["analyze"], path_fields=()))
    assert absolutize(base, cwd=str(tmp_path)).analyze.stores == ["a", "b/c"]


def test_no_stage_branch_outside_the_spec() -> None:
    """A stage is an entry of the table, not a ``spec.kind == ...`` branch."""
    hits = [f"{p.relative_to(ROOT.parent)}:{i}" for p in ROOT.rglob("*.py") if p.parent.name != "spec"
            for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"spec\.kind\s*[!=]=", line)]
    allowed = {"kscale/doctor.py", "kscale/train/__main__.py"}  # checks of one stage's own entry points
    assert [h for h in hits if h.split(":")[0] not in allowed] == []


def test_validate_explain_describes_the_stage(tmp_path) -> None:
    from click.testing import CliRunner

    from kscale.cli import main

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(extract_spec(tmp_path)))
    out = CliRunner().invoke(main, ["validate", "--explain", str(job)]).output
    assert f"kind extract: {STAGES['extract'].summary}; writes a key store" in out
    assert "kinds: " + "; ".join(f"{k} ({s.summary})" for k, s in STAGES.items()) in out


def test_validate_explain_on_an_eval_job_says_what_its_workers_are(tmp_path) -> None:
    from click.testing import CliRunner

    from kscale.cli import main

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"kind": "eval", "model": {"path": "debug:qwen2_5_vl", "device": "cpu"},
                                   "eval": {"tasks": ["mmstar"]}, "output": {"path": str(tmp_path / "ev")},
                                   "resources": {"executor": "ray", "workers": 2}}))
    out = CliRunner().invoke(main, ["validate", "--explain", str(job)]).output
    assert (f"kind eval: {STAGES['eval'].summary}; writes an eval run at output.path; needs model, output; a cluster "
            f"allocation starts a Ray cluster first; resources.workers: the ranks of one process group") in out
    assert "eval.variants.path" in out and "resources.workers" in out


def test_no_two_spec_sections_share_a_class_name() -> None:
    """The JSON schema names each section's definition by its class name: two sections of one name (the eval
    stage's options and train's held-out evaluation) would make one of them validate against the other."""
    import dataclasses as dc

    seen: dict[str, type] = {}

    def walk(cls: type) -> None:
        for tp in typing.get_type_hints(cls).values():
            for t in (tp, *typing.get_args(tp), *[a for x in typing.get_args(tp) for a in typing.get_args(x)]):
                if dc.is_dataclass(t) and isinstance(t, type):
                    assert seen.setdefault(t.__name__, t) is t, f"{t.__module__}.{t.__name__} and {seen[t.__name__].__module__}"
                    if t is not cls:
                        walk(t)

    walk(JobSpec)
    assert "EvalStageConfig" in seen and "EvalConfig" in seen
