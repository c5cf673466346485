"""``kscale submit job.yaml --target k8s``: render a KubeRay RayJob (or a RayCluster to reuse) and apply it.

``render_rayjob`` returns two objects: a ConfigMap holding the job YAML (mounted at ``/etc/kscale`` in
every pod) and a RayJob whose cluster has a head with ``num-cpus: 0`` (the driver and Ray's control
plane only) and one worker group sized from ``resources`` and ``cluster.k8s``. The RayJob sets
``backoffLimit: 0`` (a retry would start from scratch; kscale resumes
committed shards by itself when resubmitted), ``submissionMode: K8sJobMode`` (the submitter is a
Kubernetes Job whose logs outlive the cluster), ``shutdownAfterJobFinishes`` with a TTL, and the
deadlines. With ``cluster.k8s.reuse_cluster`` the RayJob selects an existing RayCluster
(``clusterSelector``; render one with ``render_raycluster``) and the spec travels inline in the runtime
environment, since no ConfigMap can be mounted into running pods.

``cluster.env`` values live only in a Kubernetes Secret named after the submission (``ID-env``), applied
through kubectl's stdin, referenced by the pods of the RayJob's cluster (``envFrom``) and deleted by
``kscale stop``. With ``reuse_cluster`` the running pods cannot read a new Secret and a runtime env would
show the values to every Jobs API user, so ``cluster.env`` is refused there (set it on the RayCluster,
whose pods read the Secret ``<cluster name>-env``).

Relative paths in the spec are resolved under ``cluster.k8s.output_mount`` (the PVC): the pods' view
of the project directory. ``check_manifest`` holds kscale's own checks for what the CRD leaves open
(the submissionMode enum, names, GPU limits, KubeRay's cross-field rules); ``validate_schema`` checks
against the CRD's OpenAPI schema, strictly (unknown fields are errors: the API server would drop them
silently).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import yaml

import kscale
from kscale.spec import SpecError
from kscale.targets import Target
from kscale.targets.checks import Finding
from kscale.spec.cluster import SUBMISSION_MODES, cluster_of
from kscale.targets.records import (Run, driver_command, kscale_home, record_dir, redact_env, save_submission, slug,
                                    submission_id)

SPEC_MOUNT = "/etc/kscale"
SPEC_ENV = "KSCALE_SPEC_YAML"
MAX_RAYJOB_NAME = 47      # KubeRay: RayCluster names <= 53, and a RayJob's cluster adds 6 characters
MAX_RAYCLUSTER_NAME = 53
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class K8sError(RuntimeError):
    """kubectl failed or the cluster lacks KubeRay; the message says what to do."""


# ----------------------------------------------------------------------------- rendering


def pod_paths_yaml(spec_path: str, mount: str) -> str:
    """The job YAML as the pods should read it: relative ``output``/``data``/``model`` paths under ``mount``."""
    raw = yaml.safe_load(Path(spec_path).read_text())
    for section in ("output", "data", "model"):
        sec = raw.get(section)
        p = sec.get("path") if isinstance(sec, dict) else None
        if isinstance(p, str) and not p.startswith(("/", "~", "debug:")) and (section != "model" or Path(p).exists()):
            sec["path"] = str(PurePosixPath(mount) / p)
    return yaml.safe_dump(redact_env(raw), sort_keys=False)


def env_secret_name(owner: str) -> str:
    """The Secret holding ``cluster.env`` for a submission (``owner`` = its id: two jobs of one name never share
    or overwrite one; created by ``kscale submit`` from stdin, deleted by ``kscale stop``), or, for a reusable
    RayCluster (``owner`` = the cluster's name), the one its pods read, which the user creates."""
    return f"{owner}-env"


def env_secret(spec: Any, sid: str) -> dict:
    """The Secret object for ``cluster.env``: applied through kubectl's stdin, never written to a manifest."""
    k = cluster_of(spec).k8s
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": env_secret_name(sid), "namespace": k.namespace, "labels": labels(spec, sid)},
            "stringData": dict(sorted(cluster_of(spec).env.items()))}


def _refuse_env_with_reuse(spec: Any) -> None:
    """A running RayCluster's pods read env from a Secret only when they start, and kscale never puts values in
    a runtime env (the Jobs API and dashboard show it): with ``reuse_cluster`` there is no safe way to deliver
    ``cluster.env``, so it is refused rather than dropped."""
    c = cluster_of(spec)
    if c.env and c.k8s.reuse_cluster is not None:
        raise SpecError([("cluster.env", f"cannot reach the pods of the running RayCluster "
                                         f"{c.k8s.reuse_cluster!r} (cluster.k8s.reuse_cluster): set these variables "
                                         f"({', '.join(sorted(c.env))}) on that cluster instead (the RayCluster that "
                                         f"`kscale render --target raycluster` writes reads them from the Secret "
                                         f"{env_secret_name(c.k8s.reuse_cluster)}) and remove cluster.env here, or "
                                         "drop reuse_cluster")])


def pod_output_path(spec: Any) -> str:
    p = spec.output.path
    return p if p.startswith(("/", "~")) else str(PurePosixPath(cluster_of(spec).k8s.output_mount) / p)


def labels(spec: Any, sid: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "kscale", "app.kubernetes.io/version": kscale.__version__,
            "kscale.io/job": slug(spec.name, 63), "kscale.io/submission": sid, **cluster_of(spec).k8s.labels}


def _volumes(spec: Any, sid: str | None) -> tuple[list[dict], list[dict]]:
    k = cluster_of(spec).k8s
    vols, mounts = [], []
    if sid is not None:
        vols.append({"name": "kscale-spec", "configMap": {"name": f"{sid}-spec"}})
        mounts.append({"name": "kscale-spec", "mountPath": SPEC_MOUNT, "readOnly": True})
    if k.output_pvc:
        vols.append({"name": "outputs", "persistentVolumeClaim": {"claimName": k.output_pvc}})
        mounts.append({"name": "outputs", "mountPath": k.output_mount})
    return vols, mounts


def _container(spec: Any, name: str, resources: dict, mounts: list[dict], secret: str) -> dict:
    k = cluster_of(spec).k8s
    c: dict[str, Any] = {"name": name, "image": k.image, "imagePullPolicy": k.image_pull_policy,
                         "resources": resources}
    if cluster_of(spec).env:  # values only in the Secret; the manifest names it
        c["envFrom"] = [{"secretRef": {"name": secret}}]
    if mounts:
        c["volumeMounts"] = mounts
    return c


def _pod_spec(spec: Any, container: dict, vols: list[dict], worker: bool) -> dict:
    k = cluster_of(spec).k8s
    pod: dict[str, Any] = {"containers": [container]}
    if vols:
        pod["volumes"] = vols
    if k.service_account:
        pod["serviceAccountName"] = k.service_account
    if k.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": s} for s in k.image_pull_secrets]
    if worker and k.node_selector:
        pod["nodeSelector"] = dict(k.node_selector)
    if worker and k.tolerations:
        pod["tolerations"] = list(k.tolerations)
    return pod


def worker_shape(spec: Any) -> tuple[int, int, str]:
    """(replicas, GPUs per pod, CPUs per pod): ``cluster.k8s`` where set, else one pod per worker."""
    k, r = cluster_of(spec).k8s, spec.resources
    replicas = k.worker_replicas or r.workers
    gpus = k.gpus_per_pod if k.gpus_per_pod is not None else math.ceil(r.gpus_per_worker)
    cpus = k.cpus_per_pod or str(math.ceil(r.cpus_per_worker) + 1)
    return replicas, gpus, cpus


def ray_cluster_spec(spec: Any, sid: str | None, name: str | None = None) -> dict:
    """The RayClusterSpec shared by a RayJob's own cluster (``sid``) and a reusable RayCluster (``name``); its
    pods read ``cluster.env`` from the Secret of that submission or cluster (:func:`env_secret_name`)."""
    secret = env_secret_name(sid or name or "")
    k = cluster_of(spec).k8s
    vols, mounts = _volumes(spec, sid)
    head_res = {"requests": {"cpu": k.head_cpus, "memory": k.head_memory},
                "limits": {"cpu": k.head_cpus, "memory": k.head_memory}}
    replicas, gpus, cpus = worker_shape(spec)
    limits: dict[str, Any] = {"cpu": cpus, "memory": k.memory_per_pod}
    if gpus:
        limits[k.gpu_resource] = gpus
    worker_res = {"requests": {"cpu": cpus, "memory": k.memory_per_pod}, "limits": limits}
    out: dict[str, Any] = {"rayVersion": k.ray_version or _local_ray_version(), "enableInTreeAutoscaling": False}
    if k.auth:
        out["authOptions"] = {"mode": "token"}
    out["headGroupSpec"] = {
        "rayStartParams": {"num-cpus": "0"},
        "template": {"spec": _pod_spec(spec, _container(spec, "ray-head", head_res, mounts, secret), vols, worker=False)},
    }
    out["workerGroupSpecs"] = [{
        "groupName": "gpu-workers" if gpus else "cpu-workers",
        "replicas": replicas, "minReplicas": replicas, "maxReplicas": replicas,
        "rayStartParams": {},
        "template": {"spec": _pod_spec(spec, _container(spec, "ray-worker", worker_res, mounts, secret), vols, worker=True)},
    }]
    return out


def _local_ray_version() -> str:
    import ray

    return ray.__version__


def _require_image(spec: Any) -> None:
    if not cluster_of(spec).k8s.image:
        raise SpecError([("cluster.k8s.image", "required for --target k8s: an image with kscale and Ray "
                                               "installed (e.g. built from rayproject/ray + pip install kscale)")])


def render_rayjob(spec: Any, spec_path: str, sid: str) -> list[dict]:
    """ConfigMap (the spec) + RayJob, or with ``reuse_cluster`` a RayJob alone selecting that cluster."""
    _require_image(spec)
    _refuse_env_with_reuse(spec)
    c, k = cluster_of(spec), cluster_of(spec).k8s
    meta = {"name": sid, "namespace": k.namespace, "labels": labels(spec, sid)}
    rec = str(record_dir(spec, pod_output_path(spec)))
    spec_yaml = pod_paths_yaml(spec_path, k.output_mount)
    reuse = k.reuse_cluster is not None
    spec_file = f"env:{SPEC_ENV}" if reuse else f"{SPEC_MOUNT}/job.yaml"
    env_vars = {"KSCALE_SUBMISSION_ID": sid, "PYTHONUNBUFFERED": "1"}  # cluster.env: the pods' Secret
    if reuse:
        env_vars[SPEC_ENV] = spec_yaml
    job: dict[str, Any] = {
        "entrypoint": shlex.join(driver_command(c.python or "python", spec_file, sid, "k8s", rec)),
        "jobId": sid,
        "submissionMode": k.submission_mode,
        "backoffLimit": 0,
        "runtimeEnvYAML": yaml.dump({"env_vars": env_vars}, Dumper=_ManifestDumper, sort_keys=True, width=4096),
        "shutdownAfterJobFinishes": not reuse,
        "ttlSecondsAfterFinished": 0 if reuse else k.ttl_seconds_after_finished,
    }
    if k.active_deadline_seconds is not None:
        job["activeDeadlineSeconds"] = k.active_deadline_seconds
    if k.pre_running_deadline_seconds is not None:
        job["preRunningDeadlineSeconds"] = k.pre_running_deadline_seconds
    if reuse:
        job["clusterSelector"] = {"ray.io/cluster": k.reuse_cluster}
        return [{"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": meta, "spec": job}]
    job["rayClusterSpec"] = ray_cluster_spec(spec, sid)
    cm = {"apiVersion": "v1", "kind": "ConfigMap",
          "metadata": {"name": f"{sid}-spec", "namespace": k.namespace, "labels": labels(spec, sid)},
          "data": {"job.yaml": spec_yaml}}
    return [cm, {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": meta, "spec": job}]


def render_raycluster(spec: Any, name: str | None = None) -> dict:
    """A long-lived RayCluster to submit many jobs to (``cluster.k8s.reuse_cluster: NAME``)."""
    _require_image(spec)
    k = cluster_of(spec).k8s
    name = name or k.reuse_cluster or slug(spec.name, MAX_RAYCLUSTER_NAME)
    meta = {"name": name, "namespace": k.namespace,
            "labels": {"app.kubernetes.io/name": "kscale", "app.kubernetes.io/version": kscale.__version__,
                       **k.labels}}
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": meta, "spec": ray_cluster_spec(spec, None, name)}


class _ManifestDumper(yaml.SafeDumper):
    """No anchors/aliases (pods share volume lists in Python, not in the manifest); multi-line strings as
    literal blocks, so the embedded job YAML reads like the original."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str_representer(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_ManifestDumper.add_representer(str, _str_representer)


def to_yaml(docs: list[dict]) -> str:
    return "---\n".join(yaml.dump(d, Dumper=_ManifestDumper, sort_keys=False, width=4096) for d in docs)


# ----------------------------------------------------------------------------- checks


def check_manifest(doc: dict, spec: Any | None = None) -> list[str]:
    """kscale's checks of a RayJob or RayCluster beyond the CRD schema; each problem names its field."""
    kind, meta, s = doc.get("kind"), doc.get("metadata") or {}, doc.get("spec") or {}
    out: list[str] = []
    name = str(meta.get("name", ""))
    limit = MAX_RAYJOB_NAME if kind == "RayJob" else MAX_RAYCLUSTER_NAME
    if not _DNS1035.match(name) or len(name) > limit:
        out.append(f"metadata.name: {name!r} must be a DNS-1035 label (a-z, 0-9, '-', starting with a letter) "
                   f"of at most {limit} characters")
    if kind == "RayJob":
        out += _check_rayjob(s)
        cluster = s.get("rayClusterSpec")
        prefix = "spec.rayClusterSpec"
    else:
        cluster, prefix = s, "spec"
    if cluster:
        out += _check_cluster(cluster, prefix, spec)
    return out


def _check_rayjob(s: dict) -> list[str]:
    out = []
    mode = s.get("submissionMode", "K8sJobMode")
    if mode not in SUBMISSION_MODES:
        out.append(f"spec.submissionMode: {mode!r} is not one of {', '.join(SUBMISSION_MODES)} (the CRD accepts any "
                   "string; KubeRay would fail the job later)")
    if s.get("backoffLimit", 0) != 0:
        out.append(f"spec.backoffLimit: {s['backoffLimit']} retries would rerun the job on a fresh cluster; use 0 "
                   "(resubmitting resumes committed shards)")
    if bool(s.get("rayClusterSpec")) == bool(s.get("clusterSelector")):
        out.append("spec: set exactly one of rayClusterSpec (a cluster per job) and clusterSelector (reuse one)")
    if not s.get("shutdownAfterJobFinishes", False) and s.get("ttlSecondsAfterFinished", 0) > 0:
        out.append("spec.ttlSecondsAfterFinished: needs shutdownAfterJobFinishes: true (KubeRay rejects it otherwise)")
    for key in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if key in s and s[key] <= 0:
            out.append(f"spec.{key}: must be a positive number of seconds, got {s[key]}")
    if mode == "InteractiveMode" and s.get("backoffLimit", 0) > 0:
        out.append("spec.backoffLimit: InteractiveMode does not support retries")
    if s.get("runtimeEnvYAML"):
        try:
            yaml.safe_load(s["runtimeEnvYAML"])
        except yaml.YAMLError as e:
            out.append(f"spec.runtimeEnvYAML: not valid YAML: {e}")
    if not str(s.get("entrypoint", "")).strip():
        out.append("spec.entrypoint: empty")
    return out


def _check_cluster(c: dict, prefix: str, spec: Any | None) -> list[str]:
    out = []
    head = c.get("headGroupSpec") or {}
    if str((head.get("rayStartParams") or {}).get("num-cpus")) != "0":
        out.append(f"{prefix}.headGroupSpec.rayStartParams.num-cpus: should be \"0\" so no worker lands on the head")
    gpu_name = cluster_of(spec).k8s.gpu_resource if spec is not None else "nvidia.com/gpu"
    total_gpus = 0
    for i, g in enumerate(c.get("workerGroupSpecs") or []):
        where = f"{prefix}.workerGroupSpecs[{i}]"
        if not _DNS1123_LABEL.match(str(g.get("groupName", ""))):
            out.append(f"{where}.groupName: {g.get('groupName')!r} is not a DNS-1123 label")
        for j, cont in enumerate(((g.get("template") or {}).get("spec") or {}).get("containers") or []):
            res = cont.get("resources") or {}
            lim, req = res.get("limits") or {}, res.get("requests") or {}
            cw = f"{where}.template.spec.containers[{j}].resources"
            if gpu_name in req and gpu_name not in lim:
                out.append(f"{cw}.limits: {gpu_name} is requested but has no limit (extended resources need limits)")
            elif gpu_name in req and str(req[gpu_name]) != str(lim[gpu_name]):
                out.append(f"{cw}: {gpu_name} request {req[gpu_name]} differs from its limit {lim[gpu_name]}")
            n = lim.get(gpu_name, 0)
            if not isinstance(n, int) and not str(n).isdigit():
                out.append(f"{cw}.limits.{gpu_name}: {n!r} must be a whole number of GPUs")
            elif j == 0:
                total_gpus += int(n) * int(g.get("replicas", g.get("minReplicas", 0)) or 0)
    if spec is not None:
        r = spec.resources
        need = r.workers * r.gpus_per_worker
        if need > total_gpus:
            out.append(f"{prefix}.workerGroupSpecs: {total_gpus:g} GPU(s) in all worker pods, but resources asks for "
                       f"{r.workers} workers x {r.gpus_per_worker:g} GPU = {need:g}")
    return out


def strict_schema(schema: Any) -> Any:
    """The CRD schema with unknown fields forbidden wherever it lists properties (and does not say to keep
    unknown fields): the API server prunes unknown fields silently, so a typo would vanish without a word."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=8)
def crd_schema(schema_dir: Path, kind: str) -> dict:
    """The v1 ``openAPIV3Schema`` of RayJob or RayCluster from a KubeRay CRD file (parsed once: ~1 MB)."""
    fname = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}[kind]
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((schema_dir / fname).read_text(), Loader=loader)
    for v in crd["spec"]["versions"]:
        if v["name"] == "v1":
            return v["schema"]["openAPIV3Schema"]
    raise K8sError(f"{schema_dir / fname}: no v1 version in the CRD")


@functools.lru_cache(maxsize=8)
def _validator(schema_dir: Path, kind: str, strict: bool) -> Any:
    import jsonschema

    schema = crd_schema(schema_dir, kind)
    return jsonschema.Draft7Validator(strict_schema(schema) if strict else schema)


def validate_schema(doc: dict, schema_dir: Path, strict: bool = True) -> list[str]:
    """Errors of ``doc`` against the CRD schema, each as ``path: message``."""
    errors = sorted(_validator(Path(schema_dir), doc["kind"], strict).iter_errors(doc),
                    key=lambda e: list(e.absolute_path))
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}" for e in errors]


# ----------------------------------------------------------------------------- kubectl


def kubectl(*args: str, timeout: float = 30, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["kubectl", *args], capture_output=True, text=True, timeout=timeout, input=stdin)


def cluster_reachable() -> tuple[bool, str]:
    """(True, context) when kubectl is installed and its current context answers with KubeRay's CRD."""
    if shutil.which("kubectl") is None:
        return False, "kubectl is not installed"
    try:
        p = kubectl("get", "crd", "rayjobs.ray.io", "--request-timeout=5s", timeout=10)
    except subprocess.TimeoutExpired:
        return False, "the Kubernetes API did not answer within 10 s"
    if p.returncode != 0:
        err = (p.stderr.strip().splitlines() or ["no error text"])[-1]
        if "NotFound" in err or "not found" in err:
            return False, "KubeRay is not installed (no rayjobs.ray.io CRD): helm install kuberay-operator kuberay/kuberay-operator"
        return False, f"no usable Kubernetes cluster ({err})"
    ctx = kubectl("config", "current-context", timeout=10).stdout.strip()
    return True, ctx or "(no context name)"


def rayjob_status(name: str, namespace: str) -> dict | None:
    p = kubectl("get", "rayjob", name, "-n", namespace, "-o", "json", "--request-timeout=10s")
    if p.returncode != 0:
        return None
    return json.loads(p.stdout).get("status") or {}


def submit(spec_path: str, spec: Any, force: bool, dry_run: bool, say: Callable[[str], None] = print) -> int:
    """Render; print (dry run), apply (kubectl and a cluster with KubeRay), or write the manifest for the user."""
    sid = submission_id(spec, force)
    docs = render_rayjob(spec, spec_path, sid)
    problems = [p for d in docs if d["kind"] == "RayJob" for p in check_manifest(d, spec)]
    if problems:
        raise SpecError([("cluster.k8s", p) for p in problems], spec_path)
    text = to_yaml(docs)
    if dry_run:
        say(text.rstrip("\n"))
        return 0
    ns = cluster_of(spec).k8s.namespace
    manifest = kscale_home() / "manifests" / f"{sid}.yaml"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(text)
    ok, why = cluster_reachable()
    if not ok:
        say(f"kscale: not applied: {why}. Manifest written to {manifest}; apply it with `kubectl apply -f {manifest}`")
        return 0
    existing = rayjob_status(sid, ns)
    if existing is not None:
        say(f"kscale: RayJob {ns}/{sid} already exists ({existing.get('jobDeploymentStatus', '?')}, job "
            f"{existing.get('jobStatus', '?')}); attached (use --force for a new run)")
        return 0
    if cluster_of(spec).env:
        p = kubectl("apply", "-f", "-", stdin=json.dumps(env_secret(spec, sid)))
        if p.returncode != 0:
            raise K8sError(f"creating Secret {ns}/{env_secret_name(sid)} for cluster.env failed: {p.stderr.strip()}")
    p = kubectl("apply", "-f", str(manifest))
    if p.returncode != 0:
        raise K8sError(f"kubectl apply -f {manifest} failed: {p.stderr.strip()}")
    save_submission({"id": sid, "target": "k8s", "namespace": ns, "manifest": str(manifest),
                     "spec": str(Path(spec_path).absolute()), "output": pod_output_path(spec)})
    say(f"kscale: applied RayJob {ns}/{sid} ({why}); `kscale logs -f {sid}` follows the submitter's log")
    return 0


# ----------------------------------------------------------------------------- preflight (kscale doctor --target k8s)


def kuberay_schema_dir() -> Path | None:
    env = os.environ.get("KSCALE_KUBERAY_SCHEMAS")
    candidates = [Path(env)] if env else []
    repo = Path(__file__).resolve().parents[2]
    candidates.append(repo / "cluster" / "k8s" / "crds")  # vendored with the source tree
    candidates.append(repo.parent / "shared" / "schemas" / "kuberay-v1")
    return next((c for c in candidates if (c / "ray.io_rayjobs.yaml").is_file()), None)


def check_k8s(spec: Any | None, spec_path: str | None) -> list[Finding]:
    ok, why = cluster_reachable()
    out = [Finding("k8s", "ok" if ok else "warn", f"kubectl context {why}" if ok else why,
                   "" if ok else "kscale will write the manifest for you to apply elsewhere")]
    if spec is None or spec_path is None:
        return out
    try:
        docs = render_rayjob(spec, spec_path, "kscale-doctor-check")
    except SpecError as e:
        return out + [Finding("manifest", "fail", "; ".join(f"{f}: {m}" for f, m in e.problems), "set it in the spec")]
    problems = [p for d in docs if d["kind"] == "RayJob" for p in check_manifest(d, spec)]
    schema_dir = kuberay_schema_dir()
    try:
        import jsonschema  # noqa: F401  (optional: pip install jsonschema)
    except ImportError:
        schema_dir = None
    if schema_dir is not None:
        problems += [p for d in docs if d["kind"] == "RayJob" for p in validate_schema(d, schema_dir)]
    if problems:
        return out + [Finding("manifest", "fail", "; ".join(problems), "fix the cluster.k8s section")]
    checked = "kscale's checks and the KubeRay CRD schema" if schema_dir else "kscale's checks"
    return out + [Finding("manifest", "ok", f"rendered RayJob passes {checked}")] + check_output_volume(spec)


def check_output_volume(spec: Any) -> list[Finding]:
    """Outputs must land on a volume that outlives the pods: ``cluster.k8s.output_pvc`` mounted at
    ``output_mount``, with ``output.path`` (and the record dir) under it."""
    k = cluster_of(spec).k8s
    out_path = pod_output_path(spec)
    if k.output_pvc is None:
        return [Finding("volume", "warn", f"no cluster.k8s.output_pvc: {out_path} is written inside the pods and is "
                                          "lost when the RayJob's cluster is deleted",
                        "set cluster.k8s.output_pvc (a ReadWriteMany PVC) and keep output.path under output_mount")]
    mount = PurePosixPath(k.output_mount)
    outside = [str(p) for p in (out_path, str(record_dir(spec, out_path)))
               if mount != PurePosixPath(p) and mount not in PurePosixPath(p).parents]
    if outside:
        return [Finding("volume", "warn", f"{', '.join(outside)} not under the PVC mount {k.output_mount}: lost with "
                                          "the pods", "use a relative output.path or one under output_mount")]
    return [Finding("volume", "ok", f"outputs on PVC {k.output_pvc} at {k.output_mount}")]



class K8sTarget(Target):
    """KubeRay: a RayJob (plus the spec's ConfigMap) per submission, watched and stopped with kubectl."""

    name = "k8s"
    errors = (K8sError,)

    def submit(self, spec_path: str, spec: Any, address: str | None, dry_run: bool, force: bool,
               say: Callable[[str], None], err: Callable[[str], None]) -> int:
        return submit(spec_path, spec, force, dry_run, say)

    def status(self, run: Run, address: str | None) -> dict | None:
        if not run.record:
            return None
        st = rayjob_status(run.sid, run.record["namespace"])
        return None if st is None else {"status": st.get("jobStatus") or st.get("jobDeploymentStatus"),
                                        "deployment": st.get("jobDeploymentStatus"), "message": st.get("message")}

    def logs(self, run: Run, address: str | None, follow: bool, write: Callable[[str], None],
             err: Callable[[str], None]) -> int | None:
        if not run.record:
            return None
        cmd = ["kubectl", "logs", "-n", run.record["namespace"], f"job/{run.sid}"] + (["-f"] if follow else [])
        return subprocess.call(cmd)

    def stop(self, run: Run, address: str | None, say: Callable[[str], None]) -> bool:
        if not run.record:
            return False
        ns = run.record["namespace"]
        for kind, name in (("rayjob", run.sid), ("configmap", f"{run.sid}-spec"), ("secret", env_secret_name(run.sid))):
            p = kubectl("delete", kind, name, "-n", ns, "--ignore-not-found")
            say(p.stdout.strip() or p.stderr.strip())
        return True

    def render(self, spec: Any, spec_path: str, sid: str) -> str:
        return to_yaml(render_rayjob(spec, spec_path, sid))

    def render_cluster(self, spec: Any) -> str:
        """A standalone RayCluster for hand use (``kscale render --target raycluster``)."""
        return to_yaml([render_raycluster(spec)])

    def checks(self, spec: Any | None, spec_path: str | None, address: str | None) -> list[Finding]:
        return check_k8s(spec, spec_path)
