"""The t-SNE maps computed beside the analysis (``maps_helper.MapsHelper``: one child process at the lowest
CPU priority) are the maps computed in place, bit for bit; a helper that died leaves the map to be
computed in place, not lost; errors come back where the map is asked for; the helper starts from any main
(a script read from stdin, as multiprocessing's spawn cannot) and ends when its driver is killed.
Reference: ``embed.tsne_2d`` called here, and openTSNE underneath."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import psutil
import pytest

from kscale.analysis import embed as E
from kscale.analysis.maps_helper import HelperDied, MapsHelper
from tests.testing_utils import require_module

require_module("openTSNE", install="pip install -e '.[analysis]'")


def _keys(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"image": rng.normal(1.0, 1.0, size=(90, 2, 4)), "text": rng.normal(0.0, 1.0, size=(70, 2, 4))}


def _gone(pid: int, within: float = 20.0) -> bool:
    """The process has exited (a zombie waiting for whoever adopted it counts as exited)."""
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def test_helper_maps_equal_maps_in_place_and_run_at_lowest_priority():
    keys = _keys(0)
    here = E.maps(keys, ["pca", "tsne"], 60, 10.0, 3)
    with MapsHelper() as helper:
        pid = helper.pid()
        assert os.getpriority(os.PRIO_PROCESS, pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 19)
        pending = [E.maps(keys, ["pca", "tsne"], 60, 10.0, 3, helper) for _ in range(2)]  # queued, in order
        assert isinstance(pending[0]["tsne"], E._Pending)  # computed over there
        got = [E.resolved(p, 10.0, 3) for p in pending]
    assert _gone(pid)  # closed: the helper ended with its input
    for g in got:
        np.testing.assert_array_equal(g["labels"], here["labels"])
        for method in ("pca", "tsne"):
            np.testing.assert_array_equal(g[method][0], here[method][0])
        assert g["tsne"][1] is None


@pytest.mark.parametrize("noticed", [False, True])
def test_a_dead_helper_leaves_the_map_to_be_computed_here(noticed):
    keys = _keys(1)
    here = E.maps(keys, ["tsne"], 50, 10.0, 5)
    with MapsHelper() as helper:
        os.kill(helper.pid(), signal.SIGKILL)  # the helper process this test started
        if noticed:  # the reader has seen the end: a new map is failed at once
            helper._reader.join(timeout=10)
            with pytest.raises(HelperDied):
                helper.tsne(np.zeros((5, 2)), 2.0, 0).result(timeout=10)
        got = E.resolved(E.maps(keys, ["tsne"], 50, 10.0, 5, helper), 10.0, 5)
    np.testing.assert_array_equal(got["tsne"][0], here["tsne"][0])


def test_an_error_in_the_helper_is_raised_where_the_map_is_asked_for():
    with MapsHelper() as helper:
        bad = {"tsne": E._Pending(helper.tsne("not points", 1.0, 0), None)}
        with pytest.raises(AttributeError, match="shape"):  # the helper's own error, sent back
            E.resolved(bad, 1.0, 0)
        assert helper.pid() > 0  # and the helper goes on


def test_the_helper_starts_from_a_script_on_stdin_and_ends_with_a_killed_driver(tmp_path):
    """multiprocessing's spawn would re-run the caller's main (here: fail on '<stdin>'); a SIGKILLed driver
    must not leave its helper behind."""
    script = textwrap.dedent("""
        import sys, time
        import numpy as np
        from kscale.analysis.maps_helper import MapsHelper
        helper = MapsHelper()
        print(helper.pid(), flush=True)
        x = np.random.default_rng(0).normal(size=(40, 3))
        print(helper.tsne(x, 5.0, 0).result().shape, flush=True)
        time.sleep(600)
    """)
    driver = subprocess.Popen([sys.executable, "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    driver.stdin.write(script)
    driver.stdin.close()
    try:
        helper_pid = int(driver.stdout.readline())
        assert driver.stdout.readline().strip() == "(40, 2)"
    finally:
        driver.kill()  # the driver this test started
        driver.wait()
    assert _gone(helper_pid), "the helper outlived its killed driver"
    assert "Traceback" not in driver.stderr.read()


def test_no_helper_where_no_process_can_start():
    assert MapsHelper.start(python="/nonexistent/python") is None  # the maps are then computed in place
    helper = MapsHelper.start()
    assert helper is not None
    helper.close()


def test_an_answer_that_cannot_be_read_here_fails_only_its_own_map(monkeypatch):
    """E.g. an error class the driver cannot import: that map is computed here, nothing hangs."""
    from kscale.analysis import maps_helper

    real = maps_helper.pickle.loads

    def unreadable_arrays(data):
        value = real(data)
        if isinstance(value, np.ndarray):
            raise AttributeError("Can't get attribute 'Gone' on <module 'elsewhere'>")
        return value

    keys = _keys(2)
    here = E.maps(keys, ["tsne"], 40, 8.0, 1)
    with MapsHelper() as helper:
        monkeypatch.setattr(maps_helper.pickle, "loads", unreadable_arrays)
        pending = E.maps(keys, ["tsne"], 40, 8.0, 1, helper)
        with pytest.raises(HelperDied, match="could not be read"):
            pending["tsne"].future.result(timeout=60)
        got = E.resolved(pending, 8.0, 1)
        assert helper.pid() > 0  # the helper goes on
    np.testing.assert_array_equal(got["tsne"][0], here["tsne"][0])
