"""Run a JobSpec on this machine or a Ray cluster: the one place that connects specs to executors.

``run_job(spec, address)`` makes relative paths absolute (workers may run elsewhere) and calls the
entry of the spec's stage from the stage table (``kscale.spec.STAGES``: ``extract.run:stage_entry``,
``analysis.run:stage_entry``, ...) with a :class:`RunContext`, through which a stage starts or joins Ray
(embedded local Ray, dashboard on 127.0.0.1, when no address is given) and gets its shard executor. It
reads no argv and no environment: the CLI does that.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kscale.results import StageResult
from kscale.spec import STAGES, JobSpec


def absolutize(spec: JobSpec, cwd: str | None = None) -> JobSpec:
    """Resolve relative paths against ``cwd`` so that workers anywhere see the same files."""
    base = Path(cwd or os.getcwd())

    def fix(p: str | None) -> str | None:
        if p is None or Path(p).expanduser().is_absolute():
            return p if p is None else str(Path(p).expanduser())
        return str((base / p).resolve())

    changes: dict = {"output": dataclasses.replace(spec.output, path=fix(spec.output.path))}
    if spec.data is not None and spec.data.path is not None:
        changes["data"] = dataclasses.replace(spec.data, path=fix(spec.data.path))
    if spec.model is not None and not spec.model.path.startswith("debug:") and (base / spec.model.path).exists():
        changes["model"] = dataclasses.replace(spec.model, path=fix(spec.model.path))
    stage = STAGES[spec.kind]
    section = getattr(spec, spec.kind)
    if stage.path_fields and section is not None:
        paths = {f: [fix(p) for p in v] if isinstance(v, list) else fix(v)
                 for f in stage.path_fields for v in [getattr(section, f)]}
        changes[spec.kind] = dataclasses.replace(section, **paths)
    return dataclasses.replace(spec, **changes)


@contextmanager
def ray_session(spec: JobSpec, address: str | None, dashboard: bool = True, quiet: bool = False):
    """Join ``address`` (or an already-initialised Ray), else start an embedded local Ray."""
    import ray

    if ray.is_initialized():
        yield None
        return
    import signal

    reaper = None
    our_sigterm = signal.getsignal(signal.SIGTERM)  # ray.init replaces it with one that exits the process
    if address:
        ctx = ray.init(address=address, log_to_driver=True)
    else:
        r = spec.resources
        need_cpus = max(os.cpu_count() or 1, int(r.workers * r.cpus_per_worker + 0.999))
        from kscale.targets.reaper import start_reaper, stop_reaper

        reaper = start_reaper()  # before ray.init: a driver killed while Ray starts leaves nothing either
        try:
            with _loopback_only():
                ctx = ray.init(num_cpus=need_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                               _node_ip_address="127.0.0.1", log_to_driver=True, configure_logging=True,
                               logging_level="warning")
        except BaseException:
            stop_reaper(reaper)  # reaps what a failed or interrupted start left
            raise
    if callable(our_sigterm):  # the CLI's clean stop (kscale.targets.local): KeyboardInterrupt, then shutdown
        signal.signal(signal.SIGTERM, our_sigterm)
    url = getattr(ctx, "dashboard_url", None)
    if url and not quiet:
        print(f"kscale: Ray dashboard at http://{url}" + ("" if address else dashboard_hint()),
              file=sys.stderr, flush=True)
    try:
        yield ctx
    finally:
        ray.shutdown()
        if reaper is not None:
            from kscale.targets.reaper import stop_reaper

            stop_reaper(reaper)


def dashboard_hint() -> str:
    """How to get past the dashboard's "Authentication Token Required" (Ray's token auth, on by default)."""
    token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if token.is_file():
        return f" (token: `cat {token}`, paste it into the dashboard's prompt)"
    return ""


@contextmanager
def _loopback_only():
    """Make an embedded Ray bind every port to 127.0.0.1. On Linux Ray turns a 127.0.0.1 node address into the
    routable one and its servers listen on all interfaces, unless "clusters" are disabled: the
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` switch (read by Ray's processes at start, and by this driver
    through ``ray_constants``). Restored afterwards so a later ``ray.init(address=...)`` behaves normally."""
    from ray._private import ray_constants

    var = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    old_env, old_const = os.environ.get(var), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[var] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old_const
        if old_env is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = old_env


def make_executor(spec: JobSpec, stage_module: str, show_bar: bool = True):
    if spec.resources.executor == "local":
        from kscale.executors.local import LocalExecutor

        return LocalExecutor(stage_module, show_bar)
    from kscale.executors.ray import RayExecutor

    return RayExecutor(stage_module, show_bar)


@dataclass(frozen=True)
class RunContext:
    """What a stage's entry (``STAGES[kind].entry``) gets from the runner besides its spec: where Ray is,
    whether to draw a progress bar and start the dashboard."""

    address: str | None = None
    show_bar: bool = True
    dashboard: bool = True

    def ray(self, spec: JobSpec):
        """Join ``address`` (or an already-initialised Ray), else start an embedded local Ray."""
        return ray_session(spec, self.address, self.dashboard)

    @contextmanager
    def maybe_ray(self, spec: JobSpec):
        """:meth:`ray` when the spec's executor is ``ray``, else nothing."""
        if spec.resources.executor == "ray":
            with self.ray(spec):
                yield
        else:
            yield

    def executor(self, spec: JobSpec, stage_module: str):
        """The shard pool of ``spec.resources.executor`` running ``stage_module``'s unit of work."""
        return make_executor(spec, stage_module, self.show_bar)


def run_job(spec: JobSpec, address: str | None = None, show_bar: bool = True,
            dashboard: bool = True) -> StageResult:
    spec = absolutize(spec)
    stage = STAGES[spec.kind]  # load_spec admits only the kinds of the table
    module, function = stage.entry.split(":")
    result = getattr(importlib.import_module(module), function)(spec, RunContext(address, show_bar, dashboard))
    return _record_final(spec, result) if stage.final_progress else _write_result(result)


def _write_result(result: StageResult) -> StageResult:
    """The result as JSON in its run directory (``result_file()``, named by the summary line), instead of
    on stdout: stdout carries the one summary line."""
    import json

    from kscale.output import write_json_atomic

    path = result.result_file()
    if path and Path(path).parent.is_dir():
        write_json_atomic(Path(path), json.loads(json.dumps(result.to_dict(), default=str)))
    return result


def _record_final(spec: JobSpec, result: StageResult) -> StageResult:
    """Stages without a shard pool (analyze, train) leave their final summary in ``<output>/_progress.json``
    too, so ``kscale status`` reports a finished run instead of "none yet"; the result goes to its file."""
    import json
    import time

    from kscale.output import write_json_atomic

    _write_result(result)
    out = Path(spec.output.path)
    if out.is_dir():
        write_json_atomic(out / "_progress.json", {
            "job": spec.name, "stage": spec.kind, "state": "failed" if result.failed else "succeeded",
            "summary": result.summary_line(), "result": json.loads(json.dumps(result.to_dict(), default=str)),
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return result
