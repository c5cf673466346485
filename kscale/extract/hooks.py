"""Forward hooks on the language model's projections, only inside a context manager.

``capture(modules, rotary)`` records the output of each hooked projection (``k_proj`` gives the
pre-RoPE keys, (B, T, H*D)) and the ``position_ids`` the model passed to its rotary embedding, i.e.
the RoPE positions it really used (3-D for Qwen's M-RoPE, 1-D for Llama). Hooks are removed in
``finally``, so an exception never leaves a model hooked. The attention kernel is untouched.

Legend: B batch, T tokens, R rope rows, L hooked layers.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

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
# it* to the rows kscale stores (kept tokens, kept heads), cast to the key dtype, checked for non-finite
# values, and copied into one host buffer (L, N, H, D). On CUDA the copy is ``non_blocking`` from a side
# stream into pinned memory and the forward never waits for it; ``HostKeys.wait()`` (called by the
# writer thread, not by the forward) blocks on the copies' events. On CPU the same code runs and the
# copies are synchronous. Legend: N kept tokens of the batch (grouped by modality), F flag bits.

NONFINITE, OVERFLOW = 1, 2  # flag bits per (layer, kept token): non-finite in the model, inf after the cast


@dataclass
class HostKeys:
    """Host buffers one batch's selected keys are copied into, and the events that say they are there."""

    keys_LNHD: torch.Tensor
    flags_LN: torch.Tensor  # int8, NONFINITE | OVERFLOW per layer and kept token
    positions_NR: torch.Tensor | None = None
    events: list = field(default_factory=list)

    def wait(self) -> None:
        """Block until every copy has landed (the caller is the writer thread; the GPU keeps going)."""
        for e in self.events:
            e.synchronize()
        self.events.clear()


def _flags_N(sel_NHD: torch.Tensor, key_dtype: torch.dtype) -> torch.Tensor:
    """NONFINITE | OVERFLOW per row, from each row's max and min only (``isfinite`` over every value costs
    ~10x more on CPU). Exact: max and min propagate NaN and carry any inf; the cast is monotone, so some
    value of a finite row overflows ``key_dtype`` iff its max or min does."""
    flat = sel_NHD.flatten(1)
    ext_N2 = torch.stack([flat.amax(1), flat.amin(1)], 1)
    flags = (~torch.isfinite(ext_N2).all(1)).to(torch.int8) * NONFINITE
    return flags | (~torch.isfinite(ext_N2.to(key_dtype)).all(1)).to(torch.int8) * OVERFLOW


class _DeviceRows:
    """The kept-row indices (and kept heads) on each device that asks for them, moved there once."""

    def __init__(self, rows_N: torch.Tensor, heads: torch.Tensor | None):
        self.rows_N, self.heads = rows_N, heads
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        if device not in self._on:
            h = None if self.heads is None else self.heads.to(device, non_blocking=True)
            self._on[device] = (self.rows_N.to(device, non_blocking=True), h)
        return self._on[device]


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
    rows = _DeviceRows(rows_N.pin_memory() if pin else rows_N,
                       None if heads is None else torch.tensor(heads, dtype=torch.long))
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
            r, h = rows.on(out.device)
            D = out[0, 0].numel() // n_kv_heads  # (B, T, H*D) from k_proj, (B, T, H, D) from a QK-norm
            sel = out.detach().reshape(-1, n_kv_heads, D).index_select(0, r)  # (N, Hkv, D)
            if h is not None:
                sel = sel.index_select(1, h)
            flags = _flags_N(sel, key_dtype)
            cast = sel.to(key_dtype) if sel.is_cuda else sel  # on a GPU half the bytes cross; on CPU copy_ casts
            if host is None:
                host = HostKeys(torch.empty((L, N, H, D), dtype=key_dtype, pin_memory=pin),
                                torch.empty((L, N), dtype=torch.int8, pin_memory=pin))
            to_host(host.keys_LNHD[pos], cast)
            to_host(host.flags_LN[pos], flags)
        return hook

    positions: list[torch.Tensor] = []

    def on_rotary(_mod, args, kwargs):
        x = args[0] if args else kwargs["x"]
        p = _positions_BTR(args[1] if len(args) > 1 else kwargs["position_ids"], x.shape[0]).detach()
        r, _ = rows.on(p.device)
        positions.append(p.reshape(-1, p.shape[-1]).index_select(0, r).to(torch.int32))

    out = _Lazy()
    with _hooked(modules, on_key, rotary, on_rotary):
        yield out
    assert host is not None, "no hooked projection ran"
    if positions:
        p = positions[-1]  # the language model's call (the last, as in ``capture``)
        host.positions_NR = torch.empty(p.shape, dtype=p.dtype, pin_memory=pin)
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
