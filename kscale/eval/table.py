"""lmms-eval's results -> the eval stage's tables (what :func:`kscale.eval.run.run_eval` writes).

lmms-eval reports each task's metrics as ``results[task]["<metric>,<filter>"]`` with the standard error
under ``"<metric>_stderr,<filter>"`` (``"N/A"`` where it has none) and the documents scored under
``n-samples[task]["effective"]``. :func:`score_rows` turns the results of every (variant, image
condition) into one row per (variant, task, metric): ``score``, ``stderr``, ``n`` with the image, the same
three of the blind run (``blind_score``, ``blind_stderr``, ``blind_n``: every image removed, MMStar's blind
baseline), and ``gain = score - blind_score`` (the multimodal gain, with ``gain_stderr`` =
sqrt(stderr^2 + blind_stderr^2), treating the two runs as independent: an upper bound when their errors
are positively correlated, as they are on the same questions). :func:`sample_rows` gives the per-document
metrics of each run (``samples.csv``; with ``choice_nll``, the number each loglikelihood request got, in
request order: for multiple choice the mean negative log-likelihood of each choice), from which paired
statistics can be computed.
"""

from __future__ import annotations

import json
import math
from typing import Any

STDERR = "_stderr"


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def task_metrics(results: dict[str, Any]) -> dict[str, dict[str, tuple[float | None, float | None, int | None]]]:
    """task -> metric (``name,filter``) -> (score, stderr, n) of one lmms-eval results dict."""
    out: dict[str, dict[str, tuple[float | None, float | None, int | None]]] = {}
    n_samples = results.get("n-samples", {})
    for task, metrics in results["results"].items():
        n = n_samples.get(task, {}).get("effective")
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if key == "alias" or not filt or name.endswith(STDERR) or STDERR + "_" in name:
                continue
            if _number(value) is None:
                continue
            err = _number(metrics.get(f"{name}{STDERR},{filt}"))
            out.setdefault(task, {})[key] = (float(value), err, int(n) if n is not None else None)
    return out


def score_rows(runs: dict[tuple[str, bool], dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (variant, task, metric) from ``{(variant, blind): lmms-eval results}``."""
    rows = []
    variants = list(dict.fromkeys(v for v, _ in runs))
    for variant in variants:
        seen = task_metrics(runs[(variant, False)])
        blind = task_metrics(runs[(variant, True)]) if (variant, True) in runs else {}
        for task, metrics in seen.items():
            for metric, (score, err, n) in metrics.items():
                b_score, b_err, b_n = blind.get(task, {}).get(metric, (None, None, None))
                gain = score - b_score if b_score is not None else None
                gain_err = math.hypot(err, b_err) if gain is not None and err is not None and b_err is not None else None
                rows.append({"variant": variant, "task": task, "metric": metric, "score": score, "stderr": err,
                             "n": n, "blind_score": b_score, "blind_stderr": b_err, "blind_n": b_n, "gain": gain,
                             "gain_stderr": gain_err})
    return rows


def sample_rows(variant: str, blind: bool, results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-document metrics of one run (every numeric field lmms-eval logged for the document)."""
    rows = []
    for task, samples in (results.get("samples") or {}).items():
        for s in samples:
            row = {"variant": variant, "blind": blind, "task": task, "doc_id": s.get("doc_id"),
                   "target": str(s.get("target"))}
            row.update({k: float(v) for k, v in s.items() if _number(v) is not None and k != "doc_id"})
            resps = s.get("filtered_resps") or []
            if resps and all(isinstance(r, (list, tuple)) and r and _number(r[0]) is not None for r in resps):
                row["choice_nll"] = json.dumps([float(r[0]) for r in resps])  # loglikelihood requests, in order
            rows.append(row)
    return rows
