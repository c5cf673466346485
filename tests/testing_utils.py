"""One vocabulary for missing prerequisites: skip locally with the command that installs them, fail in CI.

In CI (``CI=true``, set by ``.ci/run``) a missing prerequisite is a broken runner, not a reason to skip:
a quiet skip there would hide that the Slurm, shellcheck or CRD-schema checks never ran. Locally the test
skips and says how to install what is missing. (PEFT keeps its ``require_*`` helpers in one
``tests/testing_utils.py`` too.)
"""

from __future__ import annotations

import importlib
import os
import shutil
import time
from types import ModuleType

import pytest

SLURM_INSTALL = "sudo .ci/install_slurm.sh"


def in_ci() -> bool:
    """True where the ``CI`` environment variable says so (GitHub Actions, GitLab and ``.ci/run`` set it)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require(ok: bool, what: str, install: str) -> None:
    """Skip (locally) or fail (in CI) unless ``ok``; ``what`` names the prerequisite, ``install`` the fix."""
    if ok:
        return
    message = f"{what} (install: {install})"
    if in_ci():
        pytest.fail(f"missing prerequisite in CI: {message}", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def require_binaries(*names: str, install: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    require(not missing, f"not installed: {', '.join(missing)}", install)


def require_module(name: str, install: str) -> ModuleType:
    """``importorskip`` that fails in CI: the module, once importable."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        require(False, f"cannot import {name} ({e})", install)
        raise  # not reached: require skipped or failed


def process_gone(pid: int, within: float = 20.0) -> bool:
    """The process ``pid`` (one the test started) has exited within ``within`` s (a zombie waiting for whoever
    adopted it counts as exited)."""
    import psutil

    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False
