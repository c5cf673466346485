"""Submitting to a running Ray cluster through the Ray Jobs API, and the submission ids all targets share.

``kscale submit job.yaml --address http://HEAD:8265`` ships a *minimal* runtime environment — a
working dir holding only ``job.yaml`` (the spec with its paths made absolute) plus ``cluster.env`` —
and runs ``kscale.executors.progress_files``' driver wrapper as the entrypoint; the wrapper runs
``kscale submit job.yaml`` on the head, where Ray has set ``RAY_ADDRESS`` to the cluster, so the lead's
runner joins the cluster instead of starting one.

The submission id is derived from the spec's fingerprint and kscale's version (``submission_id``):
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

import hashlib
import json
import os
import re
import shlex
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

import kscale
from kscale.executors.cluster_config import cluster_of
from kscale.executors.progress_files import driver_command, record_dir

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def status_name(status: Any) -> str:
    """``JobStatus.SUCCEEDED`` -> ``"SUCCEEDED"`` (Ray's enum, or a plain string)."""
    return str(getattr(status, "value", status))


class JobsError(RuntimeError):
    """A Jobs API call failed; the message says what to fix."""


# ----------------------------------------------------------------------------- ids and the local registry


def slug(text: str, limit: int = 16) -> str:
    """Lowercase letters, digits and dashes, starting with a letter: safe for Ray, Slurm and DNS-1035."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-")
    if not s or not s[0].isalpha():
        s = f"j-{s}"[:limit].strip("-")
    return s


def submission_id(spec: Any, force: bool = False) -> str:
    """``kscale-<name>-<hash>[-f<time>]``, at most 44 characters (a RayJob name may have 47). The hash covers
    the spec's fingerprint, kscale's version and the absolute output path (the same YAML submitted from
    another directory writes elsewhere, so it is another job)."""
    key = f"{spec.fingerprint()}:{kscale.__version__}:{Path(spec.output.path).expanduser().absolute()}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    sid = f"kscale-{slug(spec.name)}-{digest}"
    return f"{sid}-f{int(time.time()):x}" if force else sid


def kscale_home() -> Path:
    return Path(os.environ.get("KSCALE_HOME") or Path.home() / ".kscale")


def save_submission(record: dict) -> Path:
    """Remember a submission (id, target, address / Slurm job id / namespace, paths) on this machine."""
    path = kscale_home() / "submissions" / f"{record['id']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**record, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1) + "\n")
    return path


def load_submission(sid: str) -> dict | None:
    try:
        return json.loads((kscale_home() / "submissions" / f"{sid}.json").read_text())
    except (OSError, ValueError):
        return None


def list_submissions(limit: int = 20) -> list[dict]:
    """The most recent submissions recorded on this machine, newest first."""
    d = kscale_home() / "submissions"
    files = sorted(d.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True) if d.is_dir() else []
    out = []
    for f in files[:limit]:
        try:
            out.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            continue
    return out


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


def absolute_spec_yaml(spec_path: str, cwd: str | None = None) -> str:
    """The job YAML with ``output.path``, ``data.path`` and an existing local ``model.path`` made absolute,
    so the driver (whose working dir is a temporary package on the head) writes where the user meant."""
    base = Path(cwd or os.getcwd())
    raw = yaml.safe_load(Path(spec_path).read_text())

    def fix(section: str, must_exist: bool) -> None:
        sec = raw.get(section)
        p = sec.get("path") if isinstance(sec, dict) else None
        if isinstance(p, str) and not p.startswith("debug:") and not Path(p).expanduser().is_absolute():
            if not must_exist or (base / p).exists():
                sec["path"] = str((base / p).resolve())

    fix("output", False)
    fix("data", False)
    fix("model", True)
    return yaml.safe_dump(raw, sort_keys=False)


def runtime_env(spec: Any, package_dir: str, sid: str) -> dict:
    """Only the spec and environment variables: kscale itself must be installed on the cluster."""
    return {"working_dir": package_dir,
            "env_vars": {**cluster_of(spec).env, "KSCALE_SUBMISSION_ID": sid, "PYTHONUNBUFFERED": "1"}}


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
    with tempfile.TemporaryDirectory(prefix="kscale-pkg-") as pkg:
        Path(pkg, "job.yaml").write_text(absolute_spec_yaml(spec_path))
        try:
            client.submit_job(entrypoint=entrypoint, submission_id=sid, runtime_env=runtime_env(spec, pkg, sid),
                              metadata={"kscale_job": spec.name, "kscale_fingerprint": spec.fingerprint(),
                                        "kscale_version": kscale.__version__})
        except RuntimeError as e:
            if "already exists" not in str(e):  # lost a race with an identical submit: attach to it
                raise
            return Submitted(sid, url, True, status_name(client.get_job_status(sid)))
    save_submission({"id": sid, "target": "ray", "address": url, "spec": str(Path(spec_path).absolute()),
                     "output": absolute_output(spec), "record_dir": rec})
    return Submitted(sid, url, False, "PENDING")


def absolute_output(spec: Any) -> str:
    return str(Path(spec.output.path).expanduser().absolute())


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
