"""Submitting to a running Ray cluster through the Ray Jobs API, and the submission ids all targets share.

``kscale submit job.yaml --address http://HEAD:8265`` ships a *minimal* runtime environment — a
working dir holding only ``job.yaml`` (the spec with its paths made absolute, ``cluster.env`` values
redacted) and kscale's own variables (``cluster.env`` reaches the job through a 0600 file: ``runtime_env``) —
and runs the driver wrapper of :mod:`kscale.targets.records` as the entrypoint; the wrapper runs
``kscale submit job.yaml`` on the head, where Ray has set ``RAY_ADDRESS`` to the cluster, so the lead's
runner joins the cluster instead of starting one.

The submission id is derived from the spec's fingerprint and kscale's version (``records.submission_id``):
submitting the same job again finds the first submission and attaches to it; ``--force`` adds a
time suffix for a new run (which resumes committed shards). Every submission, whatever its target,
is recorded in ``$KSCALE_HOME/submissions/ID.json`` (default ``~/.kscale``) so ``kscale status ID``,
``logs`` and ``stop`` know where to look.

Ray's client reads ``RAY_ADDRESS``/``RAY_API_SERVER_ADDRESS`` *over* the address it is given; kscale
masks them while connecting so ``--address`` means what it says. Token auth: the token comes from
``RAY_AUTH_TOKEN``, the file at ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token`` and is sent as a bearer
header whatever ``RAY_AUTH_MODE`` says.
"""

from __future__ import annotations

import json
import os
import shlex
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator


import kscale
from kscale.targets import Target
from kscale.targets.checks import Finding, check_versions
from kscale.spec.cluster import cluster_of
from kscale.private import ENV_FILE_VAR, private_dir, write_env_file
from kscale.targets.records import (Run, absolute_output, absolute_spec_yaml, driver_command, env_file, record_dir,
                                    save_submission, submission_id)

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def status_name(status: Any) -> str:
    """``JobStatus.SUCCEEDED`` -> ``"SUCCEEDED"`` (Ray's enum, or a plain string)."""
    return str(getattr(status, "value", status))


class JobsError(RuntimeError):
    """A Jobs API call failed; the message says what to fix."""


# ----------------------------------------------------------------------------- connecting


def resolve_address(address: str | None) -> str:
    """``--address``, else ``RAY_API_SERVER_ADDRESS``, else an http(s) ``RAY_ADDRESS`` (a bare host:port
    RAY_ADDRESS is a GCS address for drivers, not a Jobs API endpoint)."""
    api = os.environ.get("RAY_API_SERVER_ADDRESS")
    env = os.environ.get("RAY_ADDRESS", "")
    chosen = address or api or (env if env.startswith(("http://", "https://")) else None)
    if not chosen:
        raise JobsError("no Ray cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS "
                        "(tunnel first if the dashboard listens on 127.0.0.1: ssh -L 8265:127.0.0.1:8265 HEAD)")
    return (chosen if "://" in chosen else f"http://{chosen}").rstrip("/")


def read_token() -> str | None:
    """The Ray auth token this machine would use: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    for p in (os.environ.get("RAY_AUTH_TOKEN_PATH"), Path.home() / ".ray" / "auth_token"):
        if p and Path(p).is_file():
            return Path(p).read_text().strip() or None
    return None


@contextmanager
def _address_env_masked() -> Iterator[None]:
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str | None) -> tuple[Any, str]:
    """A ``JobSubmissionClient`` for the cluster (auth header set) and the address it talks to."""
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    token = read_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with _address_env_masked():
            return JobSubmissionClient(url, headers=headers), url
    except ConnectionError as e:
        raise JobsError(f"cannot reach the Ray Jobs API at {url} ({e}); is the head running and its "
                        "dashboard port reachable? (`kscale doctor --address` checks)") from e
    except Exception as e:  # ray.exceptions.AuthenticationError and friends
        raise _auth_or(e, url) from e


def _auth_or(e: Exception, url: str) -> Exception:
    if type(e).__name__ == "AuthenticationError":
        have = "the token this machine has was refused" if read_token() else "this machine has no token"
        return JobsError(f"Ray at {url} requires token authentication and {have}: copy the cluster's token "
                         "(`ray get-auth-token` on the head) into RAY_AUTH_TOKEN or ~/.ray/auth_token")
    return e


def job_info(client: Any, sid: str) -> Any | None:
    """The Jobs API's JobDetails for ``sid``, or None if the cluster has no such submission."""
    try:
        return client.get_job_info(sid)
    except RuntimeError as e:
        if "does not exist" in str(e) or "404" in str(e):
            return None
        raise


# ----------------------------------------------------------------------------- submit / attach


@dataclass(frozen=True)
class Submitted:
    submission_id: str
    address: str
    attached: bool  # True: the same job was already there and we attached to it
    status: str


def runtime_env(spec: Any, package_dir: str, sid: str, rec_dir: str) -> dict:
    """Only the spec and kscale's own variables: kscale itself must be installed on the cluster.

    ``cluster.env`` values never enter the runtime env (anyone with the Jobs API or the dashboard reads it):
    ``submit`` writes them to the 0600 file ``<record dir>/ID.env`` (on the filesystem the cluster shares
    with this machine, like the outputs), the runtime env names that path, the driver wrapper reads it
    (``records.run_driver``) and every worker does too, through Ray's ``worker_process_setup_hook``
    (:func:`kscale.private.apply_env_file`)."""
    env_vars = {"KSCALE_SUBMISSION_ID": sid, "PYTHONUNBUFFERED": "1"}
    out: dict[str, Any] = {"working_dir": package_dir, "env_vars": env_vars}
    if cluster_of(spec).env:
        env_vars[ENV_FILE_VAR] = str(env_file(Path(rec_dir), sid))
        out["worker_process_setup_hook"] = "kscale.private.apply_env_file"
    return out


def submit(spec_path: str, spec: Any, address: str | None, force: bool,
           say: Callable[[str], None] = print) -> Submitted:
    """Submit the job, or attach to the submission of the same spec and code that is already there."""
    client, url = connect(address)
    sid = submission_id(spec, force)
    info = job_info(client, sid)
    if info is not None:
        return Submitted(sid, url, True, status_name(info.status))
    rec = str(record_dir(spec, absolute_output(spec)))
    python = cluster_of(spec).python or "python"
    entrypoint = shlex.join(driver_command(python, "job.yaml", sid, "ray", rec))
    if cluster_of(spec).env:
        private_dir(rec)
        write_env_file(env_file(Path(rec), sid), cluster_of(spec).env)
    with tempfile.TemporaryDirectory(prefix="kscale-pkg-") as pkg:
        Path(pkg, "job.yaml").write_text(absolute_spec_yaml(spec_path))
        try:
            client.submit_job(entrypoint=entrypoint, submission_id=sid, runtime_env=runtime_env(spec, pkg, sid, rec),
                              metadata={"kscale_job": spec.name, "kscale_fingerprint": spec.fingerprint(),
                                        "kscale_version": kscale.__version__})
        except RuntimeError as e:
            if "already exists" not in str(e):  # lost a race with an identical submit: attach to it
                raise
            return Submitted(sid, url, True, status_name(client.get_job_status(sid)))
    save_submission({"id": sid, "target": "ray", "address": url, "spec": str(Path(spec_path).absolute()),
                     "output": absolute_output(spec), "record_dir": rec})
    return Submitted(sid, url, False, "PENDING")


# ----------------------------------------------------------------------------- watch / stop


def follow_logs(client: Any, sid: str, write: Callable[[str], None], follow: bool = True, poll_s: float = 1.0,
                give_up_s: float = 600.0) -> str:
    """Print the driver's log; with ``follow``, keep polling (and reconnecting after errors) until the job
    is in a terminal state and its log is complete. Returns the last status seen.

    Polling ``get_job_logs`` (rather than the websocket tail) survives dashboard restarts and proxies
    that drop idle connections: the offset of what was printed is kept on this side."""
    printed, failing_since = 0, None
    while True:
        try:
            status = status_name(client.get_job_status(sid))  # status before logs: a terminal status means
            logs = client.get_job_logs(sid)             # the logs fetched after it are complete
            failing_since = None
        except Exception as e:  # connection reset, dashboard restarting, proxy timeout
            if not follow:
                raise
            failing_since = failing_since or time.monotonic()
            if time.monotonic() - failing_since > give_up_s:
                raise JobsError(f"lost the Jobs API for {give_up_s:.0f} s while following {sid}: {e}") from e
            time.sleep(min(5.0, poll_s * 2))
            continue
        if len(logs) > printed:
            write(logs[printed:])
            printed = len(logs)
        if not follow or status in TERMINAL:
            return status
        time.sleep(poll_s)


def stop(client: Any, sid: str, wait_s: float = 30.0) -> str:
    """Ask Ray to stop the job (SIGTERM to the driver, then SIGKILL) and wait for a terminal state."""
    client.stop_job(sid)
    deadline = time.monotonic() + wait_s
    status = status_name(client.get_job_status(sid))
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
        status = status_name(client.get_job_status(sid))
    return status


# ----------------------------------------------------------------------------- preflight (kscale doctor --address)


def check_auth(url: str) -> list[Finding]:
    """Does the Jobs API need a token, and is ours accepted?"""
    def get(token: str | None) -> int:
        req = urllib.request.Request(f"{url}/api/jobs/")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    try:
        anonymous = get(None)
    except OSError as e:
        return [Finding("reach", "fail", f"no answer from {url}: {e}",
                        "start the head, check the address and port, or tunnel: ssh -N -L 8265:127.0.0.1:8265 HEAD")]
    if anonymous == 200:
        return [Finding("auth", "warn", f"{url} accepts requests without a token",
                        "start the cluster with RAY_AUTH_MODE=token (anyone who reaches the port can run code)")]
    token = read_token()
    if token is None:
        return [Finding("auth", "fail", f"{url} requires a token and this machine has none",
                        "copy the token (`ray get-auth-token` on the head) into RAY_AUTH_TOKEN or ~/.ray/auth_token")]
    code = get(token)
    if code == 200:
        return [Finding("auth", "ok", f"{url} requires a token; ours is accepted")]
    return [Finding("auth", "fail", f"{url} refused our token (HTTP {code})",
                    "the token in RAY_AUTH_TOKEN / ~/.ray/auth_token is not this cluster's: `ray get-auth-token` on the head")]


def check_cluster(spec: Any | None, address: str | None) -> list[Finding]:
    """Reach, auth, then a probe job reporting nodes, per-actor GPUs and versions on the cluster."""
    try:
        url = resolve_address(address)
    except JobsError as e:
        return [Finding("reach", "fail", str(e))]
    found = check_auth(url)
    if any(f.level == "fail" for f in found):
        return found
    r = spec.resources if spec is not None else None
    workers, gpw, cpw = (r.workers, r.gpus_per_worker, r.cpus_per_worker) if r else (1, 0.0, 1.0)
    python = (cluster_of(spec).python if spec is not None else None) or "python"
    cmd = [python, "-m", "kscale.doctor", "probe", "--workers", str(workers), "--gpus-per-worker", str(gpw),
           "--cpus-per-worker", str(cpw)]
    try:
        client, _ = connect(url)
        sid = client.submit_job(entrypoint=shlex.join(cmd), runtime_env={})  # cluster.env: jobs only, see runtime_env
        status = follow_logs(client, sid, lambda s: None, follow=True, poll_s=0.5, give_up_s=60)
        text = client.get_job_logs(sid)
    except (JobsError, RuntimeError, OSError) as e:
        return found + [Finding("probe", "fail", f"probe job failed to run: {e}")]
    line = next((ln for ln in reversed(text.splitlines()) if ln.startswith("KSCALE_PROBE ")), None)
    if status != "SUCCEEDED" or line is None:
        tail = " | ".join(text.strip().splitlines()[-3:])
        return found + [Finding("probe", "fail", f"probe job {status}: {tail}",
                                f"is kscale installed for `{python}` on the head? set cluster.python, or "
                                "pip install kscale in the cluster's environment")]
    found += _judge_probe(json.loads(line[len("KSCALE_PROBE "):]), workers, gpw)
    if spec is not None and cluster_of(spec).env:
        found.append(Finding("env", "info", f"cluster.env ({', '.join(sorted(cluster_of(spec).env))}) was not given to "
                                            "the probe: its values reach jobs only through the run's 0600 env file"))
    return found


def _judge_probe(p: dict, workers: int, gpw: float) -> list[Finding]:
    out = [Finding("nodes", "ok", "; ".join(f"{n['host']}: {n['cpus']:g} CPU, {n['gpus']:g} GPU" for n in p["nodes"]))]
    if p["unplaced"]:
        total = sum(n["gpus"] for n in p["nodes"])
        out.append(Finding("actors", "fail", f"{p['unplaced']} of {workers} worker actors could not be placed "
                                             f"(cluster has {total:g} GPU in all, the job needs {workers * gpw:g})",
                           "add GPU nodes, or lower resources.workers / gpus_per_worker"))
    blind = [a for a in p["actors"] if gpw > 0 and a["torch_gpus"] < max(1, int(gpw))]
    if blind:
        out.append(Finding("actors", "fail", f"{len(blind)} actor(s) see no GPU in torch despite num_gpus={gpw:g} "
                                             f"(e.g. {blind[0]})",
                           "CUDA driver/toolkit mismatch on that node, or a torch CPU build: check nvidia-smi and "
                           "torch.version.cuda there"))
    elif p["actors"]:
        seen = ", ".join(f"{a['host']}[{a['cuda_visible_devices'] or '-'}]" for a in p["actors"])
        out.append(Finding("actors", "ok", f"{len(p['actors'])} actor(s) placed; GPUs they see: {seen}"))
    return out + check_versions(p["versions"], "on the cluster")



class RayJobsTarget(Target):
    """A running Ray cluster, through its Jobs API (``--address`` or an http(s) ``RAY_ADDRESS``)."""

    name = "ray"
    errors = (JobsError,)

    def submit(self, spec_path: str, spec: Any, address: str | None, dry_run: bool, force: bool,
               say: Callable[[str], None], err: Callable[[str], None]) -> int:
        sid = submission_id(spec, force)
        if dry_run:
            rec = str(record_dir(spec, absolute_output(spec)))
            say(f"kscale: would submit {sid} to {resolve_address(address)} with runtime env "
                f"{json.dumps(runtime_env(spec, '<dir with job.yaml>', sid, rec))}")
            say(absolute_spec_yaml(spec_path).rstrip("\n"))
            return 0
        t0 = time.monotonic()
        r = submit(spec_path, spec, address, force, say)
        if not r.attached:
            say(f"kscale: submitted {r.submission_id} to {r.address} in {time.monotonic() - t0:.1f} s")
            say(f"kscale: follow with `kscale logs -f {r.submission_id} --address {r.address}`")
            return 0
        if r.status in ("FAILED", "STOPPED"):
            err(f"kscale: {r.submission_id} was submitted before and ended {r.status}; `kscale submit --force` "
                "starts a new run (committed shards are kept and skipped)")
            return 1
        say(f"kscale: {r.submission_id} is already on {r.address} ({r.status}); attached instead of submitting a "
            f"duplicate (--force for a new run). Follow with `kscale logs -f {r.submission_id}`")
        return 0

    def _client(self, run: Run, address: str | None) -> tuple[Any, str]:
        return connect(address or (run.record or {}).get("address"))

    def status(self, run: Run, address: str | None) -> dict | None:
        if not run.sid:
            return None
        client, url = self._client(run, address)
        info = job_info(client, run.sid)
        return None if info is None else {"status": status_name(info.status), "message": info.message, "address": url}

    def logs(self, run: Run, address: str | None, follow: bool, write: Callable[[str], None],
             err: Callable[[str], None]) -> int | None:
        if not run.sid:
            return None
        client, _ = self._client(run, address)
        if job_info(client, run.sid) is None:
            return None
        final = follow_logs(client, run.sid, write, follow=follow)
        return 0 if final in ("SUCCEEDED", "RUNNING", "PENDING") else 1

    def stop(self, run: Run, address: str | None, say: Callable[[str], None]) -> bool:
        if not run.sid:
            return False
        client, url = self._client(run, address)
        say(f"kscale: {run.sid} on {url}: {stop(client, run.sid)}")
        return True

    def checks(self, spec: Any | None, spec_path: str | None, address: str | None) -> list[Finding]:
        return check_cluster(spec, address)
