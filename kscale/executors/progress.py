"""Progress of a sharded job: a terminal bar and ``_progress.json`` next to the outputs.

The JSON file outlives any cluster, so ``kscale status RUN`` works after the job's Ray is gone.
Quarantined shards are also written as ``shards/<name>.failed.json`` with their last error.
On Ray the snapshot also says where shards ran: ``nodes`` (per Ray node id: shards done, actors lost there
and whether the GCS saw the node die) and, in the final snapshot only (it grows with the shards),
``shard_nodes`` (shard name -> the node that committed it).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from kscale.store.layout import write_json_atomic


_GAUGES: dict[str, Any] = {}


def publish_metrics(snapshot: dict) -> None:
    """Mirror a progress snapshot into Ray gauges (``kscale_shards``, ``kscale_samples``, ``kscale_tokens``,
    ``kscale_bytes``), tagged by job and stage; a no-op outside a Ray driver or worker."""
    import ray

    if not ray.is_initialized():
        return
    from ray.util.metrics import Gauge

    if not _GAUGES:
        _GAUGES["shards"] = Gauge("kscale_shards", "Shards by state", tag_keys=("job", "stage", "state"))
        _GAUGES["samples"] = Gauge("kscale_samples", "Samples processed", tag_keys=("job", "stage"))
        _GAUGES["tokens"] = Gauge("kscale_tokens", "Tokens stored by modality", tag_keys=("job", "stage", "modality"))
        _GAUGES["bytes"] = Gauge("kscale_bytes", "Bytes of keys written", tag_keys=("job", "stage"))
    tags = {"job": str(snapshot.get("job")), "stage": str(snapshot.get("stage"))}
    for st in ("total", "done", "skipped", "failed"):
        _GAUGES["shards"].set(snapshot.get(f"shards_{st}", 0), tags={**tags, "state": st})
    _GAUGES["samples"].set(snapshot.get("samples", 0), tags=tags)
    _GAUGES["bytes"].set(snapshot.get("bytes", 0), tags=tags)
    for modality, n in (snapshot.get("tokens") or {}).items():
        _GAUGES["tokens"].set(n, tags={**tags, "modality": modality})


class Progress:
    def __init__(self, out_dir: str, job: str, stage: str, total: int, skipped: int, show_bar: bool = True):
        self.path = Path(out_dir) / "_progress.json"
        self.out_dir = Path(out_dir)
        self.job, self.stage = job, stage
        self.total, self.skipped = total, skipped
        self.done = self.failed = self.samples = self.sample_errors = self.bytes = 0
        self.tokens: dict[str, int] = {}
        self.quarantined: dict[str, str] = {}
        self.retries = 0
        self.retried: dict[str, list[str]] = {}  # shard name -> the error of each failed attempt
        self.nodes: dict[str, dict] = {}  # Ray node id -> {"shards_done", "actors_lost", "node_lost"}
        self.shard_nodes: dict[str, str] = {}  # shard name -> the node that committed it (final snapshot only)
        self.replaced_actors = 0
        self.write_failed = False  # a _progress.json write failed: warned once, later failures are quiet
        self.t0 = time.time()
        self.started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        # A rerun with nothing left to do keeps the last real counts instead of writing "0 samples".
        self.previous = _previous_counts(self.path, job, stage) if total and skipped >= total else None
        self.bar = tqdm(total=total, initial=skipped, unit="shard", desc=f"{stage} {job}", file=sys.stderr,
                        disable=not show_bar, dynamic_ncols=True)
        self._write("running")

    def _node(self, node: str) -> dict:
        return self.nodes.setdefault(node, {"shards_done": 0, "actors_lost": 0, "node_lost": False})

    def shard_done(self, marker: dict, node: str | None = None) -> None:
        if node is not None:
            self._node(node)["shards_done"] += 1
            if "shard" in marker:
                self.shard_nodes[marker["shard"]] = node
        self.done += 1
        self.samples += marker.get("n_samples_ok", 0)
        self.sample_errors += marker.get("n_errors", 0)
        self.bytes += marker.get("key_bytes", 0)
        for k, v in marker.get("tokens", {}).items():
            self.tokens[k] = self.tokens.get(k, 0) + v
        dt = max(time.time() - self.t0, 1e-9)
        self.bar.set_postfix(samples_s=f"{self.samples / dt:.1f}", tok_s=f"{sum(self.tokens.values()) / dt:.0f}",
                             MB_s=f"{self.bytes / dt / 1e6:.2f}")
        self.bar.update(1)
        self._write("running")

    def actor_replaced(self, node: str | None, node_alive: bool | None) -> None:
        """A worker died and is being replaced; ``node_alive`` False when its whole node is gone."""
        self.replaced_actors += 1
        if node is not None:
            entry = self._node(node)
            entry["actors_lost"] += 1
            entry["node_lost"] = entry["node_lost"] or node_alive is False
        if node_alive is False:
            tqdm.write(f"kscale: Ray node {node} is gone; its workers are replaced on the other nodes",
                       file=sys.stderr)

    def shard_retry(self, name: str, error: str) -> None:
        self.retries += 1
        self.retried.setdefault(name, []).append(error)
        tqdm.write(f"kscale: shard {name} failed, retrying: {error}", file=sys.stderr)

    def shard_failed(self, name: str, error: str, attempts: int) -> None:
        self.failed += 1
        self.quarantined[name] = error
        shards = self.out_dir / "shards"
        shards.mkdir(parents=True, exist_ok=True)
        write_json_atomic(shards / f"{name}.failed.json", {"shard": name, "attempts": attempts, "error": error})
        tqdm.write(f"kscale: shard {name} quarantined after {attempts} attempt(s): {error}", file=sys.stderr)
        self.bar.update(1)
        self._write("running")

    def finish(self) -> dict:
        self.bar.close()
        state = "failed" if self.failed else "succeeded"
        return self._write(state, final=True)

    def snapshot(self, state: str) -> dict:
        secs = time.time() - self.t0
        if self.previous is not None and not self.done and not self.failed:
            return {**self.previous, "state": state, "shards_total": self.total, "shards_done": 0,
                    "shards_skipped": self.skipped, "shards_failed": 0,
                    "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "note": "nothing to do: every shard was already committed; counts are the last real run's"}
        return {
            "job": self.job, "stage": self.stage, "state": state, "shards_total": self.total,
            "shards_done": self.done, "shards_skipped": self.skipped, "shards_failed": self.failed,
            "quarantined": self.quarantined, "retries": self.retries, "retried": self.retried,
            "samples": self.samples,
            "sample_errors": self.sample_errors, "tokens": self.tokens, "bytes": self.bytes,
            "seconds": round(secs, 3), "samples_per_s": round(self.samples / max(secs, 1e-9), 3),
            "started_at": self.started_at, "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **({"nodes": self.nodes, "replaced_actors": self.replaced_actors} if self.nodes else {}),
        }

    def _write(self, state: str, final: bool = False) -> dict:
        snap = self.snapshot(state)
        if final and self.shard_nodes:
            snap["shard_nodes"] = dict(sorted(self.shard_nodes.items()))
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, snap)
        except OSError as e:  # a full disk or a lost mount: progress is a convenience, the job goes on
            if not self.write_failed:
                tqdm.write(f"kscale: cannot write {self.path} ({e.strerror or e}); progress will not be saved "
                           "until it can be (the job goes on)", file=sys.stderr)
            self.write_failed = True
        publish_metrics(snap)  # dashboard gauges (no-op without Ray)
        return snap


_COUNTS = ("samples", "sample_errors", "tokens", "bytes", "seconds", "samples_per_s", "started_at", "quarantined",
           "retries")


def _previous_counts(path: Path, job: str, stage: str) -> dict | None:
    """The counts of the last ``_progress.json`` of the same job and stage that did real work, if any."""
    import json

    try:
        prev = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if prev.get("job") != job or prev.get("stage") != stage or not (prev.get("samples") or prev.get("bytes")):
        return None
    return {"job": job, "stage": stage, **{k: prev[k] for k in _COUNTS if k in prev}}


class StageBar:
    """Progress of a stage without a shard pool (analysis: layers of each store; train: optimizer steps): the
    same kind of tqdm bar on stderr as the shard pool's, and a ``_progress.json`` snapshot in ``out_dir`` (at
    most one write per ``every_s`` seconds, and at the end) so ``kscale status`` shows a running stage. The
    runner replaces the snapshot with the stage's summary when it ends (``runner._record_final``); an
    interrupted run's snapshot is marked stopped by :class:`kscale.targets.local.LocalRun`."""

    def __init__(self, out_dir: str | Path, job: str, stage: str, unit: str, total: int = 0, initial: int = 0,
                 show_bar: bool = True, every_s: float = 1.0):
        self.out_dir, self.path = Path(out_dir), Path(out_dir) / "_progress.json"
        self.job, self.stage, self.unit = job, stage, unit
        self.total, self.done, self.initial = total, initial, initial
        self.bytes = self.tokens = 0
        self.every_s, self.last_write = every_s, 0.0
        self.detail = ""
        self.t0, self.started_at = time.time(), time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.bar = tqdm(total=total or None, initial=initial, unit=unit, desc=f"{stage} {job}", file=sys.stderr,
                        disable=not show_bar, dynamic_ncols=True)
        self._write("running")

    def set_total(self, total: int) -> None:
        self.total = self.bar.total = total
        self.bar.refresh()

    def advance(self, n: int = 1, nbytes: int = 0, tokens: int = 0, detail: str = "", **postfix: str) -> None:
        """``n`` units done; ``nbytes`` of keys read and ``tokens`` processed by them (for the rates)."""
        self.done += n
        self.bytes += nbytes
        self.tokens += tokens
        self.detail = detail or self.detail
        dt = max(time.time() - self.t0, 1e-9)
        rates = {}
        if self.bytes:
            rates["keys"] = tqdm.format_sizeof(self.bytes / dt, "B/s")
        if self.tokens:
            rates["tok_s"] = f"{self.tokens / dt:.0f}"
        shown = postfix or ({"at": detail} if detail else {})  # the detail is for `kscale status` when postfix is given
        self.bar.set_postfix({**shown, **rates}, refresh=False)
        self.bar.update(n)
        if time.time() - self.last_write >= self.every_s or (self.total and self.done >= self.total):
            self._write("running")

    def close(self) -> None:
        self.bar.close()

    def snapshot(self, state: str) -> dict:
        secs = time.time() - self.t0
        return {"job": self.job, "stage": self.stage, "state": state, "unit": self.unit,
                "units_done": self.done, "units_total": self.total, "bytes": self.bytes, "tokens": self.tokens,
                "seconds": round(secs, 3), "MB_per_s": round(self.bytes / max(secs, 1e-9) / 1e6, 3),
                "tokens_per_s": round(self.tokens / max(secs, 1e-9), 1), "detail": self.detail,
                "started_at": self.started_at, "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def _write(self, state: str) -> None:
        self.last_write = time.time()
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, self.snapshot(state))
        except OSError:  # progress is a convenience; the shard pool's Progress warns about the same disk
            pass
