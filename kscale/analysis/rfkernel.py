"""The compiled random-feature kernel (``rfkernel.c``): built on first use with the system C compiler,
cached, loaded with ctypes; the numpy path when it cannot be.

:func:`kernel` is what ``features._per_sample_rf`` asks: an :class:`RFKernel` (the C functions of
``rfkernel.c``: the fused pass over a block, which calls numpy's own float32 cos/sin inner loops read from
the ufuncs' loop table (:func:`numpy_loop`); or, in tiles mode, a tile's float32 arguments and its float64
run sums around numpy's ``np.cos``/``np.sin``), or None, in which case the analysis runs the numpy fast
path (same rows, slower). It returns None when
``KSCALE_RF_KERNEL=0``, and, with one warning naming the reason, when there is no compiler, the build
fails, the library does not load or its self-check disagrees with numpy. Never an error.

The build: ``$CC`` (default ``cc``; an argv, no shell) with :data:`FLAGS` into
``$KSCALE_CACHE/rfkernel/rfkernel-<hash>.so`` (default ``~/.cache/kscale``), the hash covering the source,
the flags, the compiler's ``--version``, the machine and, because of ``-march=native``, the CPU's feature
flags: a cache shared by nodes of different CPUs holds one library per CPU kind and never loads one built
for another (SIGILL). Written to a temporary name in the same directory and renamed (atomic), so
processes building at once all end with a whole, loadable library. ``-ffp-contract=off`` and no
``-ffast-math``: every value is numpy's (``rfkernel.c``'s header says why), which :func:`self_check`
verifies at load on a small tile (arguments bit-equal, sums to 1e-12); :func:`self_check_fused` then checks
numpy's loops called from C against ``np.cos``/``np.sin`` bit for bit (else tiles mode, no warning), and
:func:`self_check_sincos` checks ``kscale_rf_sincos`` (numpy 2.4's float32 cos and sin in one pass, one range
reduction for both) against them bit for bit: the fused pass uses it when it agrees, the build has hardware
FMA and ``KSCALE_RF_SINCOS`` is not off, numpy's two loops otherwise (``RFKernel.trig_kind``).

ctypes calls release the GIL, so the analysis' block threads run the kernel in parallel.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).with_name("rfkernel.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-std=c99", "-fPIC", "-shared")
OFF_VALUES = ("0", "false", "no", "off")


class KernelUnavailable(RuntimeError):
    """Why the compiled kernel cannot be used (the analysis then runs the numpy path)."""


@dataclass(frozen=True)
class RFKernel:
    """The loaded library: the C functions (pointers as ints, sizes as int64) and, when the fused pass is
    on, numpy's float32 cos and sin loops (``loops``: cos function, cos data, sin function, sin data, as
    ints) that ``kscale_rf_block`` calls; ``loops`` is None (``fused_off`` says why) when numpy's loop
    table could not be read or its bits disagreed, and the analysis then runs the tiles (``args``, numpy's
    cos/sin, ``sums``)."""

    path: Path
    args: object  # kscale_rf_args
    sums: object  # kscale_rf_sums
    block: object = None  # kscale_rf_block
    trig: object = None  # kscale_rf_trig
    loops: tuple[int, int, int, int] | None = None
    fused_off: str = ""
    sincos: object = None  # kscale_rf_sincos
    own_trig: bool = False
    sincos_off: str = ""

    @property
    def mode(self) -> str:
        return "fused" if self.loops is not None else "tiles"

    @property
    def trig_kind(self) -> str:
        """What computes cos and sin in the fused pass: ``sincos`` (``kscale_rf_sincos``, numpy's bits in one
        pass, checked at load by :func:`self_check_sincos`), ``numpy`` (numpy's two loops; ``sincos_off``
        says why), or ``ufunc`` in tiles mode (np.cos/np.sin from Python)."""
        if self.loops is None:
            return "ufunc"
        return "sincos" if self.own_trig else "numpy"

    @property
    def trig_flag(self) -> int:
        """``kscale_rf_block``'s last argument: KS_TRIG_SINCOS (1) or KS_TRIG_NUMPY (0)."""
        return 1 if self.own_trig and self.loops is not None else 0


_P, _I = ctypes.c_void_p, ctypes.c_int64
_lock = threading.Lock()
_state: dict[str, object] = {}


def sincos_enabled() -> bool:
    """False when ``KSCALE_RF_SINCOS`` says 0/false/no/off: the fused pass calls numpy's cos and sin loops
    (the bench's ``kernel-numpy-trig``), not ``kscale_rf_sincos``."""
    return os.environ.get("KSCALE_RF_SINCOS", "1").strip().lower() not in OFF_VALUES


def enabled() -> bool:
    """False when ``KSCALE_RF_KERNEL`` says 0/false/no/off (the numpy path, no warning)."""
    return os.environ.get("KSCALE_RF_KERNEL", "1").strip().lower() not in OFF_VALUES


def kernel() -> RFKernel | None:
    """The kernel of this process (built or loaded once), or None: disabled, or unavailable (one warning)."""
    if not enabled():
        return None
    with _lock:
        if "result" not in _state:
            try:
                _state["result"] = load(cache_dir(), compiler())
            except KernelUnavailable as e:
                _state["result"] = None
                warnings.warn(f"kscale: the compiled random-feature kernel is not used ({e}); the analysis "
                              "runs the numpy path (same rows, slower)", RuntimeWarning, stacklevel=2)
        return _state["result"]


def reset() -> None:
    """Forget this process's kernel (tests): the next :func:`kernel` builds or loads again."""
    with _lock:
        _state.clear()


def cache_dir() -> Path:
    return Path(os.environ.get("KSCALE_CACHE") or Path.home() / ".cache" / "kscale") / "rfkernel"


def compiler() -> list[str]:
    """``$CC`` as an argv (``cc`` when unset)."""
    return shlex.split(os.environ.get("CC") or "cc")


def load(cache: Path, cc: list[str], *, check: bool = True) -> RFKernel:
    """Build (unless cached) and load the library, then :func:`self_check` it (``check=False``: the tests
    that compare a kernel with numpy themselves); raises KernelUnavailable."""
    path = build(cache, cc)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:  # a damaged cached file (a full disk, a killed copy): build it again, once
        path = build(cache, cc, again=True)
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            raise KernelUnavailable(f"cannot load {path}: {e}") from e
    lib.kscale_rf_args.argtypes = [_P, _P, _I, _I, _P, _P, _I, _P, _P, _P, _I, _P]
    lib.kscale_rf_sums.argtypes = [_P, _P, _I, _I, _I, _P, _I, _P, _P]
    lib.kscale_rf_block.argtypes = [_P, _P, _I, _P, _P, _I, _P, _P, _P, _I, _I, _I, _P, _I, _P, _P, _P, _P, _P, _P,
                                     ctypes.c_int]
    lib.kscale_rf_trig.argtypes = [_P, _P, _P, _P, _I, _I]
    lib.kscale_rf_sincos.argtypes = [_P, _P, _P, _I, _P, _P, _P, _P]
    lib.kscale_rf_sincos_native.argtypes = []
    lib.kscale_rf_args.restype = lib.kscale_rf_sums.restype = lib.kscale_rf_trig.restype = None
    lib.kscale_rf_sincos.restype = None
    lib.kscale_rf_block.restype = lib.kscale_rf_sincos_native.restype = ctypes.c_int
    k = RFKernel(path, lib.kscale_rf_args, lib.kscale_rf_sums, lib.kscale_rf_block, lib.kscale_rf_trig,
                 sincos=lib.kscale_rf_sincos)
    if check:
        self_check(k)
    try:
        fused = replace(k, loops=numpy_loops())
        if check:
            self_check_fused(fused)
    except KernelUnavailable as e:
        return replace(k, fused_off=str(e))
    try:
        if not sincos_enabled():
            raise KernelUnavailable("KSCALE_RF_SINCOS is off")
        if not lib.kscale_rf_sincos_native():
            raise KernelUnavailable("this build has no hardware fused multiply-add (fmaf would be a libm call)")
        self_check_sincos(fused)  # always, even with check=False: it decides the trig, not the tests' load
        return replace(fused, own_trig=True)
    except KernelUnavailable as e:
        return replace(fused, sincos_off=str(e))


def build(cache: Path, cc: list[str], *, again: bool = False) -> Path:
    """The cached library for this source, compiler, flags and CPU, compiled if missing or ``again``
    (written to a temporary name, then renamed over the final one: atomic). A compiler that rejects
    ``-march=native`` (gcc on ppc64le, old Apple clang) builds with the other flags (portable code, the
    same values: the library's name hashes its flags)."""
    if not cc or shutil.which(cc[0]) is None:
        raise KernelUnavailable(f"no C compiler: {cc[0] if cc else '$CC'!r} not found")
    if not SOURCE.is_file():
        raise KernelUnavailable(f"{SOURCE} is missing from the installation")
    try:
        version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelUnavailable(f"{cc[0]} --version failed: {e}") from e
    portable = tuple(f for f in FLAGS if not f.startswith("-march"))
    try:
        return _build_with(cache, cc, version, FLAGS, again)
    except KernelUnavailable as native:
        if portable == FLAGS:
            raise
        try:
            return _build_with(cache, cc, version, portable, again)
        except KernelUnavailable:
            raise native from None


def _build_with(cache: Path, cc: list[str], version: str, flags: tuple[str, ...], again: bool) -> Path:
    path = cache / f"rfkernel-{build_key(version, flags)}.so"
    if path.is_file() and not again:
        return path
    try:
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".so", dir=cache)
        os.close(fd)
    except OSError as e:
        raise KernelUnavailable(f"cannot write the kernel cache {cache}: {e}") from e
    try:
        done = subprocess.run([*cc, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            raise KernelUnavailable(f"{shlex.join(cc)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
        os.replace(tmp, path)
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelUnavailable(f"{shlex.join(cc)} failed: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def build_key(compiler_version: str, flags: tuple[str, ...]) -> str:
    """Hash of what the library's code depends on: source, flags, compiler, machine and CPU features."""
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(flags).encode(), compiler_version.encode(),
                 platform.machine().encode(), cpu_flags().encode()):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:24]


def cpu_flags() -> str:
    """This CPU's feature flags (``/proc/cpuinfo``; else the processor's name): ``-march=native`` builds
    for them, so the cache key must change with them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() in ("flags", "Features"):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return f"{platform.processor()} {platform.platform()}"


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def call_args(k: RFKernel, z_TD: np.ndarray, norm_T: np.ndarray | None, scale_BD: np.ndarray,
              base_slot: np.ndarray, src: np.ndarray, dst: np.ndarray, factor: np.ndarray,
              args_GTD: np.ndarray) -> None:
    """``kscale_rf_args`` on contiguous arrays (the tests' and the self-check's entry; the analysis calls
    the C function with precomputed pointers)."""
    T, D = z_TD.shape
    k.args(_ptr(z_TD), None if norm_T is None else _ptr(norm_T), T, D, _ptr(scale_BD), _ptr(base_slot),
           len(base_slot), _ptr(src), _ptr(dst), _ptr(factor), len(src), _ptr(args_GTD))


def call_sums(k: RFKernel, cos_GTD: np.ndarray, sin_GTD: np.ndarray, bounds: np.ndarray,
              dests: list[np.ndarray], config: np.ndarray) -> None:
    """``kscale_rf_sums`` on contiguous arrays: ``dests[r][config[g]] += `` run r's column sums."""
    G, T, D = cos_GTD.shape
    ptrs = np.array([_ptr(d) for d in dests], np.uint64)
    k.sums(_ptr(cos_GTD), _ptr(sin_GTD), G, T, D, _ptr(bounds), len(dests), _ptr(ptrs), _ptr(config))


def _check_tile(rng: np.random.Generator, T: int, D: int) -> tuple:
    """The self-checks' tile: projections (T, D), l2 norms, two base configs' scales written to stack slots
    2 and 0 (out of order), three power-of-two multiples of them into slots 1, 3 and 4."""
    return (rng.standard_normal((T, D)) * 40, rng.uniform(0.5, 3, T),
            np.ascontiguousarray(rng.uniform(0.1, 2, (2, D))), np.array([2, 0]), np.array([2, 0, 2]),
            np.array([1, 3, 4]), np.array([2.0, 0.5, 4.0], np.float32))


def self_check(k: RFKernel) -> None:
    """A small tile (D not a multiple of the kernel's widths, an l2 tile, two runs, configs out of order)
    against numpy: arguments bit-equal, sums to 1e-12 relative; raises KernelUnavailable otherwise."""
    T, D, C = 5, 45, 5
    z, norm, scale, base, src, dst, factor = _check_tile(np.random.default_rng(26), T, D)
    for nrm in (None, norm):
        zz = z if nrm is None else z / nrm[:, None]
        want = np.empty((5, T, D), np.float32)
        for b, g in enumerate(base):
            np.multiply(zz, scale[b], out=want[g], casting="same_kind")
        for s, g, f in zip(src, dst, factor):
            np.multiply(want[s], f, out=want[g])
        got = np.full((5, T, D), np.nan, np.float32)
        call_args(k, z, nrm, scale, base.astype(np.int64), src.astype(np.int64), dst.astype(np.int64), factor,
                  got)
        if not np.array_equal(got.view(np.uint32), want.view(np.uint32)):
            raise KernelUnavailable(f"self-check failed: arguments differ from numpy's ({k.path})")
    cos, sin = np.cos(want), np.sin(want)
    config = np.array([3, 0, 4, 1, 2], np.int64)
    bounds = np.array([0, 2, 5], np.int64)
    dests = [np.zeros((C, 2, D)), np.ones((C, 2, D))]
    call_sums(k, cos, sin, bounds, dests, config)
    for r, dest in enumerate(dests):
        want_sums = np.full((C, 2, D), float(r))
        for g, c in enumerate(config):
            want_sums[c, 0] += cos[g, bounds[r]:bounds[r + 1]].sum(0, dtype=np.float64)
            want_sums[c, 1] += sin[g, bounds[r]:bounds[r + 1]].sum(0, dtype=np.float64)
        if not np.allclose(dest, want_sums, rtol=1e-12, atol=0):
            raise KernelUnavailable(f"self-check failed: run sums differ from numpy's ({k.path})")


class _UFuncHead(ctypes.Structure):
    """The leading fields of numpy's ``PyUFuncObject`` (``numpy/ufuncobject.h``, part of numpy's stable
    C ABI): its inner-loop table ``functions`` / ``data`` and the ``types`` of each loop."""

    _fields_ = [("ob_refcnt", ctypes.c_ssize_t), ("ob_type", ctypes.c_void_p), ("nin", ctypes.c_int),
                ("nout", ctypes.c_int), ("nargs", ctypes.c_int), ("identity", ctypes.c_int),
                ("functions", ctypes.c_void_p), ("data", ctypes.c_void_p), ("ntypes", ctypes.c_int),
                ("reserved1", ctypes.c_int), ("name", ctypes.c_char_p), ("types", ctypes.c_void_p)]


def numpy_loop(ufunc: np.ufunc) -> tuple[int, int]:
    """(function, data) of ``ufunc``'s float32 -> float32 inner loop, read from its loop table (the loop
    ``np.cos(float32)`` runs: :func:`self_check_fused` compares their bits); raises KernelUnavailable."""
    import sys

    if getattr(sys, "_is_gil_enabled", lambda: True)() is False or not hasattr(sys, "getrefcount"):
        raise KernelUnavailable("numpy's loop table is not read on this Python build")
    head = _UFuncHead.from_address(id(ufunc))
    types = list(ufunc.types)
    if (head.name != ufunc.__name__.encode() or (head.nin, head.nout, head.nargs) != (1, 1, 2)
            or head.ntypes != len(types) or "f->f" not in types):
        raise KernelUnavailable(f"numpy's {ufunc.__name__} loop table is not laid out as expected")
    codes = (ctypes.c_char * (2 * head.ntypes)).from_address(head.types).raw
    i = types.index("f->f")
    if codes[2 * i] != np.dtype(np.float32).num or codes[2 * i + 1] != np.dtype(np.float32).num:
        raise KernelUnavailable(f"numpy's {ufunc.__name__} loop types are not laid out as expected")
    fn = (ctypes.c_void_p * head.ntypes).from_address(head.functions)[i]
    data = (ctypes.c_void_p * head.ntypes).from_address(head.data)[i] if head.data else None
    if not fn:
        raise KernelUnavailable(f"numpy's {ufunc.__name__} float32 loop is missing")
    return fn, data or 0


def numpy_loops() -> tuple[int, int, int, int]:
    return (*numpy_loop(np.cos), *numpy_loop(np.sin))


def self_check_fused(k: RFKernel) -> None:
    """numpy's loops called from C give ``np.cos`` / ``np.sin``'s bits (values from 1e-30 to 1e6, the
    large ones on numpy's slow path, cut into chunks of 1, 7 and 256), and ``kscale_rf_block`` gives the
    tiles' sums to 1e-12 (a one-ulp cos/sin difference would show); raises KernelUnavailable."""
    rng = np.random.default_rng(27)
    x = (rng.standard_normal(3000) * np.exp(rng.uniform(-69, 14, 3000))).astype(np.float32)
    cf, cd, sf, sd = k.loops
    for fn, data, ufunc in ((cf, cd, np.cos), (sf, sd, np.sin)):
        for chunk in (1, 7, 256, len(x)):
            got = np.full_like(x, np.nan)
            k.trig(fn, data, _ptr(x), _ptr(got), len(x), chunk)
            if not np.array_equal(got.view(np.uint32), ufunc(x).view(np.uint32)):
                raise KernelUnavailable(f"numpy's {ufunc.__name__} loop called from C gives other bits")
    T, D, C = 6, 300, 5
    z, norm, scale, base, src, dst, factor = _check_tile(rng, T, D)
    config = np.array([3, 0, 4, 1, 2], np.int64)
    bounds = np.array([0, 4, 6], np.int64)
    for nrm in (None, norm):
        want = [np.zeros((C, 2, D)), np.ones((C, 2, D))]
        args = np.empty((5, T, D), np.float32)
        call_args(k, z, nrm, scale, base.astype(np.int64), src.astype(np.int64), dst.astype(np.int64), factor, args)
        call_sums(k, np.cos(args), np.sin(args), bounds, want, config)
        got = [np.zeros((C, 2, D)), np.ones((C, 2, D))]
        call_block(k, z, nrm, scale, base.astype(np.int64), src.astype(np.int64), dst.astype(np.int64), factor,
                   bounds, got, config)
        if not all(np.allclose(g, w, rtol=1e-12, atol=0) for g, w in zip(got, want)):
            raise KernelUnavailable(f"self-check failed: the fused pass's sums differ from the tiles' ({k.path})")


def call_sincos(k: RFKernel, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> None:
    """``kscale_rf_sincos`` on contiguous float32 arrays (numpy's loops ``k.loops`` for its slow values)."""
    k.sincos(_ptr(x), _ptr(cos), _ptr(sin), len(x), *k.loops)


def sincos_check_values() -> np.ndarray:
    """float32 values where a sincos that is not numpy's would show (~150,000): +-0, the smallest and
    largest normals and subnormals, +-inf, NaNs (quiet, signalling, negative), the largest float; 200 ulps
    either side of numpy's fast-path bounds (71476.0625 for cos, 117435.992 for sin); 4 ulps either side of
    k pi/2 and (k + 1/2) pi/2 for |k| <= 80000 step 7 (where the reduced argument changes sign, and where the
    quadrant's rounding decides between two polynomials); and random bit patterns of every exponent."""
    f32 = np.float32
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.finfo(f32).max, -np.finfo(f32).max, np.finfo(f32).tiny,
                        -np.finfo(f32).tiny, np.finfo(f32).smallest_subnormal, 1.0, -1.0], f32)
    nans = np.array([0x7FC00000, 0xFFC00000, 0x7FC00001, 0x7F800001, 0xFF800001], np.uint32).view(f32)
    bounds = np.array([71476.0625, 117435.992], f32).view(np.int32)
    near_bounds = (bounds[:, None] + np.arange(-200, 201, dtype=np.int32)).ravel().view(f32)
    k = np.arange(-80000, 80001, 7, dtype=np.float64)
    edges = (np.concatenate([k, k + 0.5]) * (np.pi / 2)).astype(f32).view(np.int32)
    near_edges = (edges[:, None] + np.arange(-4, 5, dtype=np.int32)).ravel().view(f32)
    rng = np.random.default_rng(28)
    bits = rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32).view(f32)
    small = rng.uniform(-300, 300, 20000).astype(f32)
    return np.concatenate([special, nans, near_bounds, -near_bounds, near_edges, bits, small]).astype(f32)


def self_check_sincos(k: RFKernel) -> None:
    """``kscale_rf_sincos`` gives ``np.cos`` / ``np.sin``'s bits on :func:`sincos_check_values`, whole and
    cut into chunks of 1 and 61 (the slow values' calls of numpy's loop do not depend on the cut); raises
    KernelUnavailable (the fused pass then calls numpy's loops). A numpy whose dispatch takes another path
    (no FMA, another polynomial or reduction) fails here."""
    x = sincos_check_values()
    with np.errstate(invalid="ignore"):
        want_c, want_s = np.cos(x).view(np.uint32), np.sin(x).view(np.uint32)
    for chunk, n in ((len(x), len(x)), (61, len(x)), (1, 2000)):  # chunks of 1: the specials and the bounds
        got_c, got_s = np.full(n, np.nan, np.float32), np.full(n, np.nan, np.float32)
        for i in range(0, n, chunk):
            k.sincos(_ptr(x) + 4 * i, _ptr(got_c) + 4 * i, _ptr(got_s) + 4 * i, min(chunk, n - i), *k.loops)
        for name, got, want in (("cos", got_c, want_c[:n]), ("sin", got_s, want_s[:n])):
            bad = np.flatnonzero(got.view(np.uint32) != want)
            if len(bad):
                i = bad[0]
                raise KernelUnavailable(f"kscale_rf_sincos's {name} differs from numpy's at {len(bad)} values, "
                                        f"e.g. {x[i]!r}: {got[i]!r} != {want.view(np.float32)[i]!r}")


def call_block(k: RFKernel, z_TD: np.ndarray, norm_T: np.ndarray | None, scale_BD: np.ndarray,
               base_slot: np.ndarray, src: np.ndarray, dst: np.ndarray, factor: np.ndarray, bounds: np.ndarray,
               dests: list[np.ndarray], config: np.ndarray) -> None:
    """``kscale_rf_block`` on contiguous arrays: runs ``bounds`` of the rows of ``z_TD`` into ``dests``."""
    T, D = z_TD.shape
    ptrs = np.array([_ptr(d) for d in dests], np.uint64)
    if k.block(_ptr(z_TD), None if norm_T is None else _ptr(norm_T), D, _ptr(scale_BD), _ptr(base_slot),
               len(base_slot), _ptr(src), _ptr(dst), _ptr(factor), len(src), len(config), T, _ptr(bounds),
               len(dests), _ptr(ptrs), _ptr(config), *k.loops, k.trig_flag) != 0:
        raise MemoryError("kscale_rf_block: out of memory")
