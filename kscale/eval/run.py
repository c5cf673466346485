"""The eval stage's entry (``kscale.spec.STAGES["eval"]``): every variant through lmms-eval, with and without
the image, into one run directory.

Run directory (``output.path``)::

    kscale.json                    the run marker (kind eval, spec fingerprint)
    runs/<variant>.json            lmms-eval's results of the variant (results, n-samples, configs, versions)
    runs/<variant>.blind.json      the same with every image removed (eval.blind)
    scores.csv, scores.json        one row per (variant, task, metric): kscale.eval.table.score_rows
    samples.csv                    per-document metrics of every run: kscale.eval.table.sample_rows
    mechanism.csv, report.html     the referee's table: scores beside the mechanism runs named per variant
                                   (analysis_run, bias_run), deltas from base: kscale.eval.referee
    result.json                    the EvalResult

Each variant loads the model afresh (:func:`kscale.eval.variants.load_variant`); the image and blind runs
share it (the blind run is the same :class:`~kscale.eval.lmms_model.KscaleLMM` with ``blind=True``). A run
whose ``runs/*.json`` exists is not repeated on ``output.if_exists: resume`` (same spec only: the marker's
fingerprint is checked). The stage runs in one process on the driver (``resources`` executor and workers
are not used: lmms-eval's own data parallelism is ``accelerate launch``, see docs/malora.md).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from kscale.output import RUN_MARKER, OutputKind, claim_output, run_marker, run_marker_reader, write_json_atomic
from kscale.results import EvalResult
from kscale.spec import JobSpec

EVAL_KIND = OutputKind("eval run", run_marker_reader("eval"))
RUNS = "runs"


def stage_entry(spec: JobSpec, ctx) -> EvalResult:
    """The stage table's entry (``kscale.spec.STAGES``)."""
    return run_eval(spec)


def run_file(run_dir: Path, variant: str, blind: bool) -> Path:
    return run_dir / RUNS / f"{variant}{'.blind' if blind else ''}.json"


def _jsonable(results: dict[str, Any]) -> dict[str, Any]:
    """The parts of lmms-eval's results worth keeping, as JSON (per-document samples go to samples.csv)."""
    keep = {k: results[k] for k in ("results", "n-samples", "configs", "versions", "higher_is_better") if k in results}
    return json.loads(json.dumps(keep, default=str))


def run_eval(spec: JobSpec) -> EvalResult:
    import pandas as pd

    from kscale.eval.table import sample_rows, score_rows

    t0 = time.time()
    cfg = spec.eval

    def create(tmp: Path) -> None:
        (tmp / RUNS).mkdir()
        write_json_atomic(tmp / RUN_MARKER, run_marker("eval", spec.fingerprint()))

    with claim_output(spec.output.path, spec.output.if_exists, EVAL_KIND, spec.fingerprint(), create) as run_dir:
        runs: dict[tuple[str, bool], dict[str, Any]] = {}
        samples: list[dict[str, Any]] = []
        for variant in cfg.variants:
            todo = [b for b in ([False, True] if cfg.blind else [False]) if not run_file(run_dir, variant.name, b).is_file()]
            if todo:
                done = evaluate_variant(spec, variant, todo)
                for blind, results in done.items():
                    samples += sample_rows(variant.name, blind, results)
                    write_json_atomic(run_file(run_dir, variant.name, blind), _jsonable(results))
            for blind in ([False, True] if cfg.blind else [False]):
                runs[(variant.name, blind)] = json.loads(run_file(run_dir, variant.name, blind).read_text())
        rows = score_rows(runs)
        pd.DataFrame(rows).to_csv(run_dir / "scores.csv", index=False)
        write_json_atomic(run_dir / "scores.json", rows)
        if samples:
            old = run_dir / "samples.csv"
            frame = pd.DataFrame(samples)
            if old.is_file():  # a resumed run: keep the rows of the runs done before
                prev = pd.read_csv(old)
                frame = pd.concat([prev[~prev.set_index(["variant", "blind"]).index.isin(
                    frame.set_index(["variant", "blind"]).index)], frame], ignore_index=True)
            frame.to_csv(old, index=False)
        from kscale.eval.referee import build_report

        build_report(run_dir, list(cfg.variants))
    return EvalResult(run_dir=str(run_dir), variants=[v.name for v in cfg.variants], tasks=list(cfg.tasks),
                      rows=rows, table=str(Path(run_dir) / "scores.csv"), seconds=round(time.time() - t0, 1))


def evaluate_variant(spec: JobSpec, variant, conditions: list[bool]) -> dict[bool, dict[str, Any]]:
    """lmms-eval's results of one variant, with the image (False) and/or blind (True)."""
    from kscale.eval.harness import evaluate
    from kscale.eval.lmms_model import KscaleLMM
    from kscale.eval.variants import load_variant

    cfg = spec.eval
    loaded = load_variant(spec.model, variant)
    out = {}
    for blind in conditions:
        model = KscaleLMM(loaded, batch_size=cfg.batch_size, blind=blind, max_new_tokens=cfg.max_new_tokens)
        out[blind] = evaluate(model, cfg.tasks, cfg.include_path, cfg.limit, cfg.batch_size, cfg.bootstrap_iters,
                              cfg.seed)
    return out
