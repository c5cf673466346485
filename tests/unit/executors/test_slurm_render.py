"""The sbatch script kscale renders: golden files, shellcheck, sizes from the spec, field-named errors."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

import kscale
from kscale.targets import slurm
from kscale.spec import SpecError, load_spec, spec_from_dict
from tests.golden.golden import GOLDEN, SID, assert_golden
from tests.testing_utils import require_binaries


def _render(name: str) -> str:
    spec = load_spec(GOLDEN / f"{name}.job.yaml", check_model=False)
    rec = Path(spec.output.path + ".cluster")
    return slurm.render_script(spec, SID, rec, rec / f"{SID}.job.yaml", "/home/user/project",
                               "/opt/venv/bin/python", source=f"{name}.job.yaml")


@pytest.fixture(autouse=True)
def _fixed_version(monkeypatch):
    monkeypatch.setattr(kscale, "__version__", "0.0.0")


@pytest.mark.parametrize("name", ["slurm_gpu_extract", "slurm_analyze", "slurm_gpu_eval"])
def test_rendered_script_matches_golden(name):
    assert_golden(f"{name}.sbatch", _render(name))


@pytest.mark.parametrize("name", ["slurm_gpu_extract", "slurm_analyze", "slurm_gpu_eval"])
def test_rendered_script_passes_shellcheck(name, tmp_path):
    require_binaries("shellcheck", install="apt-get install shellcheck, or sudo .ci/install_slurm.sh")
    script = tmp_path / "job.sbatch"
    script.write_text(_render(name))
    check = subprocess.run(["shellcheck", "--severity=style", str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout


def test_header_follows_the_spec():
    text = _render("slurm_gpu_extract")
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=h100:4", "#SBATCH --cpus-per-task=24",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj-123", "#SBATCH --time=1-00:00:00",
                 "#SBATCH --mem=480G", "#SBATCH --constraint=h100", "#SBATCH --signal=B:TERM@120",
                 f"#SBATCH --job-name={SID}", "KSCALE_RUNTIME=ray", "module load cuda/12.4",
                 "source /shared/runs/qwen-keys.cluster/kscale-golden-0000000000.env", "KSCALE_OBJECT_STORE_BYTES=40000000000"):
        assert line in text.splitlines(), line
    assert "ray stop" not in text.replace("never `ray stop`", "")  # it stops its own processes by PID


def test_an_eval_job_on_ray_gets_what_an_extraction_gets():
    """``kind: eval`` with the Ray executor: the allocation starts the same Ray cluster as an extraction of the
    same resources (its ranks are Ray actors, :mod:`kscale.eval.launch`); only the job's own lines differ."""
    text = _render("slurm_gpu_eval")
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=h100:4", "#SBATCH --cpus-per-task=24",
                 "KSCALE_RUNTIME=ray"):
        assert line in text.splitlines(), line
    extract = yaml.safe_load((GOLDEN / "slurm_gpu_extract.job.yaml").read_text())
    evaluate = yaml.safe_load((GOLDEN / "slurm_gpu_eval.job.yaml").read_text())
    assert evaluate["resources"] == extract["resources"]
    body = lambda t: t[t.index("\nif [ \"$KSCALE_RUNTIME\" = ray ]"):]  # noqa: E731 - services and driver
    assert body(text) == body(_render("slurm_gpu_extract"))


def test_analysis_jobs_start_dask_not_ray():
    text = _render("slurm_analyze")
    assert "KSCALE_RUNTIME=dask" in text and "--gpus-per-node" not in text
    assert "#SBATCH --cpus-per-task=32" in text


def test_shape_derives_from_resources():
    spec = spec_from_dict({"kind": "extract", "model": {"path": "debug:llava"}, "data": {},
                           "output": {"path": "/x"}, "resources": {"workers": 6, "gpus_per_worker": 1,
                                                                  "cpus_per_worker": 4},
                           "cluster": {"slurm": {"nodes": 2}}}, check_model=False)
    assert slurm.shape(spec) == slurm.SlurmShape(nodes=2, gpus_per_node=3, cpus_per_node=12)


def test_cluster_section_errors_name_the_field():
    raw = {"kind": "extract", "model": {"path": "debug:llava"}, "data": {}, "output": {"path": "/x"},
           "cluster": {"ray": {"port_base": 15000}, "slurm": {"time": "1h", "partiton": "gpu", "mem": "lots"},
                       "k8s": {"submission_mode": "K8sJobmode"}}}
    with pytest.raises(SpecError) as e:
        spec_from_dict(raw, check_model=False)
    fields = {f for f, _ in e.value.problems}
    assert {"cluster.ray.port_base", "cluster.slurm.time", "cluster.slurm.partiton", "cluster.slurm.mem",
            "cluster.k8s.submission_mode"} <= fields
    assert "worker port range" in dict(e.value.problems)["cluster.ray.port_base"]
    with pytest.raises(SpecError) as e:
        spec_from_dict({**raw, "cluster": {"env": {"RAY_ADDRESS": "x", "1BAD": "y"}}}, check_model=False)
    assert {f for f, _ in e.value.problems} == {"cluster.env.RAY_ADDRESS", "cluster.env.1BAD"}


def test_dry_run_prints_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = tmp_path / "job.yaml"
    job.write_text((GOLDEN / "slurm_analyze.job.yaml").read_text().replace("/shared/runs/gap", "out/gap"))
    spec = load_spec(job, check_model=False)
    printed = []
    assert slurm.submit(str(job), spec, force=False, dry_run=True, say=printed.append) == 0
    assert printed[0].startswith("#!/bin/bash") and f"KSCALE_RECORD_DIR={tmp_path}/out/gap.cluster" in printed[0]
    assert not (tmp_path / "out").exists()


def _function(text: str, name: str) -> str:
    start = text.index(f"\n{name}() {{")
    return text[start: text.index("\n}\n", start)]


@pytest.mark.parametrize("name", ["slurm_gpu_extract", "slurm_analyze", "slurm_gpu_eval"])
def test_services_run_under_the_node_wrapper_and_end_through_stop_files(name):
    """Clean logs and a cleanup that works after scancel: every service (Ray head/workers, dask scheduler/
    workers) runs under kscale.targets.slurm_node, which keeps its output, Ray logs and temp dir; cleanup
    asks each to stop through its stop file, newest first, and starts no srun step (the allocation may be
    gone: "job has expired")."""
    text = _render(name)
    lines = text.splitlines()
    services = [i for i, line in enumerate(lines) if line.lstrip().startswith("service ")]
    starts = [i for i, line in enumerate(lines) if "ray.scripts.scripts start" in line or "distributed.cli.dask_" in line]
    assert starts and len(services) == len(starts), (services, starts)
    assert all(s in (v + 1, v + 2) for v, s in zip(services, starts))  # each start is a service's command
    assert "-m kscale.targets.slurm_node --name" in _function(text, "service")
    assert 'srun "${args[@]}"' in _function(text, "step") and "--quiet" in _function(text, "step")
    cleanup = _function(text, "cleanup")
    assert "srun" not in cleanup and "step " not in cleanup and "kill -TERM \"${pids[@]}\"" not in cleanup
    assert 'touch "$stop_dir/${services[i]}"' in cleanup and "i--" in cleanup


def test_analysis_asks_for_a_cpu_per_dask_thread():
    spec = spec_from_dict({"kind": "analyze", "analyze": {"stores": ["/shared/keys"], "dask": {"n_workers": 6}},
                           "output": {"path": "/x"}}, check_model=False)
    assert slurm.shape(spec).cpus_per_node == 6
    assert "#SBATCH --cpus-per-task=6" in slurm.render_script(spec, SID, Path("/x.cluster"), Path("/x.cluster/j.yaml"),
                                                               "/home/u", "python").splitlines()


# ----------------------------------------------------------------------------- issue 21 item 6: injection


EVIL = "evil\ntouch INJECTED\n#"


def _evil_script(tmp_path: Path, monkeypatch) -> tuple[str, Path, dict]:
    """Render (dry run) a job whose file name, job name, working dir, output path and python carry shell: a
    newline-separated command, ``$(...)``, backquotes and quotes."""
    import yaml

    where = tmp_path / "d $(touch INJECTED) 'q\"`touch INJECTED`"
    where.mkdir()
    monkeypatch.chdir(where)
    values = {"output": str(where / "out $(touch INJECTED)"), "python": "/opt/py $(touch INJECTED) `id`"}
    job = where / f"{EVIL}.yaml"
    job.write_text(yaml.safe_dump({"kind": "extract", "name": EVIL, "model": {"path": "debug:qwen2_5_vl"},
                                   "data": {"source": "generated"}, "output": {"path": values["output"]},
                                   "cluster": {"python": values["python"]}}))
    printed: list[str] = []
    assert slurm.submit(str(job), load_spec(job, check_model=False), force=False, dry_run=True, say=printed.append) == 0
    return printed[0] + "\n", where, values


def test_names_and_values_cannot_inject_commands(tmp_path, monkeypatch):
    text, where, values = _evil_script(tmp_path, monkeypatch)
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    assert "touch INJECTED" not in [line.strip() for line in text.splitlines()]
    # Run everything above the fixed body, as bash would: the settings hold the values verbatim, nothing runs.
    head = text[: text.index("# ---- kscale Slurm body")]
    probe = head + 'printf "%s\\n" "$KSCALE_PYTHON" "$KSCALE_RECORD_DIR"\n'
    out = subprocess.run(["bash", "-c", probe], cwd=where, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [values["python"], values["output"] + ".cluster"]
    assert not list(tmp_path.rglob("INJECTED")), "a command in a name or value ran"


def test_script_with_hostile_names_passes_shellcheck(tmp_path, monkeypatch):
    require_binaries("shellcheck", install="apt-get install shellcheck, or sudo .ci/install_slurm.sh")
    text, _, _ = _evil_script(tmp_path, monkeypatch)
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    check = subprocess.run(["shellcheck", "--severity=warning", str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout


def test_only_the_head_uses_the_jobs_port_block_and_each_node_has_its_own_temp_dir():
    """Issue 26: Slurm nodes that share a host (``slurmd -N``) must not collide. The worker nodes' Ray services
    take ports the kernel picks (all ``=0``), the head keeps the job's block; the node temp dir ends in ``{node}``,
    which each node's wrapper fills with its index in the job's node list (``--job-nodes``). The real run on two
    nodes of one host is ``tests/cluster/test_slurm_nodes.py``."""
    text = _render("slurm_gpu_extract")
    start = text.index("\nworker_ports=(")
    worker_ports = text[start: text.index(")", start)]
    assert len(re.findall(r"--[a-z-]+-port=0\b", worker_ports)) == 6 and "port_base" not in worker_ports
    worker = text[text.index("service ray-worker"): text.index("export RAY_ADDRESS")]
    assert '"${worker_ports[@]}"' in worker and "ray_ports" not in worker and "port_base" not in worker
    head = text[text.index("service ray-head"): text.index("service ray-worker")]
    assert '"${ray_ports[@]}"' in head
    assert re.search(r'^node_tmp=".*-n\{node\}"$', text, re.M)
    assert '--temp-dir "$temp" --job-nodes "${nodes[*]}"' in _function(text, "service")


def test_every_dask_server_keeps_its_scratch_space_in_the_jobs_node_temp_dirs_and_its_dashboard_local():
    """The dask scheduler runs with a temp dir of its own on the head's node (``$node_tmp-s``: the wrapper creates
    it 0700 and removes it; ``DASK_TEMPORARY_DIRECTORY`` points the scheduler's scratch space there), the
    workers with the node's ``-n{node}`` dir as ``--local-directory``. Without it the scheduler used the node's
    shared ``/tmp/dask-scratch-space`` and left files there (seen in ``tests/cluster/test_slurm_nodes.py``), and
    the workers' dashboards listened on every interface (``0.0.0.0``, seen there too)."""
    text = _render("slurm_analyze")
    sched = " ".join(text[text.index("service dask-scheduler"): text.index("service dask-worker")]
                     .replace("\\\n", " ").split())
    assert sched.startswith('service dask-scheduler "$node_tmp-s" ')
    assert '-- env DASK_TEMPORARY_DIRECTORY="$node_tmp-s" "$KSCALE_PYTHON" -m distributed.cli.dask_scheduler' in sched
    worker = text[text.index("service dask-worker"): text.index("wait-dask")]
    assert worker.startswith('service dask-worker "$node_tmp" --nodes="$n_nodes" --ntasks="$n_nodes" '
                             "--ntasks-per-node=1")
    assert '--local-directory "$node_tmp"' in worker
    # dashboards (plain HTTP, no login) on the node's loopback: dask's worker default ":0" is every interface
    assert '--dashboard-address 127.0.0.1:0' in worker and '--dashboard-address "127.0.0.1:$dashboard_port"' in sched
