"""The ``cluster:`` section of a job spec: where and how ``kscale submit --target ...`` runs a job.

The same job YAML runs on every target; only ``--target``/``--address`` on the command line changes.
This section holds what each target needs beyond ``resources`` (which stays the source of truth for
workers, GPUs and CPUs per worker): Slurm's partition and time, the Kubernetes image and namespace,
and the Ray ports and dashboard host used when kscale starts Ray itself (Slurm).

``kscale.spec.load_spec`` builds ``ClusterConfig`` from the YAML (unknown keys rejected, each problem
named by its dotted field); jobs without a ``cluster:`` section get ``cluster_of(spec)`` defaults.
Checks that only matter for one target (a Kubernetes image is required, for example) run when that
target renders (``kscale.targets.slurm`` / ``kscale.targets.k8s``), not at load time, so a job
written for Slurm still loads on a laptop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from kscale.spec.fields import doc

# Ray picks worker ports from 10002-19999 by default: every fixed port kscale chooses stays outside.
RAY_WORKER_PORTS = (10002, 19999)
PORT_BLOCK = 10  # ports reserved per job
_SLURM_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$|^\d+-\d+$")
_MEM = re.compile(r"^\d+[KMGT]?$")
_K8S_QUANTITY = re.compile(r"^\d+(\.\d+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$")
# Values that land in a shell script (#SBATCH lines, srun options) unquoted: one word of a safe character set.
_SHELL_SAFE = re.compile(r"^[A-Za-z0-9_.,:+=@/%-]+$")
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")


@dataclass(frozen=True, kw_only=True, slots=True)
class RayConfig:
    dashboard_host: str = doc("Interface the Ray dashboard listens on when kscale starts Ray. 127.0.0.1 "
                              "keeps it private (reach it with the printed `ssh -L` line).", "127.0.0.1")
    port_base: int | None = doc(
        "First of 10 consecutive ports (GCS, dashboard, client, node manager, object manager, agent, metrics, "
        "runtime-env agent, dask) for a kscale-started Ray's head node (Slurm's other nodes take free ports). "
        "None: 20000 + 10 x (Slurm job id mod 4000), so jobs sharing a node never collide. Must stay outside "
        "Ray's worker range 10002-19999.", None)
    temp_dir: str = doc("Node-local base directory for the per-job Ray temp dir (keep it short: Ray's "
                        "socket paths must fit in 107 bytes).", "/tmp")
    node_wait_s: int = doc("Seconds to wait for every node of the allocation to join before giving up.", 300,
                           ge=1)
    object_store_gb: float | None = doc("Object store size per node in GB (None: Ray's default, 30% of RAM).",
                                        None)

    def validate(self) -> list[tuple[str, str]]:
        out = []
        if self.port_base is not None:
            lo, hi = self.port_base, self.port_base + PORT_BLOCK - 1
            if lo < 1024 or hi > 65535:
                out.append(("port_base", f"ports {lo}-{hi} must lie within 1024-65535"))
            elif not (hi < RAY_WORKER_PORTS[0] or lo > RAY_WORKER_PORTS[1]):
                out.append(("port_base", f"ports {lo}-{hi} overlap Ray's worker port range "
                                         f"{RAY_WORKER_PORTS[0]}-{RAY_WORKER_PORTS[1]}; use 20000 or above"))
        if len(self.temp_dir) > 40:
            out.append(("temp_dir", f"{self.temp_dir!r} is too long for Ray's socket paths (keep it under 40 "
                                    "characters, e.g. /tmp)"))
        return out


@dataclass(frozen=True, kw_only=True, slots=True)
class SlurmConfig:
    partition: str | None = doc("Partition (`#SBATCH --partition`); None: the cluster's default.", None)
    account: str | None = doc("Account to charge (`--account`).", None)
    qos: str | None = doc("Quality of service (`--qos`).", None)
    time: str = doc("Wall-clock limit, Slurm syntax (`HH:MM:SS`, `D-HH:MM:SS`).", "01:00:00")
    nodes: int = doc("Nodes in the allocation; Ray's head runs on the first.", 1, ge=1)
    gpus_per_node: int | None = doc("GPUs per node. None: enough for resources.workers x gpus_per_worker "
                                    "spread over the nodes.", None, ge=0)
    gpu_type: str | None = doc("GPU type for `--gpus-per-node=TYPE:N` (e.g. a100).", None)
    cpus_per_node: int | None = doc("CPUs per node (`--cpus-per-task`, one task per node). None: the workers' "
                                    "CPUs on that node plus one for the driver and Ray.", None, ge=1)
    mem: str | None = doc("Memory per node (`--mem`, e.g. 64G); None: the partition's default.", None)
    exclusive: bool = doc("Ask for whole nodes (`--exclusive`).", False)
    container_image: str | None = doc("Run Ray and the driver in this image through pyxis/enroot "
                                      "(`srun --container-image`).", None)
    container_mounts: list[str] = doc("Mounts for the container (`SRC:DST`); include the output path.",
                                      factory=list)
    modules: list[str] = doc("Environment modules to load on every node (`module load ...`).", factory=list)
    setup: list[str] = doc("Shell lines run on every node before Ray starts (e.g. `source venv/bin/activate`).",
                           factory=list)
    sbatch_args: list[str] = doc("Extra sbatch options, one per item (e.g. `--constraint=h100`).", factory=list)
    grace_s: int = doc("Seconds before the time limit at which Slurm signals the driver so it can stop "
                       "cleanly (committed shards are kept; resubmit to resume).", 120, ge=0)

    def validate(self) -> list[tuple[str, str]]:
        out = []
        if not _SLURM_TIME.match(self.time):
            out.append(("time", f"{self.time!r} is not a Slurm time (HH:MM:SS, MM, D-HH, D-HH:MM:SS)"))
        if self.mem is not None and not _MEM.match(self.mem):
            out.append(("mem", f"{self.mem!r} is not a Slurm size (e.g. 64G, 512000M)"))
        for name in ("partition", "account", "qos", "gpu_type", "container_image"):
            v = getattr(self, name)
            if v is not None and not _SHELL_SAFE.fullmatch(v):
                out.append((name, f"{v[:60]!r} may only contain letters, digits and _ . , : + = @ / % - "
                                  "(it is written into the sbatch script)"))
        for i, arg in enumerate(self.sbatch_args):
            if not arg.startswith("-") or not _SHELL_SAFE.fullmatch(arg):
                out.append((f"sbatch_args[{i}]", f"{arg[:60]!r} must be one sbatch option such as "
                                                 "--constraint=h100 (letters, digits and _ . , : + = @ / % -)"))
        for i, m in enumerate(self.container_mounts):
            if not _SHELL_SAFE.fullmatch(m):
                out.append((f"container_mounts[{i}]", f"{m[:60]!r}: SRC:DST[:FLAGS] with no spaces or shell characters"))
        for name in ("setup", "modules"):
            for i, line in enumerate(getattr(self, name)):
                if "\n" in line or "\r" in line:
                    out.append((f"{name}[{i}]", "one shell line per item, no newlines"))
        return out


@dataclass(frozen=True, kw_only=True, slots=True)
class K8sConfig:
    namespace: str = doc("Namespace of the RayJob, its cluster and the spec ConfigMap.", "default")
    image: str | None = doc("Container image with kscale installed (required for --target k8s); its Ray "
                            "must match `ray_version`.", None)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = doc("Image pull policy.", "IfNotPresent")
    image_pull_secrets: list[str] = doc("Names of image pull secrets.", factory=list)
    service_account: str | None = doc("Service account of the pods.", None)
    ray_version: str | None = doc("Ray version in the image (`rayVersion`); None: the local Ray's.", None)
    gpu_resource: str = doc("Extended resource name of a GPU.", "nvidia.com/gpu")
    worker_replicas: int | None = doc("Worker pods. None: one pod per resources.workers.", None, ge=1)
    gpus_per_pod: int | None = doc("GPUs per worker pod. None: ceil(resources.gpus_per_worker).", None, ge=0)
    cpus_per_pod: str | None = doc("CPU request and limit per worker pod. None: resources.cpus_per_worker + 1.",
                                   None)
    memory_per_pod: str = doc("Memory request and limit per worker pod.", "16Gi")
    head_cpus: str = doc("CPU of the head pod (it runs the driver and Ray's control plane, no work: "
                         "`num-cpus: 0`).", "2")
    head_memory: str = doc("Memory of the head pod.", "8Gi")
    node_selector: dict[str, str] = doc("nodeSelector of the worker pods (e.g. a GPU product label).",
                                        factory=dict)
    tolerations: list[Any] = doc("Tolerations of the worker pods (Kubernetes syntax).", factory=list)
    labels: dict[str, str] = doc("Extra labels on every object kscale renders.", factory=dict)
    submission_mode: Literal["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"] = doc(
        "How KubeRay submits the driver. K8sJobMode keeps the submitter's logs in a Kubernetes Job.",
        "K8sJobMode")
    ttl_seconds_after_finished: int = doc("Seconds the finished cluster lingers before deletion (logs, "
                                          "debugging).", 600, ge=0)
    active_deadline_seconds: int | None = doc("Hard limit on the job's run time in seconds (None: none).", None,
                                              ge=1)
    pre_running_deadline_seconds: int | None = doc("Fail if the job is not running after this many seconds "
                                                   "(stuck image pulls, no GPUs).", 1800, ge=1)
    reuse_cluster: str | None = doc("Name of a running RayCluster to submit to (`clusterSelector`) instead of "
                                    "creating one per job; render it with `kscale render --target raycluster`.",
                                    None)
    output_pvc: str | None = doc("PersistentVolumeClaim mounted on every pod at `output_mount`; output.path "
                                 "should live under it so results outlive the cluster.", None)
    output_mount: str = doc("Mount path of `output_pvc` in the pods.", "/data")
    auth: bool = doc("Token authentication of the Ray cluster (`authOptions.mode: token`).", True)

    def validate(self) -> list[tuple[str, str]]:
        out = []
        for name in ("cpus_per_pod", "memory_per_pod", "head_cpus", "head_memory"):
            v = getattr(self, name)
            if v is not None and not _K8S_QUANTITY.match(v):
                out.append((name, f"{v!r} is not a Kubernetes quantity (e.g. 4, 500m, 16Gi)"))
        if not self.output_mount.startswith("/"):
            out.append(("output_mount", f"must be an absolute path, got {self.output_mount!r}"))
        return out


@dataclass(frozen=True, kw_only=True, slots=True)
class ClusterConfig:
    python: str | None = doc("Python (with kscale installed) that runs the driver on the cluster. None: `python` "
                             "on the Ray Jobs API and Kubernetes (the cluster's PATH), on Slurm the interpreter "
                             "that ran `kscale submit` (same path on a shared filesystem) or `python` in a "
                             "container.", None)
    record_dir: str | None = doc("Directory for the run's records: spec copy, rendered script or manifest, "
                                 "driver log, state, Ray logs, dask scheduler file. None: `<output.path>.cluster` "
                                 "beside the outputs (on Slurm it must be on the shared filesystem).", None)
    env: dict[str, str] = doc("Environment variables for the driver and workers on every target "
                              "(e.g. HF_HOME, HF_HUB_OFFLINE).", factory=dict)
    ray: RayConfig = doc("Ray settings when kscale starts Ray itself (Slurm).", factory=RayConfig)
    slurm: SlurmConfig = doc("Settings for `kscale submit --target slurm`.", factory=SlurmConfig)
    k8s: K8sConfig = doc("Settings for `kscale submit --target k8s` (KubeRay).", factory=K8sConfig)

    def validate(self) -> list[tuple[str, str]]:
        out = []
        for key in self.env:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
                out.append((f"env.{key}", "not a valid environment variable name"))
            if key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
                out.append((f"env.{key}", "set by kscale itself on each target; remove it"))
        return out


SECRET_PLACEHOLDER = "(secret, not recorded)"


def redact_env(raw: Any) -> Any:
    """A spec as plain data (the raw YAML mapping or ``to_dict(spec)``) with ``cluster.env`` values replaced by
    a placeholder, keys kept: what records, stores, spec copies, ConfigMaps and logs may contain. Every
    ``cluster.env`` value counts as a secret: it reaches processes only through the run's 0600 env file
    (:func:`kscale.private.write_env_file`; Slurm, Ray Jobs) or a Kubernetes Secret."""
    if isinstance(raw, dict) and isinstance(raw.get("cluster"), dict) and isinstance(raw["cluster"].get("env"), dict):
        raw = {**raw, "cluster": {**raw["cluster"], "env": {k: SECRET_PLACEHOLDER for k in raw["cluster"]["env"]}}}
    return raw


def cluster_of(spec: Any) -> ClusterConfig:
    """The spec's cluster section, or the defaults when the job has none."""
    return spec.cluster if spec.cluster is not None else ClusterConfig()
