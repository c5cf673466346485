"""Missing prerequisites skip locally (with the install command) and fail in CI; ``.ci/run`` stops on a
failed install instead of running the suite without Slurm."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.testing_utils import in_ci, require, require_binaries, require_module

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("value, ci", [("true", True), ("1", True), ("TRUE", True), ("", False), ("false", False)])
def test_ci_is_read_from_the_environment(monkeypatch, value, ci) -> None:
    monkeypatch.setenv("CI", value)
    assert in_ci() is ci


def _outcome(fn) -> BaseException:
    """What ``fn`` raised (skip and fail are exceptions in pytest; catching them here keeps a skip from
    passing as this test's own skip)."""
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - pytest's outcomes derive from BaseException
        return e
    raise AssertionError(f"{fn} raised nothing")


def test_missing_prerequisite_skips_locally_with_the_install_command(monkeypatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    e = _outcome(lambda: require_binaries("sh", "no-such-binary-kscale", install="apt-get x"))
    assert isinstance(e, pytest.skip.Exception) and "not installed: no-such-binary-kscale (install: apt-get x)" in str(e)
    e = _outcome(lambda: require_module("no_such_module_kscale", install="pip install y"))
    assert isinstance(e, pytest.skip.Exception) and "cannot import no_such_module_kscale" in str(e)
    require(True, "never reported", "nothing")  # present: no skip


def test_missing_prerequisite_fails_in_ci(monkeypatch) -> None:
    monkeypatch.setenv("CI", "true")
    e = _outcome(lambda: require_binaries("no-such-binary-kscale", install="apt-get x"))
    assert isinstance(e, pytest.fail.Exception), type(e)
    assert "missing prerequisite in CI: not installed: no-such-binary-kscale" in str(e)
    e = _outcome(lambda: require_module("no_such_module_kscale", install="pip install y"))
    assert isinstance(e, pytest.fail.Exception) and "no_such_module_kscale" in str(e), type(e)
    assert require_module("json", install="-").dumps([]) == "[]"


def _fake_repo(tmp_path: Path, install_rc: int) -> Path:
    """A copy of ``.ci/run`` beside a fake installer (exit ``install_rc``) and a Makefile whose ``test`` and
    ``test-extended`` and ``test-nodes`` targets only leave marks (and record the CI variable they saw)."""
    (tmp_path / ".ci").mkdir()
    shutil.copy(REPO / ".ci" / "run", tmp_path / ".ci" / "run")
    (tmp_path / ".ci" / "install_slurm.sh").write_text(f"#!/usr/bin/env bash\necho installing\nexit {install_rc}\n")
    (tmp_path / ".ci" / "install_slurm.sh").chmod(0o755)
    (tmp_path / "Makefile").write_text("test:\n\techo \"$$CI\" > suite-ran\n"
                                       "test-extended:\n\techo \"$$CI\" > extended-ran\n"
                                       "test-nodes:\n\techo \"$$CI\" > nodes-ran\n")
    return tmp_path


def test_ci_run_stops_when_the_slurm_install_fails(tmp_path) -> None:
    require_binaries("make", install="apt-get install make")
    repo = _fake_repo(tmp_path, install_rc=1)
    p = subprocess.run(["bash", str(repo / ".ci" / "run")], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin"})
    assert p.returncode != 0, p.stdout + p.stderr
    assert not (repo / "suite-ran").exists()  # the suite did not run without Slurm
    assert "install_slurm.sh failed" in p.stderr


def test_ci_run_runs_the_suite_with_ci_set(tmp_path) -> None:
    require_binaries("make", install="apt-get install make")
    repo = _fake_repo(tmp_path, install_rc=0)
    p = subprocess.run(["bash", str(repo / ".ci" / "run")], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stdout + p.stderr
    assert (repo / "suite-ran").read_text().strip() == "true"
    assert (repo / "extended-ran").read_text().strip() == "true"  # the heavier tests kept out of `make test`
    assert (repo / "nodes-ran").read_text().strip() == "true"  # the multi-node cluster tests run after it


@pytest.mark.parametrize("ci", ["true", "1", "yes"])
def test_a_missing_chromium_fails_under_every_ci_value(monkeypatch, ci) -> None:
    """The browser tests ask ``in_ci()`` like every other prerequisite (not ``CI == "true"`` alone)."""
    from tests import browser

    monkeypatch.setattr(browser, "chromium", lambda: None)
    monkeypatch.setenv("CI", ci)
    e = _outcome(browser.require_chromium)
    assert isinstance(e, pytest.fail.Exception) and browser.INSTALL_HINT in str(e), type(e)
    monkeypatch.delenv("CI")
    e = _outcome(browser.require_chromium)
    assert isinstance(e, pytest.skip.Exception) and "chromium not installed" in str(e), type(e)
    monkeypatch.setattr(browser, "chromium", lambda: "/usr/bin/chromium")
    assert browser.require_chromium() == "/usr/bin/chromium"
