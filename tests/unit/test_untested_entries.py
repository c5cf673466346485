"""Entries a user relies on that had no test: the RayJob status reader (``kscale status`` / ``submit``'s
attach), ``kscale doctor``'s Slurm, Kubernetes and local-GPU checks, the device / dtype choice of
``model.device: auto`` / ``model.dtype: auto``, and t-SNE pictures (seeded, neighbours kept).

The cluster tools are external programs: the tests put stand-ins for ``kubectl``, ``sbatch`` and ``sinfo``
on PATH that print recorded responses (``tests/unit/executors/recorded``) and log their arguments, so the
real ``subprocess`` calls, argument lists and parsing run.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kscale.targets import k8s
from kscale.targets.checks import check_local_gpus
from kscale.targets.k8s import check_k8s
from kscale.targets.slurm import check_slurm
from kscale.spec.cluster import ClusterConfig, SlurmConfig
from kscale.models.registry import pick_device, pick_dtype
from tests.testing_utils import require

RECORDED = Path(__file__).parent / "executors" / "recorded"
GOLDEN = Path(__file__).resolve().parents[1] / "golden"


def _tool(bin_dir: Path, name: str, stdout: str = "", stderr: str = "", rc: int = 0) -> Path:
    """An executable ``name`` that appends its argv to ``<name>.calls`` and answers as recorded."""
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / f"{name}.out").write_text(stdout)
    (bin_dir / f"{name}.err").write_text(stderr)
    script = bin_dir / name
    base = shlex.quote(str(bin_dir / name))
    script.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$*\" >> {base}.calls\n/bin/cat {base}.out\n/bin/cat {base}.err >&2\n"
                      f"exit {rc}\n")
    script.chmod(0o755)
    return script


def _calls(bin_dir: Path, name: str) -> list[str]:
    path = bin_dir / f"{name}.calls"
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def bin_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "bin"
    d.mkdir()
    monkeypatch.setenv("PATH", str(d))  # only the stand-ins: a real kubectl or sbatch on this machine is not used
    return d


# ---------------------------------------------------------------------------- k8s.rayjob_status


def test_recorded_rayjob_responses_follow_the_crd_schema() -> None:
    schemas = k8s.kuberay_schema_dir()
    require(schemas is not None, "KubeRay CRD schemas (../shared/schemas/kuberay-v1)",
            "copy KubeRay v1.7's CRDs (config/crd/bases) to <repo>/../shared/schemas/kuberay-v1")
    for name in ("rayjob_running.json", "rayjob_new.json"):
        doc = json.loads((RECORDED / name).read_text())
        assert k8s.validate_schema(doc, schemas, strict=False) == [], name


def test_rayjob_status_reads_a_running_job(bin_dir) -> None:
    _tool(bin_dir, "kubectl", stdout=(RECORDED / "rayjob_running.json").read_text())
    status = k8s.rayjob_status("kscale-demo-extract-3f2a9c1e", "ml")
    assert status["jobDeploymentStatus"] == "Running" and status["jobStatus"] == "RUNNING"
    assert status["rayClusterName"] == "kscale-demo-extract-3f2a9c1e-raycluster-x7k2p"
    (call,) = _calls(bin_dir, "kubectl")
    assert call == "get rayjob kscale-demo-extract-3f2a9c1e -n ml -o json --request-timeout=10s"


def test_rayjob_status_of_a_job_without_status_yet_is_empty_not_missing(bin_dir) -> None:
    _tool(bin_dir, "kubectl", stdout=(RECORDED / "rayjob_new.json").read_text())
    assert k8s.rayjob_status("kscale-demo-extract-3f2a9c1e", "ml") == {}  # exists: submit attaches to it


def test_rayjob_status_of_an_unknown_job_is_none(bin_dir) -> None:
    _tool(bin_dir, "kubectl", stderr=(RECORDED / "rayjob_notfound.stderr").read_text(), rc=1)
    assert k8s.rayjob_status("kscale-demo-extract-3f2a9c1e", "ml") is None  # not there: submit applies


# ---------------------------------------------------------------------------- doctor


def _slurm_spec(partition: str | None, gpus: float) -> SimpleNamespace:
    return SimpleNamespace(cluster=ClusterConfig(slurm=SlurmConfig(partition=partition)),
                           resources=SimpleNamespace(gpus_per_worker=gpus, workers=1))


SINFO = "gpu up gpu:h100:8 4\n"


def test_check_slurm_without_sbatch_fails_with_a_fix(bin_dir) -> None:
    (f,) = check_slurm(None)
    assert f.level == "fail" and "sbatch not found" in f.message and "module load slurm" in f.fix


def test_check_slurm_lists_the_partition_and_asks_sinfo_for_it(bin_dir) -> None:
    _tool(bin_dir, "sbatch")
    _tool(bin_dir, "sinfo", stdout=SINFO)
    found = check_slurm(_slurm_spec("gpu", gpus=1))
    assert [f.level for f in found] == ["ok", "info"] and "gpu up gpu:h100:8 4" in found[0].message
    assert _calls(bin_dir, "sinfo") == ["--noheader -o %P %a %G %D -p gpu"]


def test_check_slurm_warns_when_a_gpu_job_meets_a_partition_without_gpus(bin_dir) -> None:
    _tool(bin_dir, "sbatch")
    _tool(bin_dir, "sinfo", stdout="cpu up (null) 12\n")
    levels = {f.level: f for f in check_slurm(_slurm_spec("cpu", gpus=1))}
    assert "warn" in levels and "no gpu GRES" in levels["warn"].message


def test_check_slurm_fails_on_an_unknown_partition(bin_dir) -> None:
    _tool(bin_dir, "sbatch")
    _tool(bin_dir, "sinfo", stderr="sinfo: error: invalid partition specified: nope\n", rc=1)
    (f,) = check_slurm(_slurm_spec("nope", gpus=0))
    assert f.level == "fail" and "partition nope" in f.message and "invalid partition" in f.message


def test_check_k8s_without_kubectl_warns_and_still_checks_the_manifest(bin_dir) -> None:
    from kscale.spec import load_spec

    path = GOLDEN / "k8s_gpu_extract.job.yaml"
    found = check_k8s(load_spec(path, check_model=False), str(path))
    assert found[0].level == "warn" and "kubectl is not installed" in found[0].message
    assert found[1].check == "manifest" and found[1].level == "ok", found[1]


def test_check_k8s_with_kuberay_answering_is_ok(bin_dir) -> None:
    _tool(bin_dir, "kubectl", stdout="NAME              CREATED AT\nrayjobs.ray.io   2026-11-01T10:00:00Z\n")
    found = check_k8s(None, None)
    assert [f.level for f in found] == ["ok"]
    assert _calls(bin_dir, "kubectl")[0].startswith("get crd rayjobs.ray.io")


def test_check_k8s_reports_a_cluster_without_kuberay(bin_dir) -> None:
    _tool(bin_dir, "kubectl", stderr='Error from server (NotFound): customresourcedefinitions.apiextensions.k8s.io '
                                     '"rayjobs.ray.io" not found\n', rc=1)
    (f,) = check_k8s(None, None)
    assert f.level == "warn" and "KubeRay is not installed" in f.message


def test_check_local_gpus_compares_the_job_with_what_torch_sees() -> None:
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    wants = lambda workers, gpus: SimpleNamespace(resources=SimpleNamespace(workers=workers, gpus_per_worker=gpus))
    (f,) = check_local_gpus(wants(n + 1, 1.0))
    assert f.level == "fail" and f"needs {n + 1:g} GPU(s) here, torch sees {n}" in f.message and "CUDA_VISIBLE" in f.fix
    (f,) = check_local_gpus(wants(2, 0.0))
    assert f.level == "ok" and f"torch sees {n} GPU(s)" in f.message
    (f,) = check_local_gpus(None)
    assert f.level == "ok"


# ---------------------------------------------------------------------------- device and dtype


def test_auto_device_and_dtype_follow_cuda() -> None:
    cuda = torch.cuda.is_available()
    device = pick_device("auto")
    assert device.type == ("cuda" if cuda else "cpu")
    assert pick_dtype("auto", device) == (torch.bfloat16 if cuda else torch.float32)
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32  # bf16 only where it is fast
    assert pick_dtype("float16", torch.device("cpu")) == torch.float16  # explicit wins
    assert pick_device("cpu") == torch.device("cpu")


def test_cuda_requested_without_cuda_names_the_field() -> None:
    if torch.cuda.is_available():
        assert pick_device("cuda").type == "cuda"
        return
    with pytest.raises(ValueError, match="model.device: 'cuda' requested but no CUDA device is visible"):
        pick_device("cuda")


# ---------------------------------------------------------------------------- t-SNE


def _planted(n_per: int = 40, k: int = 4, d: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k well-separated Gaussian clusters in d dimensions and their labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=8.0, size=(k, d))
    labels = np.repeat(np.arange(k), n_per)
    return centres[labels] + rng.normal(size=(k * n_per, d)), labels


def _neighbour_agreement(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """Mean share of each point's k nearest neighbours in ``a`` that are also among its k nearest in ``b``."""
    def knn(x):
        d = ((x[:, None] - x[None]) ** 2).sum(-1)
        np.fill_diagonal(d, np.inf)
        return np.argsort(d, axis=1)[:, :k]
    na, nb = knn(a), knn(b)
    return float(np.mean([len(set(na[i]) & set(nb[i])) / k for i in range(len(a))]))


def test_tsne_is_deterministic_for_a_seed_and_keeps_planted_clusters() -> None:
    from tests.testing_utils import require_module

    require_module("openTSNE", install="pip install -e '.[analysis]'")
    from kscale.analysis.embed import tsne_2d

    x, labels = _planted()
    a, b = tsne_2d(x, perplexity=15, seed=3), tsne_2d(x, perplexity=15, seed=3)
    assert a.shape == (len(x), 2) and np.array_equal(a, b)
    assert not np.allclose(a, tsne_2d(x, perplexity=15, seed=4))  # the seed is what fixes it
    # every point's 5 nearest neighbours in the picture come from its own planted cluster
    d = ((a[:, None] - a[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert (labels[np.argsort(d, axis=1)[:, :5]] == labels[:, None]).all()
    assert _neighbour_agreement(x, a) > 0.5  # and local neighbourhoods are largely kept
