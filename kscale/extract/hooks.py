"""Forward hooks on the language model's projections, only inside a context manager.

``capture(modules, rotary)`` records the output of each hooked projection (``k_proj`` gives the
pre-RoPE keys, (B, T, H*D)) and the ``position_ids`` the model passed to its rotary embedding, i.e.
the RoPE positions it really used (3-D for Qwen's M-RoPE, 1-D for Llama). Hooks are removed in
``finally``, so an exception never leaves a model hooked. The attention kernel is untouched.

Legend: B batch, T tokens, R rope rows, L hooked layers.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Capture:
    outputs: dict[Hashable, torch.Tensor] = field(default_factory=dict)  # e.g. ("k", layer) -> (B, T, H*D)
    positions_BTR: torch.Tensor | None = None


def _positions_BTR(position_ids: torch.Tensor, batch: int) -> torch.Tensor:
    if position_ids.ndim == 3:  # (R, B, T): M-RoPE rows
        return position_ids.permute(1, 2, 0).expand(batch, -1, -1)
    return position_ids[..., None].expand(batch, -1, -1)  # (B or 1, T)


@contextmanager
def _hooked(modules: dict, hook_for: Callable[[Hashable], Callable], rotary: torch.nn.Module | None,
            on_rotary: Callable) -> Iterator[None]:
    """``hook_for(key)`` as a forward hook on every module of ``modules`` and ``on_rotary`` as a forward
    pre-hook (with kwargs) on ``rotary``, all removed on leaving."""
    handles = []
    try:
        for key, mod in modules.items():
            handles.append(mod.register_forward_hook(hook_for(key)))
        if rotary is not None:
            handles.append(rotary.register_forward_pre_hook(on_rotary, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture(modules: dict[Hashable, torch.nn.Module], rotary: torch.nn.Module | None = None) -> Iterator[Capture]:
    cap = Capture()

    def on_output(layer: Hashable):
        def hook(_mod, _inp, out):
            cap.outputs[layer] = out.detach()
        return hook

    def on_rotary(_mod, args, kwargs):
        x = args[0] if args else kwargs["x"]
        pos = args[1] if len(args) > 1 else kwargs["position_ids"]
        cap.positions_BTR = _positions_BTR(pos.detach(), x.shape[0])

    with _hooked(modules, on_output, rotary, on_rotary):
        yield cap


# ----------------------------------------------------------------------------- keys straight to the host
#
# The fast path of extraction. Each hooked projection's output is reduced *on the device that computed
# it* to the rows kscale stores (kept tokens, kept heads) with one ``index_select`` through a flat row
# index computed once per batch and shared by every layer (:class:`_RowIndex`), and copied into one host
# buffer (L, N, H, D). On CUDA each layer's rows are cast to the key dtype and checked for non-finite
# values on the GPU, the copy is ``non_blocking`` from a side stream into pinned memory and the forward never
# waits for it; ``HostKeys.wait()`` (called by the writer thread, not by the forward) blocks on the copies'
# events. On CPU the hook only selects (into a buffer of the model's dtype, reused across batches:
# ``ROW_BUFFERS``); ``HostKeys.wait()``, on the writer thread, casts the whole (L, N, H, D) block at once
# and flags it from the cast (``_cast_flags``): the same bytes and flags, a few tensor ops per batch instead
# of ~20 per layer on the forward's thread. Legend: N kept tokens of the batch (grouped by modality), F flag
# bits.

NONFINITE, OVERFLOW = 1, 2  # flag bits per (layer, kept token): non-finite in the model, inf after the cast


@dataclass
class HostKeys:
    """Host buffers one batch's selected keys are copied into, and the events that say they are there."""

    keys_LNHD: torch.Tensor
    flags_LN: torch.Tensor  # int8, NONFINITE | OVERFLOW per layer and kept token
    positions_NR: torch.Tensor | None = None
    events: list = field(default_factory=list)
    cpu_LNHD: torch.Tensor | None = None  # the model's dtype: selected rows of the layers computed on the CPU
    cpu_layers: list[int] = field(default_factory=list)  # which layers those are (cast in ``wait``)
    cpu_flat: torch.Tensor | None = None  # the reusable buffer ``cpu_LNHD`` is a view of (``_RowBuffers``)

    def wait(self) -> None:
        """Block until every copy has landed (the caller is the writer thread; the GPU keeps going); cast
        and flag the rows that CPU layers left in ``cpu_LNHD``."""
        for e in self.events:
            e.synchronize()
        self.events.clear()
        if self.cpu_layers:
            with torch.inference_mode():  # the buffers were made in the forward's inference mode
                self._cast_cpu_rows()

    def _cast_cpu_rows(self) -> None:
        src, layers = self.cpu_LNHD, self.cpu_layers
        if len(layers) < len(src):  # a model spread over CPU and GPUs: the CPU layers only
            src = src[layers]
        if len(layers) == len(self.keys_LNHD):
            self.keys_LNHD.copy_(src)
            self.flags_LN.copy_(_cast_flags(src, self.keys_LNHD))
        else:
            at = torch.tensor(layers)
            cast = src.to(self.keys_LNHD.dtype)
            self.keys_LNHD.index_copy_(0, at, cast)
            self.flags_LN.index_copy_(0, at, _cast_flags(src, cast))
        if self.cpu_flat is not None:
            ROW_BUFFERS.give(self.cpu_flat)  # cast: a later batch may select into it
        self.cpu_LNHD, self.cpu_layers, self.cpu_flat = None, [], None


class _RowBuffers:
    """Flat CPU buffers the hooks select a batch's rows into (``HostKeys.cpu_LNHD``, the model's dtype),
    handed back by ``HostKeys.wait`` once cast and reused by later batches: a fresh (L, N, H, D) buffer per
    batch (~2 MB in the benchmark) cost its page faults on the forward's thread. A batch takes the smallest
    that fits (else a new one, a quarter larger than asked, so batches of a few more rows reuse it); at most
    ``KEEP`` are kept, the largest: as many as can be in use at once (the batch being forwarded and
    ``MAX_IN_FLIGHT`` = 2 waiting for the drain), so no more memory than the pipeline's peak stays held.
    A forked child starts empty."""

    KEEP = 3

    def __init__(self) -> None:
        self.free: list[torch.Tensor] = []
        self.lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(a flat buffer, its first prod(shape) values viewed as ``shape``)."""
        n = math.prod(shape)
        with self.lock:
            fits = [i for i, flat in enumerate(self.free) if flat.dtype == dtype and flat.numel() >= n]
            if fits:
                flat = self.free.pop(min(fits, key=lambda i: self.free[i].numel()))
                return flat, flat[:n].view(shape)
        flat = torch.empty(n + n // 4, dtype=dtype)
        return flat, flat[:n].view(shape)

    def give(self, flat: torch.Tensor) -> None:
        with self.lock:
            self.free.append(flat)
            if len(self.free) > self.KEEP:  # drop the smallest
                del self.free[min(range(len(self.free)), key=lambda i: self.free[i].numel())]

    def after_fork(self) -> None:
        self.free, self.lock = [], threading.Lock()


ROW_BUFFERS = _RowBuffers()
os.register_at_fork(after_in_child=ROW_BUFFERS.after_fork)


def _flags_N(sel_NHD: torch.Tensor, key_dtype: torch.dtype) -> torch.Tensor:
    """NONFINITE | OVERFLOW per row, from each row's max and min only (``isfinite`` over every value costs
    ~10x more on CPU). Exact: max and min propagate NaN and carry any inf; the cast is monotone, so some
    value of a finite row overflows ``key_dtype`` iff its max or min does."""
    flat = sel_NHD.flatten(1)
    ext_N2 = torch.stack([flat.amax(1), flat.amin(1)], 1)
    flags = (~torch.isfinite(ext_N2).all(1)).to(torch.int8) * NONFINITE
    return flags | (~torch.isfinite(ext_N2.to(key_dtype)).all(1)).to(torch.int8) * OVERFLOW


# the bits of a float's magnitude, and the exponent bits all set (inf or NaN), per key dtype
_NONFINITE_BITS = {torch.float16: (torch.int16, np.uint16, 0x7FFF, 0x7C00),
                   torch.bfloat16: (torch.int16, np.uint16, 0x7FFF, 0x7F80),
                   torch.float32: (torch.int32, np.uint32, 0x7FFFFFFF, 0x7F800000)}


def _all_finite(x: torch.Tensor) -> bool:
    """Whether every value of ``x`` is finite: its largest magnitude's bits below those of inf (a NaN's are
    above), two passes of integer ops over the block (``isfinite(x).all()`` costs ~20x more on CPU)."""
    bits = _NONFINITE_BITS.get(x.dtype)
    if bits is None or not x.is_contiguous() or x.device.type != "cpu":
        return bool(torch.isfinite(x).all())
    as_int, as_uint, magnitude, inf = bits
    return not x.numel() or int(np.bitwise_and(x.view(as_int).numpy().view(as_uint), magnitude).max()) < inf


def _cast_flags(src_LNHD: torch.Tensor, cast_LNHD: torch.Tensor) -> torch.Tensor:
    """(L, N) flags of a block from its cast to the key dtype (``cast_LNHD``, already made), equal to
    :func:`_flags_N` per row: all zero when every cast value is finite (the cast keeps NaN and inf, and a
    finite value that overflows becomes inf, so then no source value is non-finite and none overflowed),
    else per row from the source. One check over the key-dtype bytes (before: a min and max over the source's,
    then the cast)."""
    L, N = src_LNHD.shape[:2]
    if _all_finite(cast_LNHD):
        return torch.zeros((L, N), dtype=torch.int8)
    return _flags_N(src_LNHD.reshape(L * N, *src_LNHD.shape[2:]), cast_LNHD.dtype).view(L, N)


class _RowIndex:
    """The kept rows of a batch as flat indices into a layer's output, computed once per (device, layout)
    and shared by every layer of the batch (and made on each device that asks, moved there once).

    A layer's output is (B, T, H*D) or (B, T, H, D), stored token-major (``k_proj``, Qwen3's ``k_norm``) or
    head-major (a (B, T, H, D) view of a (B, H, T, D) tensor: Gemma 3's ``k_norm``). :meth:`select` reads the
    kept tokens (``rows_N``: flat indices into B*T) and kept heads from either without a copy of the output:
    one ``index_select`` over rows of D values (token-major with all heads: over rows of H*D)."""

    def __init__(self, rows_N: torch.Tensor, n_heads: int, heads: list[int] | None):
        self.rows_N, self.n_heads = rows_N, n_heads
        self.heads = torch.arange(n_heads) if heads is None else torch.tensor(heads, dtype=torch.long)
        self.all_heads = heads is None
        self._index: dict[tuple, torch.Tensor] = {}

    def _flat(self, layout: str, T: int) -> torch.Tensor:
        r, h = self.rows_N, self.heads
        if layout == "tokens":
            return r
        if layout == "token-major":  # (B*T, Hkv[, D]) rows
            return r if self.all_heads else (r[:, None] * self.n_heads + h[None]).flatten()
        b, t = r // T, r % T  # head-major: (B*Hkv*T, D) rows
        return ((b[:, None] * self.n_heads + h[None]) * T + t[:, None]).flatten()

    def tokens(self, device: torch.device) -> torch.Tensor:
        """``rows_N`` on ``device`` (the rows of per-token tensors: RoPE positions)."""
        return self.index(device, "tokens", 0)

    def index(self, device: torch.device, layout: str, T: int) -> torch.Tensor:
        key = (device, layout, T)
        if key not in self._index:
            self._index[key] = self._flat(layout, T).to(device, non_blocking=True)
        return self._index[key]

    def select(self, out: torch.Tensor, out_NHD: torch.Tensor | None = None) -> torch.Tensor:
        """The kept (N, H, D) rows of one layer's output (into ``out_NHD`` when given: same dtype)."""
        B, T = out.shape[:2]
        x = out.detach()
        if x.ndim == 3:
            x = x.unflatten(-1, (self.n_heads, -1))  # a view
        D = x.shape[-1]
        if x.is_contiguous():
            layout, flat = "token-major", x.view(B * T, -1) if self.all_heads else x.view(-1, D)
        elif x.transpose(1, 2).is_contiguous():
            layout, flat = "head-major", x.transpose(1, 2).view(-1, D)
        else:  # no family gives this today: one copy
            x = x.contiguous()
            layout, flat = "token-major", x.view(B * T, -1) if self.all_heads else x.view(-1, D)
        idx = self.index(x.device, layout, T)
        N, H = len(self.rows_N), len(self.heads)
        if out_NHD is None:
            return flat.index_select(0, idx).view(N, H, D)
        if out_NHD.dtype == flat.dtype:
            torch.index_select(flat, 0, idx, out=out_NHD.view(len(idx), -1))
        else:
            out_NHD.view(len(idx), -1).copy_(flat.index_select(0, idx))
        return out_NHD


def _side_stream(device: torch.device, streams: dict):
    if device not in streams:
        streams[device] = torch.cuda.Stream(device)
    return streams[device]


@contextmanager
def capture_keys(modules: dict[int, torch.nn.Module], rotary: torch.nn.Module | None, rows_N: torch.Tensor,
                 n_kv_heads: int, heads: list[int] | None, key_dtype: torch.dtype,
                 streams: dict | None = None) -> Iterator[HostKeys]:
    """Hook ``modules`` (hooked-layer position -> k_proj, or the q/v projection: one context per kind of
    ``extract.vectors``, ``n_kv_heads`` then the projection's head count) so each writes its kept rows into
    ``HostKeys``.

    ``rows_N`` are flat indices into the batch's (B*T) tokens, in the order the store writes them;
    ``heads`` the kept KV heads (None: all). ``streams`` caches one side stream per CUDA device across
    batches. Every device a module runs on gets its own copy stream and event, so a model spread over
    several GPUs (``device_map``) is read wherever each layer lives.
    """
    N, L = rows_N.numel(), len(modules)
    pin = any(p.is_cuda for m in modules.values() for p in m.parameters(recurse=False))
    H = n_kv_heads if heads is None else len(heads)
    host: HostKeys | None = None
    rows = _RowIndex(rows_N.pin_memory() if pin else rows_N, n_kv_heads, heads)
    streams = {} if streams is None else streams
    used: set[torch.device] = set()

    def to_host(dst: torch.Tensor, src: torch.Tensor) -> None:
        if not src.is_cuda:
            dst.copy_(src)
            return
        side = _side_stream(src.device, streams)
        side.wait_stream(torch.cuda.current_stream(src.device))
        with torch.cuda.stream(side):
            dst.copy_(src, non_blocking=True)
        src.record_stream(side)  # the caching allocator must not reuse src before the copy ran
        used.add(src.device)

    def on_key(pos: int):
        def hook(_mod, _inp, out):
            nonlocal host
            D = out.shape[-1] if out.ndim == 4 else out.shape[-1] // n_kv_heads
            if host is None:  # pinned when the model is on a GPU (a tap module holds no parameters to tell)
                pinned = pin or out.is_cuda
                host = HostKeys(torch.empty((L, N, H, D), dtype=key_dtype, pin_memory=pinned),
                                torch.empty((L, N), dtype=torch.int8, pin_memory=pinned))
            if not out.is_cuda:  # selected here, cast and flagged per batch in ``HostKeys.wait``
                if host.cpu_LNHD is None:
                    host.cpu_flat, host.cpu_LNHD = ROW_BUFFERS.take((L, N, H, D), out.dtype)
                rows.select(out, host.cpu_LNHD[pos])
                host.cpu_layers.append(pos)
                return
            sel = rows.select(out)  # (N, H, D)
            to_host(host.keys_LNHD[pos], sel.to(key_dtype))  # half the bytes cross
            to_host(host.flags_LN[pos], _flags_N(sel, key_dtype))
        return hook

    positions: list[torch.Tensor] = []

    def on_rotary(_mod, args, kwargs):
        x = args[0] if args else kwargs["x"]
        p = _positions_BTR(args[1] if len(args) > 1 else kwargs["position_ids"], x.shape[0]).detach()
        positions.append(p.reshape(-1, p.shape[-1]).index_select(0, rows.tokens(p.device)).to(torch.int32))

    out = _Lazy()
    with _hooked(modules, on_key, rotary, on_rotary):
        yield out
    assert host is not None, "no hooked projection ran"
    if positions:
        p = positions[-1]  # the language model's call (the last, as in ``capture``)
        host.positions_NR = torch.empty(p.shape, dtype=p.dtype, pin_memory=host.keys_LNHD.is_pinned())
        to_host(host.positions_NR, p)
    for dev in used:
        ev = torch.cuda.Event()
        ev.record(streams[dev])
        host.events.append(ev)
    out.value = host


@dataclass
class _Lazy:
    """Filled with the batch's ``HostKeys`` when the ``capture_keys`` block exits (after the forward)."""

    value: HostKeys | None = None
