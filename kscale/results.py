"""What each stage returns: one typed result per stage, printed by the CLI without guessing.

``run_extract`` -> :class:`ExtractResult`, ``run_bias`` -> :class:`BiasResult` (both carry the shard
pool's final progress, the same numbers as ``_progress.json``), ``run_analyze`` -> :class:`AnalyzeResult`,
``run_train`` / ``run_train_on_ray`` -> :class:`TrainResult`, ``run_eval`` -> :class:`EvalResult`. ``summary_line()`` is what ``kscale
submit`` prints, ``to_dict()`` the JSON form (``kind`` first), ``failed`` decides its exit code.
This module imports nothing from kscale.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

RESULT_FILE = "result.json"  # the result as JSON in a run directory (analyze, train, bias), kept by the runner


@dataclass(frozen=True)
class StageResult:
    kind: ClassVar[str] = ""

    @property
    def failed(self) -> bool:
        return False

    def summary_line(self) -> str:
        raise NotImplementedError

    def notes(self) -> list[str]:
        """Extra lines for stderr (e.g. quarantined shards)."""
        return []

    def result_file(self) -> str | None:
        """Where ``kscale submit`` keeps ``to_dict()`` as JSON (``result.json`` in the run directory), or None
        when the stage's output is not a run directory (extract: the key store)."""
        return None

    def _details(self) -> str:
        path = self.result_file()
        return f"; details {path}" if path else ""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class ShardedResult(StageResult):
    """The shard pool's final progress (``executors.progress.Progress.snapshot``)."""

    job: str
    state: str  # "succeeded" | "failed"
    shards_total: int
    shards_done: int
    shards_skipped: int
    shards_failed: int
    quarantined: dict[str, str]
    retries: int
    samples: int
    sample_errors: int
    tokens: dict[str, int]
    bytes: int
    seconds: float
    samples_per_s: float
    started_at: str
    updated_at: str
    retried: dict[str, list[str]] = field(default_factory=dict)  # shard -> the error of each failed attempt

    @classmethod
    def progress_fields(cls, snapshot: dict[str, Any]) -> dict[str, Any]:
        names = {f.name for f in dataclasses.fields(ShardedResult)}
        return {k: v for k, v in snapshot.items() if k in names}

    @property
    def failed(self) -> bool:
        return self.shards_failed > 0 or self.state == "failed"

    def shards_text(self) -> str:
        return (f"shards {self.shards_done} done, {self.shards_skipped} skipped (already committed), "
                f"{self.shards_failed} failed")

    def notes(self) -> list[str]:
        return [f"kscale: quarantined {name}: {err.splitlines()[0]}" for name, err in self.quarantined.items()]


@dataclass(frozen=True)
class ExtractResult(ShardedResult):
    kind: ClassVar[str] = "extract"
    store: str = ""

    def summary_line(self) -> str:
        return (f"kscale: extract {self.state}: {self.shards_text()}; samples {self.samples} "
                f"({self.sample_errors} recorded errors); tokens "
                + ", ".join(f"{k} {v}" for k, v in sorted(self.tokens.items()))
                + f"; {self.bytes / 1e6:.2f} MB of keys in {self.seconds:.1f} s "
                f"({self.samples_per_s:.2f} samples/s); store {self.store}")


@dataclass(frozen=True)
class BiasResult(ShardedResult):
    kind: ClassVar[str] = "bias"
    run_dir: str = ""
    variants: list[str] = field(default_factory=list)
    samples_table: str | None = None
    aggregate_table: str | None = None
    report: str | None = None

    def summary_line(self) -> str:
        return (f"kscale: bias {self.state}: {self.shards_text()}; variants {', '.join(self.variants)}; "
                f"samples {self.samples} ({self.sample_errors} recorded errors); run {self.run_dir}"
                + (f"; report {self.report}" if self.report else "; no committed rows") + self._details())

    def result_file(self) -> str | None:
        return f"{self.run_dir}/{RESULT_FILE}" if self.run_dir else None


@dataclass(frozen=True)
class AnalyzeResult(StageResult):
    kind: ClassVar[str] = "analyze"
    name: str
    out_dir: str
    rows: int
    seconds: float
    key_bytes: int = 0  # keys streamed: every selected head of both modalities, once per (store, layer)

    def summary_line(self) -> str:
        return (f"kscale: analysis done: {self.rows} rows from {self.key_bytes / 1e6:.2f} MB of keys in {self.seconds} s; "
                f"table {self.out_dir}/results.parquet; "
                f"report {self.out_dir}/report.html" + self._details())

    def result_file(self) -> str | None:
        return f"{self.out_dir}/{RESULT_FILE}"


@dataclass(frozen=True)
class TrainResult(StageResult):
    kind: ClassVar[str] = "train"
    run_dir: str
    steps: int
    resumed_from: int
    last: dict[str, float]  # the last logged step's loss terms (loss, lm, align)
    eval: dict[str, Any] | None = None  # the before/after table (train.eval.at_end)
    adapter_checkpoint: str | None = None  # Ray Train's copy of the adapter (run_train_on_ray)

    def summary_line(self) -> str:
        terms = ", ".join(f"{k} {v:.4f}" for k, v in sorted(self.last.items()) if isinstance(v, float))
        return (f"kscale: train done: {self.steps} steps (resumed from {self.resumed_from}); last {terms}; "
                f"run {self.run_dir}" + ("; eval.json written" if self.eval is not None else "") + self._details())

    def result_file(self) -> str | None:
        return f"{self.run_dir}/{RESULT_FILE}"


@dataclass(frozen=True)
class EvalResult(StageResult):
    """``run_eval``: the scores table (one row per variant, task and metric; ``kscale.eval.table``)."""

    kind: ClassVar[str] = "eval"
    run_dir: str
    variants: list[str]
    tasks: list[str]
    rows: list[dict[str, Any]]  # variant, task, metric, score, stderr, n, blind_score, blind_stderr, gain
    table: str | None = None  # scores.csv in the run directory
    seconds: float = 0.0

    def summary_line(self) -> str:
        return (f"kscale: eval done: {len(self.variants)} variants x {len(self.tasks)} tasks, {len(self.rows)} rows "
                f"in {self.seconds} s; table {self.table}" + self._details())

    def result_file(self) -> str | None:
        return f"{self.run_dir}/{RESULT_FILE}"
