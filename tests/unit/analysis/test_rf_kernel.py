"""The compiled random-feature kernel (``kscale/analysis/rfkernel.c``, issue 26) gives today's sums.

The reference is ``features._per_sample_rf_reference`` (itself checked bit for bit against
``np.add.reduceat`` in test_analysis_exactness.py). Equal means 1e-9 relative in every (sample, config,
part) row, as the bench's ``max_rel_diff_per_row``. The equality tests load the kernel without its
self-check (``load(check=False)``), so that a broken kernel fails them instead of being refused and
replaced by the numpy path. Cases: the three normalisations, both kernels, bandwidth multiples that are
powers of two of each other and one that is not (3), configs out of normalisation order, D not a multiple
of the kernel's widths (45, 100), blocks and tiles small enough that runs cross tiles, blocks and threads,
one-row batches and one-row samples, threads 1-3, in both modes of the kernel path (the fused pass and the
tiles). Then: arguments bit-equal to numpy's, numpy's cos/sin loops called from C bit-equal to np.cos/np.sin,
mergeability,
the fallback without a compiler, the atomic build by two processes at once, ``KSCALE_RF_KERNEL=0``, and
the self-check refusing a wrong kernel.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from kscale.analysis import features as F
from kscale.analysis import rfkernel
from tests.testing_utils import require_binaries

from tests.unit.analysis.rf_plans import (  # noqa: F401
    NORMS, bench_shape_case, rf_plan as _plan, sample_ids as _ids,
)
REPO = Path(__file__).resolve().parents[3]


def _need_cc() -> None:
    require_binaries("cc", install="apt-get install gcc (or set CC to a C compiler)")


@pytest.fixture(scope="module")
def kern(tmp_path_factory) -> rfkernel.RFKernel:
    """The kernel built from this tree's source into a fresh cache, not self-checked (see module doc), with
    numpy's cos/sin loops for the fused pass (readable with the pinned numpy)."""
    _need_cc()
    k = rfkernel.load(tmp_path_factory.mktemp("rfkernel"), rfkernel.compiler(), check=False)
    assert k.mode == "fused", k.fused_off
    return k


@pytest.fixture(params=["fused", "fused-numpy-trig", "tiles"])
def lib(request, kern) -> rfkernel.RFKernel:
    """Both modes of the kernel path: the fused pass (``kscale_rf_block``; cos/sin by ``kscale_rf_sincos``, or
    by numpy's loops called from C) and the tiles (``kscale_rf_args``, numpy's cos/sin, ``kscale_rf_sums``:
    what runs when numpy's loop table cannot be read)."""
    if request.param == "fused":
        assert kern.trig_kind == "sincos", kern.sincos_off
        return kern
    return replace(kern, own_trig=False) if request.param == "fused-numpy-trig" else replace(kern, loops=None)


@pytest.fixture
def fresh(monkeypatch):
    """Forget the process's kernel before and after (the tests change CC, PATH, KSCALE_CACHE)."""
    rfkernel.reset()
    yield
    rfkernel.reset()


def _row_err(got: np.ndarray, ref: np.ndarray) -> float:
    """Worst |got - ref| per (sample, config, part) row relative to that row's largest |ref|."""
    return float((np.abs(got - ref).max(axis=-1) / np.maximum(np.abs(ref).max(axis=-1), 1e-300)).max())


@pytest.mark.parametrize("layout,D,shuffle,multiples", [
    ("mixed", 24, False, (0.5, 1.0, 2.0, 3.0)), ("rows", 45, False, (0.5, 1.0, 2.0)),
    ("whole", 100, True, (0.5, 1.0, 2.0, 3.0)), ("mixed", 45, True, (1.0, 3.0)),
    ("mixed", 100, False, (0.25, 1.0, 4.0))])
@pytest.mark.parametrize("threads,batch_rows,block_rows,tile_rows", [(1, 2048, 128, 16), (2, 64, 10, 3),
                                                                     (3, 3, 3, 2)])
def test_kernel_sums_equal_the_reference(lib, layout, D, shuffle, multiples, threads, batch_rows, block_rows,
                                         tile_rows, monkeypatch):
    """Every (sample, config, part) row of the kernel's sums equals the reference's to 1e-9 relative
    (batches of 3 rows over 301 rows end in a one-row batch)."""
    monkeypatch.setattr(F, "_BLOCK_ROWS", block_rows)
    monkeypatch.setattr(F, "_KERNEL_TILE_VALUES", tile_rows * D)
    rng = np.random.default_rng(7)
    n, d = 101 if layout == "rows" else 301, 8
    x = (rng.standard_normal((n, d)) * 2).astype(np.float16)
    smp = F.BlockSamples.of(_ids(layout, n, rng))
    plan, target = _plan(d, D, batch_rows=batch_rows, threads=threads, multiples=multiples, shuffle=shuffle)
    got = F._per_sample_rf_kernel(plan, target, x, smp, lib)
    ref = F._per_sample_rf_reference(plan, target, x, smp)
    assert got.shape == ref.shape == (len(smp.ids_S), len(plan.configs), 2, D)
    assert np.abs(ref).min(axis=-1).max() > 0
    assert _row_err(got, ref) <= 1e-9


def test_kernel_sums_at_the_bench_shape_equal_the_reference(lib):
    """The bench's shape (d 128, D 4096, the 18 default configs, samples of 100 rows crossing blocks and
    tiles), two threads: every row equal to 1e-9 relative."""
    plan, target, x, smp = bench_shape_case()
    got = F._per_sample_rf_kernel(plan, target, x, smp, lib)
    assert _row_err(got, F._per_sample_rf_reference(plan, target, x, smp)) <= 1e-9


@pytest.mark.parametrize("D,l2", [(45, False), (45, True), (4096, True), (1, False)])
def test_kernel_arguments_are_numpys_bits(kern, D, l2):
    """``kscale_rf_args`` gives numpy's float32 arguments bit for bit: base = float32(z * scale) (float64
    product rounded once; for l2 z = raw / norm in float64), derived = float32 base * power of two;
    values across float32's range, and the groups' layouts as the analysis builds them."""
    rng = np.random.default_rng(D)
    T = 7
    z = rng.standard_normal((T, D)) * np.exp(rng.uniform(-30, 30, (T, D)))
    norm = rng.uniform(0.01, 100, T) if l2 else None
    plan, target = _plan(4, D, multiples=(0.5, 1.0, 2.0, 3.0), shuffle=True)
    for grp in (F._Group.of(g) for g in F._arg_steps(plan, target).values()):
        kg = F._KernelGroup.of(grp)
        G = len(grp.steps)
        want = np.empty((G, T, D), np.float32)
        zz = z if norm is None else np.divide(z, norm[:, None])
        for g, st in enumerate(grp.steps):  # as _FastWork.run
            if st.source < 0:
                np.multiply(zz, st.scale_D, out=want[g], casting="same_kind")
        for g, st in enumerate(grp.steps):
            if st.source >= 0:
                np.multiply(want[grp.slot[st.source]], np.float32(st.factor), out=want[g])
        got = np.full((G, T, D), np.nan, np.float32)
        rfkernel.call_args(kern, z, norm, kg.scale_BD, kg.base_slot, kg.src, kg.dst, kg.factor, got)
        assert len(kg.src) > 0
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_sums_merge_over_halves(lib, threads, monkeypatch):
    """chunk_sums through ``_per_sample_rf`` with the kernel: two halves of a block merged equal the whole
    to 1e-12, and the whole equals the numpy path's to 1e-9 per row."""
    monkeypatch.setattr(F, "_BLOCK_ROWS", 9)
    monkeypatch.setattr(F, "_KERNEL_TILE_VALUES", 4 * 45)
    monkeypatch.setattr(F, "_rf_kernel", lambda plan: lib)
    rng = np.random.default_rng(3)
    n, d = 400, 8
    x = (rng.standard_normal((n, d)) * 2).astype(np.float16)
    ids = np.sort(rng.integers(0, 60, n))
    cut = int(np.searchsorted(ids, ids[n // 2]))  # a sample boundary: samples lie in one block

    def side(lo, hi):
        return F.side_block(plan, target, x[lo:hi, None, :], ids[lo:hi]).sums

    plan, target = _plan(d, 45, threads=threads, batch_rows=64)
    whole = side(0, n)
    halves = side(0, cut).merge(side(cut, n))
    monkeypatch.setattr(F, "_rf_kernel", lambda plan: None)
    ref = side(0, n)
    for name in ("rf_KC2D", "rfself_KCD"):
        np.testing.assert_allclose(getattr(halves, name), getattr(whole, name), rtol=1e-12, atol=0)
        assert _row_err(getattr(whole, name), getattr(ref, name)) <= 1e-9
    assert whole.rf_KC2D.any()


def test_a_nan_key_poisons_only_its_own_sample(lib):
    """A key with a NaN makes its own sample's sums NaN and no other's, as in the reference (and the numpy fast
    path, ``test_rf_fast.py``)."""
    x = np.random.default_rng(0).standard_normal((100, 8))
    x[17, 3] = np.nan
    smp = F.BlockSamples.of(np.arange(100) // 9)
    plan, target = _plan(8, 45, threads=2, batch_rows=64)
    got = F._per_sample_rf_kernel(plan, target, x, smp, lib)
    ref = F._per_sample_rf_reference(plan, target, x, smp)
    assert np.flatnonzero(np.isnan(got).any(axis=(1, 2, 3))).tolist() == [1]
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    assert _row_err(np.nan_to_num(got), np.nan_to_num(ref)) <= 1e-9


def test_per_sample_rf_runs_the_kernel_for_float32_and_numpy_for_float64(kern, monkeypatch):
    """``_per_sample_rf`` (what the analysis runs) takes the kernel path for float32 plans when the kernel
    loads, the numpy fast path for float64 plans (the kernel is float32 only)."""
    monkeypatch.setattr(rfkernel, "kernel", lambda: kern)
    calls = []
    monkeypatch.setattr(F, "_per_sample_rf_fast", lambda *a: calls.append("fast") or "fast")
    monkeypatch.setattr(F, "_per_sample_rf_kernel", lambda *a: calls.append(("kernel", a[-1])) or "kernel")
    smp = F.BlockSamples.of(np.zeros(3, int))
    assert F._per_sample_rf(*_plan(4, 8), np.zeros((3, 4)), smp) == "kernel"
    assert F._per_sample_rf(*_plan(4, 8, dtype="float64"), np.zeros((3, 4)), smp) == "fast"
    assert calls == [("kernel", kern), "fast"]


def test_kernel_off_runs_numpy_without_a_warning(fresh, monkeypatch):
    """``KSCALE_RF_KERNEL=0``: no kernel, no build, no warning; the numpy path's rows."""
    monkeypatch.setenv("KSCALE_RF_KERNEL", "0")
    monkeypatch.setattr(rfkernel, "load", lambda *a, **k: pytest.fail("built with KSCALE_RF_KERNEL=0"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rfkernel.kernel() is None
        plan, target = _plan(8, 24)
        x = np.random.default_rng(0).standard_normal((50, 8))
        smp = F.BlockSamples.of(np.arange(50) // 7)
        got = F._per_sample_rf(plan, target, x, smp)
        np.testing.assert_array_equal(got, F._per_sample_rf_fast(plan, target, x, smp))


@pytest.mark.parametrize("how", ["CC=/nonexistent", "PATH without cc", "CC=false"])
def test_no_compiler_falls_back_to_numpy_with_one_warning(how, fresh, tmp_path, monkeypatch):
    """No compiler (or one that fails): one RuntimeWarning naming why, then the numpy path, same rows."""
    monkeypatch.setenv("KSCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("KSCALE_RF_KERNEL", raising=False)
    if how == "CC=/nonexistent":
        monkeypatch.setenv("CC", "/nonexistent")
        reason = "no C compiler"
    elif how == "PATH without cc":
        monkeypatch.delenv("CC", raising=False)
        monkeypatch.setenv("PATH", str(tmp_path))
        reason = "no C compiler"
    else:
        require_binaries("false", install="coreutils")
        monkeypatch.setenv("CC", "false")
        reason = "failed"
    plan, target = _plan(8, 24)
    x = np.random.default_rng(0).standard_normal((50, 8))
    smp = F.BlockSamples.of(np.arange(50) // 7)
    with pytest.warns(RuntimeWarning, match=reason) as record:
        got = F._per_sample_rf(plan, target, x, smp)
        again = F._per_sample_rf(plan, target, x, smp)
    assert len([w for w in record if "random-feature kernel" in str(w.message)]) == 1
    np.testing.assert_array_equal(got, F._per_sample_rf_fast(plan, target, x, smp))
    np.testing.assert_array_equal(again, got)
    assert _row_err(got, F._per_sample_rf_reference(plan, target, x, smp)) <= 1e-9
    assert not list((tmp_path / "cache").rglob("*.so"))


_SLOW_CC = """#!/bin/sh
# cc, but its output file exists (empty) until two builds have started (at most 10 s), then 1 s more
prev=""; out=""
for a in "$@"; do [ "$prev" = "-o" ] && out="$a"; prev="$a"; done
if [ -n "$out" ]; then
  : > "$out"; echo "$out" >> "$(dirname "$out")/../builds.log"; i=0
  while [ "$(ls -A "$(dirname "$out")" | wc -l)" -lt 2 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
  sleep 1
fi
exec cc "$@"
"""

_LOAD = """
import sys
from pathlib import Path
from kscale.analysis import rfkernel
k = rfkernel.load(Path(sys.argv[1]), rfkernel.compiler())
print(k.path)
"""


def _size(f: Path) -> int:
    try:
        return f.stat().st_size
    except FileNotFoundError:
        return -1


def test_two_processes_building_at_once_both_load(tmp_path):
    """Two processes build into an empty cache at once (the second starts while the first compiles, with a
    compiler whose output file lies empty until both builds have started): the final name never holds a
    partial library, both
    load a self-checked library, one file remains and no temporary file is left."""
    _need_cc()
    cc = tmp_path / "slowcc"
    cc.write_text(_SLOW_CC)
    cc.chmod(cc.stat().st_mode | stat.S_IXUSR)
    cache = tmp_path / "cache"
    env = {**os.environ, "CC": str(cc), "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-c", _LOAD, str(cache)]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (cache.is_dir() and any(cache.iterdir())):  # the first build's output exists (empty)
        assert time.monotonic() < deadline and first.poll() is None, first.communicate()
        time.sleep(0.02)
    second = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = set()  # final names seen before their library was whole (the retry of load() would hide them)
    while first.poll() is None or second.poll() is None:
        assert time.monotonic() < deadline + 120
        partial |= {f.name for f in cache.glob("rfkernel-*.so") if _size(f) == 0}
        time.sleep(0.01)
    assert not partial
    outs = [p.communicate(timeout=120) for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], outs
    assert len((tmp_path / "builds.log").read_text().split()) == 2  # both built, at once (the barrier)
    paths = {o.strip() for o, _ in outs}
    assert len(paths) == 1
    assert [p.name for p in cache.iterdir()] == [Path(paths.pop()).name]


def test_a_damaged_cached_library_is_built_again(tmp_path):
    """A cached library that does not load (here: empty, as a killed copy would leave it) is rebuilt once."""
    _need_cc()
    first = rfkernel.build(tmp_path, rfkernel.compiler())  # built, not loaded (truncating a mapped library: SIGBUS)
    first.write_bytes(b"")
    again = rfkernel.load(tmp_path, rfkernel.compiler())
    assert again.path == first and first.stat().st_size > 0


def test_rows_do_not_depend_on_the_instruction_set(lib, tmp_path, monkeypatch):
    """The kernel built for the baseline x86-64 / generic ISA (no ``-march=native``) gives the native
    build's sums bit for bit: no contraction, no reassociation, so the vector width changes no value."""
    monkeypatch.setattr(rfkernel, "FLAGS", tuple(f for f in rfkernel.FLAGS if not f.startswith("-march")))
    generic = replace(rfkernel.load(tmp_path, rfkernel.compiler()), loops=lib.loops)
    assert generic.path != lib.path
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((203, 16)) * 2).astype(np.float16)
    smp = F.BlockSamples.of(np.sort(rng.integers(0, 9, 203)))
    plan, target = _plan(16, 100, threads=2, batch_rows=64)
    native_sums = F._per_sample_rf_kernel(plan, target, x, smp, lib)
    np.testing.assert_array_equal(F._per_sample_rf_kernel(plan, target, x, smp, generic), native_sums)


@pytest.mark.parametrize("chunk", [1, 5, 64, 4099])
def test_numpys_loops_called_from_c_give_numpys_bits(kern, chunk):
    """numpy's float32 cos/sin inner loops, read from the ufuncs' loop table and called from C in chunks,
    give ``np.cos`` / ``np.sin``'s bits, small and huge arguments alike (numpy's slow path above ~7e4)."""
    rng = np.random.default_rng(chunk)
    x = (rng.standard_normal(4099) * np.exp(rng.uniform(-60, 16, 4099))).astype(np.float32)
    cf, cd, sf, sd = kern.loops
    for fn, data, ufunc in ((cf, cd, np.cos), (sf, sd, np.sin)):
        got = np.full_like(x, np.nan)
        kern.trig(fn, data, x.ctypes.data, got.ctypes.data, len(x), chunk)
        assert np.array_equal(got.view(np.uint32), ufunc(x).view(np.uint32)), ufunc


def test_fused_pass_off_when_the_loops_disagree(tmp_path, monkeypatch):
    """Loops that are not numpy's cos and sin (here swapped) fail the fused self-check: the kernel loads in
    tiles mode, saying why; a loop table that cannot be read does the same."""
    _need_cc()
    cf, cd, sf, sd = rfkernel.numpy_loops()
    monkeypatch.setattr(rfkernel, "numpy_loops", lambda: (sf, sd, cf, cd))
    k = rfkernel.load(tmp_path, rfkernel.compiler())
    assert k.mode == "tiles" and "other bits" in k.fused_off

    def unreadable():
        raise rfkernel.KernelUnavailable("numpy's cos loop table is not laid out as expected")

    monkeypatch.setattr(rfkernel, "numpy_loops", unreadable)
    k = rfkernel.load(tmp_path, rfkernel.compiler())
    assert k.mode == "tiles" and "laid out" in k.fused_off


_NO_NATIVE_CC = """#!/bin/sh
for a in "$@"; do [ "$a" = "-march=native" ] && { echo "unsupported argument 'native'" >&2; exit 1; }; done
exec cc "$@"
"""


def test_a_compiler_without_march_native_builds_portable_code(tmp_path, monkeypatch):
    """A compiler that rejects ``-march=native`` builds the library without it (a name of its own), which
    loads and passes the self-checks (a build without it gives the native build's rows:
    test_rows_do_not_depend_on_the_instruction_set)."""
    _need_cc()
    cc = tmp_path / "nonative"
    cc.write_text(_NO_NATIVE_CC)
    cc.chmod(cc.stat().st_mode | stat.S_IXUSR)
    k = rfkernel.load(tmp_path / "cache", [str(cc)])
    version = subprocess.run([str(cc), "--version"], capture_output=True, text=True).stdout
    portable = tuple(f for f in rfkernel.FLAGS if not f.startswith("-march"))
    assert k.path.name == f"rfkernel-{rfkernel.build_key(version, portable)}.so" and k.mode == "fused"


def test_cache_key_changes_with_cpu_flags_and_compiler(monkeypatch):
    """The library's name hashes the CPU's feature flags (``-march=native``: a shared cache never loads a
    library built for another CPU) and the compiler's version."""
    key = rfkernel.build_key("cc 12", rfkernel.FLAGS)
    assert rfkernel.build_key("cc 13", rfkernel.FLAGS) != key
    assert rfkernel.build_key("cc 12", rfkernel.FLAGS[1:]) != key
    monkeypatch.setattr(rfkernel, "cpu_flags", lambda: "sse2")
    assert rfkernel.build_key("cc 12", rfkernel.FLAGS) != key
    assert "-march=native" in rfkernel.FLAGS and "-ffp-contract=off" in rfkernel.FLAGS
    assert not any("fast-math" in f and not f.startswith("-fno") for f in rfkernel.FLAGS)


def test_self_check_refuses_a_kernel_that_rounds_the_product_in_float32(tmp_path, monkeypatch, fresh):
    """A kernel whose arguments are not numpy's (the product rounded in float32 first) fails the self-check
    at load: kernel() warns and the analysis runs the numpy path."""
    _need_cc()
    bad = tmp_path / "rfkernel.c"
    src = rfkernel.SOURCE.read_text()
    assert "(float)(zr[j] * s[j])" in src
    bad.write_text(src.replace("(float)(zr[j] * s[j])", "((float)zr[j] * (float)s[j])"))
    monkeypatch.setattr(rfkernel, "SOURCE", bad)
    monkeypatch.setenv("KSCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("KSCALE_RF_KERNEL", raising=False)
    with pytest.raises(rfkernel.KernelUnavailable, match="self-check failed: arguments"):
        rfkernel.load(tmp_path / "cache", rfkernel.compiler())
    with pytest.warns(RuntimeWarning, match="self-check failed"):
        assert rfkernel.kernel() is None
