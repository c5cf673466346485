"""KubeRay manifests: golden files, the v1.7 CRD schemas (strictly), and kscale's own checks for what the
CRD leaves open (submissionMode enum, names, GPU limits, KubeRay's cross-field rules)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

import kscale
from kscale.targets import k8s
from kscale.spec import SpecError, load_spec
from tests.golden.golden import GOLDEN, SID, assert_golden, assert_hand_copies_current, hand_copies
from tests.testing_utils import require

SCHEMAS = Path(__file__).resolve().parents[3] / "cluster" / "k8s" / "crds"  # KubeRay's CRDs, vendored


@pytest.fixture(autouse=True)
def _fixed_version(monkeypatch):
    monkeypatch.setattr(kscale, "__version__", "0.0.0")


def _docs(name: str) -> tuple[object, list[dict]]:
    path = GOLDEN / f"{name}.job.yaml"
    spec = load_spec(path, check_model=False)
    return spec, k8s.render_rayjob(spec, str(path), SID)


def _rayjob(name: str = "k8s_gpu_extract") -> tuple[object, dict]:
    spec, docs = _docs(name)
    return spec, next(d for d in docs if d["kind"] == "RayJob")


def _schemas() -> Path:
    require((SCHEMAS / "ray.io_rayjobs.yaml").is_file(), f"KubeRay CRD schemas not found at {SCHEMAS}",
            "copy KubeRay v1.7's CRDs (config/crd/bases) to <repo>/../shared/schemas/kuberay-v1")
    return SCHEMAS


@pytest.mark.parametrize("name", ["k8s_gpu_extract", "k8s_reuse", "k8s_gpu_eval"])
def test_rayjob_matches_golden(name):
    assert_golden(f"{name}.rayjob.yaml", k8s.to_yaml(_docs(name)[1]))


def test_raycluster_matches_golden():
    spec = load_spec(GOLDEN / "k8s_gpu_extract.job.yaml", check_model=False)
    assert_golden("k8s_gpu_extract.raycluster.yaml", k8s.to_yaml([k8s.render_raycluster(spec, "kscale-shared")]))


def test_hand_use_copies_in_cluster_dir_are_current():
    assert_hand_copies_current()


def test_rendered_manifests_validate_against_the_crds():
    schemas = _schemas()
    spec = load_spec(GOLDEN / "k8s_gpu_extract.job.yaml", check_model=False)
    example = load_spec(GOLDEN.parents[1] / "cluster" / "example-job.yaml", check_model=False)
    checked = [(spec, _rayjob("k8s_gpu_extract")[1]), (spec, _rayjob("k8s_reuse")[1]),
               (spec, k8s.render_raycluster(spec, "kscale-shared"))]
    checked += [(example, d) for text in hand_copies().values() if text.startswith("apiVersion")
                for d in yaml.safe_load_all(text) if d["kind"] != "ConfigMap"]
    assert len(checked) == 6
    for s, doc in checked:
        assert k8s.validate_schema(doc, schemas) == [], doc["metadata"]["name"]
        assert k8s.check_manifest(doc, s) == [], doc["metadata"]["name"]


def test_an_eval_rayjob_is_an_extraction_s_ray_cluster():
    """``kind: eval`` with the Ray executor: the same RayJob as an extraction of the same resources (a driver on
    the head, which takes no work, and one GPU worker pod per rank), valid under the CRD and kscale's checks."""
    spec, job = _rayjob("k8s_gpu_eval")
    extract_spec, extract = _rayjob("k8s_gpu_extract")
    assert spec.resources == extract_spec.resources
    assert job["spec"]["rayClusterSpec"] == extract["spec"]["rayClusterSpec"]
    assert job["spec"]["entrypoint"] == extract["spec"]["entrypoint"].replace("qwen-keys", "qwen-eval")
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == spec.resources.workers == 4
    assert job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert k8s.validate_schema(job, _schemas()) == [] and k8s.check_manifest(job, spec) == []


def test_rayjob_carries_the_settings_the_issue_asks_for():
    _, job = _rayjob()
    s = job["spec"]
    assert s["backoffLimit"] == 0 and s["submissionMode"] == "K8sJobMode" and s["shutdownAfterJobFinishes"] is True
    assert s["ttlSecondsAfterFinished"] == 600 and s["activeDeadlineSeconds"] == 86400
    head = s["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    (group,) = s["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == 4 and group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert s["entrypoint"].endswith("/etc/kscale/job.yaml")
    cm = _docs("k8s_gpu_extract")[1][0]
    assert yaml.safe_load(cm["data"]["job.yaml"])["output"]["path"] == "/data/runs/qwen-keys"  # under the PVC


def test_reuse_ships_the_spec_inline_and_follows_kuberay_rules():
    _, job = _rayjob("k8s_reuse")
    s = job["spec"]
    assert s["clusterSelector"] == {"ray.io/cluster": "kscale-shared"} and "rayClusterSpec" not in s
    assert s["shutdownAfterJobFinishes"] is False and s["ttlSecondsAfterFinished"] == 0
    env = yaml.safe_load(s["runtimeEnvYAML"])["env_vars"]
    assert yaml.safe_load(env["KSCALE_SPEC_YAML"])["name"] == "qwen-keys"
    assert "env:KSCALE_SPEC_YAML" in s["entrypoint"]


def test_submission_mode_typo_passes_the_crd_but_not_kscale():
    schemas = _schemas()
    spec, job = _rayjob()
    job["spec"]["submissionMode"] = "K8sJobmode"
    assert k8s.validate_schema(job, schemas) == []  # the CRD types it as a free string
    assert any("spec.submissionMode" in p for p in k8s.check_manifest(job, spec))


def test_misspelled_field_is_an_error_under_the_strict_schema():
    schemas = _schemas()
    _, job = _rayjob()
    job["spec"]["shutdownAfterJobFinish"] = True  # the API server would drop it without a word
    assert k8s.validate_schema(job, schemas, strict=False) == []
    assert any("shutdownAfterJobFinish" in e for e in k8s.validate_schema(job, schemas))


@pytest.mark.parametrize("edit, expected", [
    (lambda j: j["metadata"].update(name="kscale-" + "x" * 45), "metadata.name"),
    (lambda j: j["metadata"].update(name="9-starts-with-digit"), "metadata.name"),
    (lambda j: j["spec"].update(backoffLimit=3), "spec.backoffLimit"),
    (lambda j: j["spec"].update(shutdownAfterJobFinishes=False), "spec.ttlSecondsAfterFinished"),
    (lambda j: j["spec"].update(clusterSelector={"ray.io/cluster": "x"}), "exactly one of rayClusterSpec"),
    (lambda j: j["spec"].update(activeDeadlineSeconds=0), "spec.activeDeadlineSeconds"),
    (lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].pop("num-cpus"), "num-cpus"),
    (lambda j: _worker_res(j)["limits"].pop("nvidia.com/gpu") and _worker_res(j)["requests"].update(
        {"nvidia.com/gpu": 1}), "has no limit"),
    (lambda j: _worker_res(j)["limits"].update({"nvidia.com/gpu": "0.5"}), "whole number"),
    (lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(replicas=2), "resources asks for"),
    (lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(groupName="GPU_workers"), "groupName"),
])
def test_kscale_checks_catch(edit, expected):
    spec, job = _rayjob()
    job = copy.deepcopy(job)
    edit(job)
    problems = k8s.check_manifest(job, spec)
    assert any(expected in p for p in problems), problems


def _worker_res(job: dict) -> dict:
    return job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]


def test_image_is_required_for_kubernetes(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text((GOLDEN / "k8s_gpu_extract.job.yaml").read_text().replace(
        "image: registry.example.com/kscale:0.0.0", "image_pull_policy: Always"))
    spec = load_spec(job, check_model=False)
    with pytest.raises(SpecError) as e:
        k8s.render_rayjob(spec, str(job), SID)
    assert e.value.problems[0][0] == "cluster.k8s.image"


def test_without_a_cluster_the_manifest_is_written_for_the_user(tmp_path, monkeypatch):
    monkeypatch.setenv("KSCALE_HOME", str(tmp_path / "kh"))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))  # no cluster whatever the machine has
    spec = load_spec(GOLDEN / "k8s_gpu_extract.job.yaml", check_model=False)
    said: list[str] = []
    assert k8s.submit(str(GOLDEN / "k8s_gpu_extract.job.yaml"), spec, False, False, said.append) == 0
    (written,) = (tmp_path / "kh" / "manifests").glob("*.yaml")
    assert "not applied" in said[0] and f"kubectl apply -f {written}" in said[0]
    kinds = [d["kind"] for d in yaml.safe_load_all(written.read_text())]
    assert kinds == ["ConfigMap", "RayJob"]
