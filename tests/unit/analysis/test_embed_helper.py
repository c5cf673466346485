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
from tests.testing_utils import process_gone, require_module

require_module("openTSNE", install="pip install -e '.[analysis]'")


def _keys(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"image": rng.normal(1.0, 1.0, size=(90, 2, 4)), "text": rng.normal(0.0, 1.0, size=(70, 2, 4))}




def test_helper_maps_equal_maps_in_place_and_run_at_lowest_priority():
    keys = _keys(0)
    here = E.maps(keys, ["pca", "tsne"], 60, 10.0, 3)
    with MapsHelper() as helper:
        pid = helper.pid()
        assert os.getpriority(os.PRIO_PROCESS, pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 19)
        pending = [E.maps(keys, ["pca", "tsne"], 60, 10.0, 3, helper) for _ in range(2)]  # queued, in order
        assert isinstance(pending[0]["tsne"], E._Pending)  # computed over there
        got = [E.resolved(p, 10.0, 3) for p in pending]
    assert process_gone(pid)  # closed: the helper ended with its input
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
    assert process_gone(helper_pid), "the helper outlived its killed driver"
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


def _within(seconds: float, fn):
    """``fn()``'s result, or the test fails after ``seconds`` (a regression must not hang the suite)."""
    import threading

    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001  (re-raised below, in the test's thread)
            box["error"] = err

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still waiting after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


NOISY = '''
import os, sys
os.write(1, b"\\x00\\x01 stray bytes on fd 1 at start-up\\n")  # before any of kscale's code runs
import kscale.analysis.embed as E
_real = E.tsne_2d

def noisy(*args, **kwargs):  # a library that writes to stdout while it works
    os.write(1, b"\\x07 stray bytes from C\\n")
    print("a stray print", flush=True)
    sys.__stdout__.write("stray text on the real stdout\\n")
    sys.__stdout__.flush()
    return _real(*args, **kwargs)

E.tsne_2d = noisy
'''


def test_stray_writes_to_the_helpers_stdout_do_not_break_its_answers(tmp_path, monkeypatch):
    """Issue 21 item 13: one write to the helper's stdout broke the framing and the maps waited forever.
    A ``sitecustomize`` (imported by the child at start-up, from PYTHONPATH) writes to fd 1 and wraps
    ``tsne_2d`` to write while it works; the answers come on a private pipe and are the maps in place."""
    (tmp_path / "sitecustomize.py").write_text(NOISY)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    keys = _keys(3)
    here = E.maps(keys, ["tsne"], 50, 10.0, 2)
    with MapsHelper() as helper:
        pending = [E.maps(keys, ["tsne"], 50, 10.0, 2, helper) for _ in range(2)]
        got = [_within(120, lambda p=p: p["tsne"].future.result(timeout=100)) for p in pending]
        assert _within(60, helper.pid) > 0
    for g in got:
        np.testing.assert_array_equal(g, here["tsne"][0])


def test_a_reader_that_dies_fails_the_pending_maps_at_once(monkeypatch):
    """Whatever ends the reader thread (here: a garbled answer it cannot handle), every pending map fails
    with HelperDied within seconds and is computed in place; later maps fail at once."""
    from kscale.analysis import maps_helper

    real, calls = maps_helper._recv, []

    def garbled_after_one(stream):
        msg = real(stream)
        calls.append(msg)
        if len(calls) > 1:
            raise RuntimeError("a garbled answer")  # the reader's bug or a cut stream: it ends here
        return msg

    monkeypatch.setattr(maps_helper, "_recv", garbled_after_one)
    keys = _keys(4)
    here = E.maps(keys, ["tsne"], 40, 8.0, 0)
    with MapsHelper() as helper:
        assert _within(60, helper.pid) > 0  # the first answer is read
        pending = [E.maps(keys, ["tsne"], 40, 8.0, 0, helper) for _ in range(3)]
        t0 = time.monotonic()
        for p in pending:
            with pytest.raises(HelperDied, match="could not be read"):
                _within(60, lambda p=p: p["tsne"].future.result())
        assert time.monotonic() - t0 < 60
        got = E.resolved(pending[0], 8.0, 0)  # computed here
        with pytest.raises(HelperDied):
            helper.tsne(np.zeros((5, 2)), 2.0, 0).result(timeout=1)
    np.testing.assert_array_equal(got["tsne"][0], here["tsne"][0])


def test_a_stuck_helper_is_given_up_after_the_stall_bound(tmp_path):
    """A helper that never answers (here: stopped with SIGSTOP) does not hold a map's result() forever:
    after ``stall_s`` busy without an answer it is killed and the map is computed in place."""
    keys = _keys(5)
    here = E.maps(keys, ["tsne"], 40, 8.0, 1)
    with MapsHelper() as helper:
        pid = _within(60, helper.pid)  # up (openTSNE imported: seconds under load, within the default bound)
        helper.stall_s = 2.0
        os.kill(pid, signal.SIGSTOP)  # the helper process this test started
        pending = E.maps(keys, ["tsne"], 40, 8.0, 1, helper)
        t0 = time.monotonic()
        got = _within(60, lambda: E.resolved(pending, 8.0, 1))  # result() without a timeout, bounded
        assert 2.0 <= time.monotonic() - t0 < 60
    np.testing.assert_array_equal(got["tsne"][0], here["tsne"][0])
    assert process_gone(pid)
