"""``kscale_rf_sincos`` (``kscale/analysis/rfkernel.c``, issue 26) gives numpy's float32 cos and sin bits.

numpy 2.4's float32 cos/sin (``loops_trigonometric.dispatch.cpp``, the FMA3 branch) computed in one pass with
one range reduction for both; values beyond numpy's fast-path bounds (and inf, NaN) go to numpy's own loop.
The reference is ``np.cos`` / ``np.sin`` themselves, compared bit for bit on ~1.1e7 float32 values: random
bit patterns (every exponent, both signs, subnormals, NaN payloads), dense ranges below and across the bounds,
16 ulps either side of k pi/2 and (k + 1/2) pi/2 for |k| <= 80000 (quadrant edges and the quadrant's
rounding), 1000 ulps either side of both bounds,
subnormals, +-0, +-inf, NaNs, the largest float. Then: the load's self-check refuses a sincos that is not
numpy's (a mutated source: a coefficient's last bit, the quadrant's fused multiply-add split, a bound one
ulp up) and the fused pass then calls numpy's loops; ``KSCALE_RF_SINCOS=0`` and a build without hardware
FMA do the same; the fused pass's sums with the sincos equal those with numpy's loops bit for bit.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from kscale.analysis import features as F
from kscale.analysis import rfkernel
from tests.testing_utils import require_binaries
from tests.unit.analysis.test_rf_kernel import _plan


@pytest.fixture(scope="module")
def kern(tmp_path_factory) -> rfkernel.RFKernel:
    require_binaries("cc", install="apt-get install gcc (or set CC to a C compiler)")
    k = rfkernel.load(tmp_path_factory.mktemp("rfkernel"), rfkernel.compiler(), check=False)
    assert k.mode == "fused", k.fused_off
    return k


def _values() -> np.ndarray:
    f32, i32 = np.float32, np.int32
    rng = np.random.default_rng(31)
    parts = [rng.integers(0, 2**32, 4_000_000, dtype=np.uint64).astype(np.uint32).view(f32),
             rng.uniform(-200, 200, 1_000_000).astype(f32), rng.uniform(-1.2e5, 1.2e5, 1_000_000).astype(f32)]
    k = np.arange(-80000, 80001, dtype=np.float64)
    edges = (np.concatenate([k, k + 0.5]) * (np.pi / 2)).astype(f32).view(i32)
    parts.append((edges[:, None] + np.arange(-16, 17, dtype=i32)).ravel().view(f32))
    bounds = np.array([71476.0625, 117435.992], f32).view(i32)
    near = (bounds[:, None] + np.arange(-1000, 1001, dtype=i32)).ravel().view(f32)
    sub = np.arange(0, 2**23, 7, dtype=np.uint32).view(f32)
    parts += [near, -near, sub, -sub, rfkernel.sincos_check_values()]
    return np.concatenate(parts).astype(f32)


def test_sincos_gives_numpys_bits_on_1e7_values(kern):
    x = _values()
    assert len(x) > 10_000_000
    c, s = np.full_like(x, 7.0), np.full_like(x, 7.0)
    rfkernel.call_sincos(kern, x, c, s)
    with np.errstate(invalid="ignore"):
        want_c, want_s = np.cos(x), np.sin(x)
    for name, got, want in (("cos", c, want_c), ("sin", s, want_s)):
        bad = np.flatnonzero(got.view(np.uint32) != want.view(np.uint32))
        assert len(bad) == 0, (name, len(bad), x[bad[:5]], got[bad[:5]], want[bad[:5]])


def test_the_check_values_reach_both_paths(kern):
    """The self-check's values hold values on numpy's fast path, on its slow path for cos only (between the
    bounds) and for both, inf and NaN: each part of kscale_rf_sincos is checked at load."""
    a = np.abs(rfkernel.sincos_check_values())
    assert (a <= 71476.0625).sum() > 1000 and ((a > 71476.0625) & (a <= np.float32(117435.992))).sum() > 100
    assert (a > np.float32(117435.992)).sum() > 100 and np.isinf(a).any() and np.isnan(a).any()


MUTATIONS = {
    "a coefficient's last bit": ("-0x1.555556p-03f", "-0x1.555557p-03f"),
    "the quadrant's fma split into mul + add": ("fmaf(xv, 0x1.45f306p-1f, 0x1.8p23f)", "(xv * 0x1.45f306p-1f + 0x1.8p23f)"),
    "the sin bound one ulp up": ("#define KS_SIN_MAX 117435.992f", "#define KS_SIN_MAX 117436.0f"),
    "the cos bound one ulp up": ("#define KS_COS_MAX 71476.0625f", "#define KS_COS_MAX 71476.0703125f"),
}


@pytest.mark.parametrize("what", list(MUTATIONS))
def test_load_refuses_a_sincos_that_is_not_numpys(what, kern, tmp_path, monkeypatch):
    """A source mutated in one place builds a sincos whose bits differ from numpy's somewhere: the load's
    self-check refuses it, the kernel stays fused on numpy's loops (sincos_off says where), and the full
    comparison above fails on it too."""
    old, new = MUTATIONS[what]
    src = rfkernel.SOURCE.read_text()
    assert src.count(old) == 1
    mutated = tmp_path / "rfkernel.c"
    mutated.write_text(src.replace(old, new))
    monkeypatch.setattr(rfkernel, "SOURCE", mutated)
    k = rfkernel.load(tmp_path / "cache", rfkernel.compiler())
    assert (k.mode, k.trig_kind, k.trig_flag) == ("fused", "numpy", 0) and "differs from numpy's" in k.sincos_off
    with pytest.raises(AssertionError):
        test_sincos_gives_numpys_bits_on_1e7_values(replace(k, own_trig=True))


def test_sincos_off_by_environment(tmp_path, monkeypatch):
    require_binaries("cc", install="apt-get install gcc (or set CC to a C compiler)")
    monkeypatch.setenv("KSCALE_RF_SINCOS", "0")
    k = rfkernel.load(tmp_path, rfkernel.compiler())
    assert (k.mode, k.trig_kind) == ("fused", "numpy") and "KSCALE_RF_SINCOS" in k.sincos_off
    monkeypatch.setenv("KSCALE_RF_SINCOS", "1")
    assert rfkernel.load(tmp_path, rfkernel.compiler()).trig_kind == "sincos"


def test_a_build_without_hardware_fma_uses_numpys_loops(tmp_path, monkeypatch):
    """Without -march=native (baseline x86-64: fmaf a libm call) the sincos is exact but slow: not used."""
    require_binaries("cc", install="apt-get install gcc (or set CC to a C compiler)")
    monkeypatch.setattr(rfkernel, "FLAGS", tuple(f for f in rfkernel.FLAGS if not f.startswith("-march")))
    k = rfkernel.load(tmp_path, rfkernel.compiler())
    assert (k.mode, k.trig_kind) == ("fused", "numpy") and "fused multiply-add" in k.sincos_off


def test_fused_sums_with_sincos_equal_those_with_numpys_loops(kern):
    """The whole fused pass (bench-like configs, l2 and standardize, runs across blocks and threads) gives
    the same sums bit for bit with kscale_rf_sincos as with numpy's loops."""
    assert kern.trig_kind == "sincos", kern.sincos_off
    rng = np.random.default_rng(12)
    x = (rng.standard_normal((301, 16)) * 2).astype(np.float16)
    smp = F.BlockSamples.of(np.sort(rng.integers(0, 17, 301)))
    plan, target = _plan(16, 100, threads=2, batch_rows=64)
    got = F._per_sample_rf_kernel(plan, target, x, smp, kern)
    want = F._per_sample_rf_kernel(plan, target, x, smp, replace(kern, own_trig=False))
    assert np.abs(got).max() > 1
    np.testing.assert_array_equal(got, want)
