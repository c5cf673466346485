"""Issue 21 item 4: private files and folders on shared filesystems (``kscale.private``), and where kscale uses
them: the Slurm record dir (at submit and in the sbatch body) and the node temp dir of a Slurm service.

Planted links, folders of another user and group-writable folders are refused; a planted link never
receives the text and the private file never becomes a link."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from kscale import private
from kscale.private import UnsafePath, private_dir, read_private, write_env_file, write_private
from tests.conftest import REPO

SECRET = "s3cret-" + os.urandom(4).hex()
NOBODY = 65534


@pytest.fixture(autouse=True)
def _group_umask():
    old = os.umask(0o002)  # a shared cluster's usual umask: folders 0775 unless kscale says otherwise
    yield
    os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def test_private_dir_is_created_0700_and_accepted_again(tmp_path):
    d = private_dir(tmp_path / "a" / "rec")
    assert _mode(d) == 0o700
    assert private_dir(d) == d  # ours, 0700: accepted
    os.umask(0o222)  # whatever the umask: a folder the owner can use
    assert _mode(private_dir(tmp_path / "b")) == 0o700


@pytest.mark.parametrize("bad", ["group_writable", "symlink", "other_owner", "file"])
def test_private_dir_refuses_what_another_user_could_control(tmp_path, bad):
    d = tmp_path / "rec"
    if bad == "group_writable":
        d.mkdir()
        d.chmod(0o775)
    elif bad == "symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        d.symlink_to(tmp_path / "elsewhere")
    elif bad == "other_owner":
        if os.getuid() != 0:
            pytest.skip("needs root to give a folder to another uid")  # this suite runs as root here and in CI
        d.mkdir(mode=0o700)
        os.chown(d, NOBODY, NOBODY)
    else:
        d.write_text("x")
    with pytest.raises(UnsafePath, match=str(d)):
        private_dir(d)
    with pytest.raises(UnsafePath):
        write_private(d / "ID.env", SECRET)
    assert not (tmp_path / "elsewhere" / "ID.env").exists()


def test_write_private_never_writes_through_a_planted_link(tmp_path):
    rec = private_dir(tmp_path / "rec")
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    (rec / f"ID.env.tmp-{os.getpid()}").symlink_to(victim)  # the old temporary name
    (rec / "ID.env").symlink_to(victim)                      # and the target itself
    out = write_private(rec / "ID.env", SECRET)
    assert victim.read_text() == "untouched"
    assert not out.is_symlink() and _mode(out) == 0o600 and out.read_text() == SECRET


def test_write_private_refuses_a_link_planted_at_its_temporary_name(tmp_path, monkeypatch):
    """O_EXCL | O_NOFOLLOW: even a guessed temporary name cannot be made to receive the text."""
    rec = private_dir(tmp_path / "rec")
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    monkeypatch.setattr(private.secrets, "token_hex", lambda n: "guessed")
    (rec / ".ID.env.tmp-guessed").symlink_to(victim)
    with pytest.raises(FileExistsError):
        write_private(rec / "ID.env", SECRET)
    assert victim.read_text() == "untouched" and not (rec / "ID.env").exists()


def test_read_private_refuses_links_and_loose_modes(tmp_path):
    rec = private_dir(tmp_path / "rec")
    env = write_env_file(rec / "ID.env", {"HF_TOKEN": SECRET, "MULTI": "a b\n'c'"})
    assert private.read_env_file(env) == {"HF_TOKEN": SECRET, "MULTI": "a b\n'c'"}
    link = rec / "link.env"
    link.symlink_to(env)
    with pytest.raises(UnsafePath):
        read_private(link)
    env.chmod(0o644)
    with pytest.raises(UnsafePath, match="0644"):
        read_private(env)


# ----------------------------------------------------------------------------- where kscale uses them


def test_slurm_submit_refuses_a_group_writable_record_dir(tmp_path, monkeypatch):
    from kscale.spec import load_spec
    from kscale.targets import slurm

    monkeypatch.setenv("KSCALE_HOME", str(tmp_path / "home"))
    bins = tmp_path / "bin"
    bins.mkdir()
    for name, out in (("squeue", ""), ("sbatch", "1")):
        (bins / name).write_text(f"#!/bin/sh\necho {out}\n")
        (bins / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bins}:{os.environ['PATH']}")
    job = tmp_path / "job.yaml"
    job.write_text(f"kind: extract\nname: p\nmodel: {{path: 'debug:qwen2_5_vl'}}\ndata: {{source: generated}}\noutput: {{path: {tmp_path / 'out'}}}\n"
                   "cluster: {env: {HF_TOKEN: " + SECRET + "}}\n")
    spec = load_spec(job, check_model=False)
    rec = tmp_path / "out.cluster"
    rec.mkdir()
    rec.chmod(0o775)  # made by someone else's `mkdir -p` under umask 002: others in the group could plant ID.env
    with pytest.raises(UnsafePath, match="chmod go-w"):
        slurm.submit(str(job), spec, force=False, dry_run=False, say=lambda s: None)
    assert list(rec.iterdir()) == []
    rec.chmod(0o700)
    assert slurm.submit(str(job), spec, force=False, dry_run=False, say=lambda s: None) == 0
    (env,) = rec.glob("*.env")
    assert _mode(env) == 0o600


def _body_check(rec: Path) -> subprocess.CompletedProcess:
    """The sbatch body's record-dir check, run by bash as the job would run it."""
    from kscale.targets.slurm import body

    text = body()
    check = text[text.index("job_id="):text.index("mapfile")]
    return subprocess.run(["bash", "-c", "set -euo pipefail\n" + check], capture_output=True, text=True,
                          env={**os.environ, "SLURM_JOB_ID": "7", "KSCALE_RECORD_DIR": str(rec)})


def test_sbatch_body_refuses_a_record_dir_others_can_write(tmp_path):
    rec = tmp_path / "rec"
    rec.mkdir()
    rec.chmod(0o775)
    assert _body_check(rec).returncode == 1 and "refusing record dir" in _body_check(rec).stderr
    (tmp_path / "link").symlink_to(rec)
    rec.chmod(0o700)
    assert _body_check(tmp_path / "link").returncode == 1
    assert _body_check(rec).returncode == 0


@pytest.mark.parametrize("planted", ["symlink", "other_owner"])
def test_slurm_service_refuses_a_planted_node_temp_dir(tmp_path, planted):
    temp, elsewhere = tmp_path / "kscale-slurm-7-abcd", tmp_path / "elsewhere"
    elsewhere.mkdir()
    if planted == "symlink":
        temp.symlink_to(elsewhere)
    else:
        if os.getuid() != 0:
            pytest.skip("needs root to give a folder to another uid")
        temp.mkdir(mode=0o700)
        os.chown(temp, NOBODY, NOBODY)
    marker = tmp_path / "service-ran"
    p = subprocess.run([sys.executable, "-m", "kscale.targets.slurm_node", "--name", "ray-head",
                        "--stop-file", str(tmp_path / "stop"), "--logs-to", str(tmp_path / "logs"),
                        "--temp-dir", str(temp), "--", "touch", str(marker)],
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and str(temp) in p.stderr
    assert not marker.exists()  # the service never started in it
    assert temp.exists() or temp.is_symlink()  # and it is not removed either (it is not ours)


def test_slurm_service_creates_its_node_temp_dir_private(tmp_path):
    temp = tmp_path / "kscale-slurm-7-abcd"
    p = subprocess.run([sys.executable, "-m", "kscale.targets.slurm_node", "--name", "ray-head",
                        "--stop-file", str(tmp_path / "stop"), "--logs-to", str(tmp_path / "logs"),
                        "--temp-dir", str(temp), "--", "stat", "-c", "%a", str(temp)],
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1  # a service that ends by itself is reported...
    host_out = next((tmp_path / "logs").glob("*/ray-head.out")).read_text()
    assert host_out.strip() == "700"  # ...and it saw its temp dir 0700 under umask 002
