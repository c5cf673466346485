"""The extraction hooks read a batch's kept rows through one index per batch, in every layout, and cast and
flag the CPU rows per batch: the same keys and flags as selecting each layer's output by hand.

``capture_keys`` computes the flat row index of the kept tokens (and heads) once per batch and layout
(``_RowIndex``) and shares it across layers; on CPU the hooks only select, and ``HostKeys.wait`` casts and
flags the whole (L, N, H, D) block (``_cast_flags``: from its cast, checked by bits). The reference here is the plain reading: reshape
the layer's output to (B*T, H, D), take the kept rows and heads, cast, and flag each row with ``isfinite``.
Batches have several images, padding and sampled tokens (rows grouped by modality, not ascending), and
outputs come token-major (``k_proj``'s (B, T, H*D), Qwen3's ``k_norm`` (B, T, H, D)) and head-major (a
(B, T, H, D) view of Gemma 3's (B, H, T, D) ``k_norm`` output, which its tap now hands over uncopied).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kscale.extract.hooks import ROW_BUFFERS, NONFINITE, OVERFLOW, _all_finite, _cast_flags, _flags_N, capture_keys
from kscale.extract.worker import keep_rows
from kscale.models.facts import IMAGE, PAD, SPECIAL, TEXT
from kscale.spec import SampleTokens

HKV, D, L = 4, 8, 3


def reference_flags(sel_NHD: torch.Tensor, key_dtype: torch.dtype) -> torch.Tensor:
    flags = (~torch.isfinite(sel_NHD).flatten(1).all(1)).to(torch.int8) * NONFINITE
    return flags | (~torch.isfinite(sel_NHD.to(key_dtype)).flatten(1).all(1)).to(torch.int8) * OVERFLOW


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaN included)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8),
                                                                      b.contiguous().view(torch.uint8))


def batch(B: int, T: int, seed: int):
    """A batch with left padding, two or three image blocks per sample and special tokens around them."""
    g = torch.Generator().manual_seed(seed)
    mod = torch.full((B, T), TEXT)
    for b in range(B):
        pad = int(torch.randint(0, 4, (), generator=g))
        mod[b, :pad] = PAD
        for start in range(pad + 2, T - 5, 7)[: 2 + b % 2]:  # several images per sample
            mod[b, start], mod[b, start + 1:start + 4], mod[b, start + 4] = SPECIAL, IMAGE, SPECIAL
    recs = [SimpleNamespace(sample_id=10 * seed + b) for b in range(B)]
    return SimpleNamespace(modality_BT=mod), recs


class Layer(torch.nn.Module):
    """Returns its given output (per layout) so a hook on it sees exactly that tensor."""

    def __init__(self, layout: str):
        super().__init__()
        self.layout = layout

    def forward(self, x_BTHD):
        if self.layout == "flat":  # k_proj: (B, T, H*D)
            return x_BTHD.flatten(2)
        if self.layout == "heads":  # Qwen3's k_norm: (B, T, H, D), contiguous
            return x_BTHD.contiguous()
        return x_BTHD.transpose(1, 2).contiguous().transpose(1, 2)  # Gemma 3's tap: a view of (B, H, T, D)


def run(layout: str, heads, key_dtype, x_LBTHD: torch.Tensor, rows_N: torch.Tensor):
    mods = {i: Layer(layout) for i in range(L)}
    with torch.inference_mode(), capture_keys(mods, None, rows_N, HKV, heads, key_dtype) as got:
        for i, m in mods.items():  # as forward_keys runs the model: buffers made in inference mode
            m(x_LBTHD[i])
    host = got.value
    host.wait()  # as the drain thread does: outside inference mode
    return host


@pytest.mark.parametrize("layout", ["flat", "heads", "head-major"])
@pytest.mark.parametrize("heads", [None, [3, 1]])
def test_one_index_per_batch_reads_every_layers_kept_rows(layout, heads):
    sampled = SampleTokens(text=4, image=5, special=2, seed=1)
    for seed, (B, T) in enumerate([(3, 24), (2, 31), (3, 24)]):  # consecutive batches, different rows
        b, recs = batch(B, T, seed)
        rows_N, spans = keep_rows(b, recs, sampled)
        assert len(spans) == 3 and not bool((rows_N[1:] > rows_N[:-1]).all())  # grouped by modality
        x = torch.randn(L, B, T, HKV, D, generator=torch.Generator().manual_seed(seed))
        x[1, 0, 5, 2, 3] = float("nan")  # a non-finite key in layer 1 ...
        x[2, 1, 7, 0, 0] = 1e5  # ... and one that overflows float16 in layer 2
        host = run(layout, heads, torch.float16, x, rows_N)
        kept = list(range(HKV)) if heads is None else heads
        want = x.reshape(L, B * T, HKV, D)[:, rows_N][:, :, kept]
        assert same_bytes(host.keys_LNHD, want.to(torch.float16))
        assert torch.equal(host.flags_LN, torch.stack([reference_flags(w, torch.float16) for w in want]))


def test_row_buffers_are_reused_only_once_cast(monkeypatch):
    """The model-dtype buffer a batch's rows are selected into is handed back only once ``wait`` cast it, and
    reused by a later batch, never while it is still to be cast: batches forwarded before the first is
    drained (the pipeline keeps up to ``MAX_IN_FLIGHT`` of them) get buffers of their own."""
    ROW_BUFFERS.free.clear()
    mods = {i: Layer("heads") for i in range(L)}

    def forward(seed: int, B: int, T: int):
        b, recs = batch(B, T, seed)
        rows_N, _ = keep_rows(b, recs, SampleTokens())
        x = torch.randn(L, B, T, HKV, D, generator=torch.Generator().manual_seed(seed))
        with torch.inference_mode(), capture_keys(mods, None, rows_N, HKV, None, torch.float16) as got:
            for i, m in mods.items():
                m(x[i])
        return got.value, x.reshape(L, B * T, HKV, D)[:, rows_N].half()

    at_give = []
    give = ROW_BUFFERS.give
    monkeypatch.setattr(ROW_BUFFERS, "give", lambda flat: (at_give.append(host.keys_LNHD.clone()), give(flat)))
    host, want = forward(0, 3, 24)
    first = host.cpu_flat
    host.wait()
    assert same_bytes(at_give[-1], want)  # handed back with the keys already cast out of it
    pending = [forward(seed, B, T) for seed, (B, T) in enumerate([(2, 24), (3, 20)], 1)]  # both fit in `first`
    assert pending[0][0].cpu_flat is first and pending[1][0].cpu_flat is not first  # none shared in flight
    for host, want in pending:
        host.wait()
        assert same_bytes(host.keys_LNHD, want) and same_bytes(at_give[-1], want)


def test_row_buffers_hold_at_most_the_pipelines_peak():
    """At most ``KEEP`` buffers stay held (the largest); a batch takes the smallest that fits."""
    from kscale.extract.hooks import _RowBuffers

    pool = _RowBuffers()
    for n in (40, 10, 50, 20, 30):
        pool.give(torch.empty(n))
    assert sorted(t.numel() for t in pool.free) == [30, 40, 50] and pool.KEEP == 3
    flat, view = pool.take((5, 7), torch.float32)
    assert flat.numel() == 40 and view.shape == (5, 7) and view.data_ptr() == flat.data_ptr()
    flat, _ = pool.take((60,), torch.float32)  # none fits: a new one, with room for a few more rows
    assert flat.numel() == 75 and sorted(t.numel() for t in pool.free) == [30, 50]


def test_bfloat16_model_float16_keys():
    """A bfloat16 model's rows are selected in bfloat16 and cast per batch: the same bytes and flags as per layer."""
    b, recs = batch(3, 24, 5)
    rows_N, _ = keep_rows(b, recs, SampleTokens())
    x = torch.randn(L, 3, 24, HKV, D, generator=torch.Generator().manual_seed(5)).bfloat16()
    x[0, 2, 20, 1, 1] = 7e4  # overflows float16
    host = run("heads", None, torch.float16, x, rows_N)
    want = x.reshape(L, 72, HKV, D)[:, rows_N]
    assert same_bytes(host.keys_LNHD, want.to(torch.float16))
    flags = torch.stack([reference_flags(w, torch.float16) for w in want])
    assert torch.equal(host.flags_LN, flags) and bool((flags == OVERFLOW).any())


@pytest.mark.parametrize("layout", ["heads", "head-major"])
def test_hooks_copy_no_layer_output(layout):
    """During the forward the hooks only view and index (no clone/copy of a layer's output: Gemma 3's
    head-major view used to be copied contiguous whole, ~5% of its hooked forward); the cast is in ``wait``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    b, recs = batch(2, 20, 0)
    rows_N, _ = keep_rows(b, recs, SampleTokens())
    x = torch.randn(L, 2, 20, HKV, D)
    outs = [Layer(layout)(x[i]) for i in range(L)]
    mods = {i: torch.nn.Identity() for i in range(L)}
    with torch.inference_mode(), capture_keys(mods, None, rows_N, HKV, None, torch.float16) as got:
        with Ops() as ops:
            for i, m in mods.items():
                m(outs[i])
    assert "index_select" in ops.names
    assert not {"clone", "copy_", "_to_copy", "contiguous"} & set(ops.names), ops.names
    got.value.wait()
    assert torch.equal(got.value.keys_LNHD, x.reshape(L, 40, HKV, D)[:, rows_N].half())


@pytest.mark.parametrize("key_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_block_flags_equal_each_rows_flags(key_dtype):
    g = torch.Generator().manual_seed(2)
    clean = torch.randn(3, 10, 2, 4, generator=g)
    assert torch.equal(_cast_flags(clean, clean.to(key_dtype)), torch.zeros(3, 10, dtype=torch.int8))
    for value in (float("nan"), -float("nan"), float("inf"), -float("inf"), 65504.0, 65520.0, -70000.0, 3.4e38,
                  3.39e38, 1e-45, -0.0):
        x = clean.clone()
        x[1, 4, 1, 2] = value
        want = torch.stack([reference_flags(x[i], key_dtype) for i in range(3)])
        assert torch.equal(_cast_flags(x, x.to(key_dtype)), want), value
        assert torch.equal(_flags_N(x.reshape(30, 2, 4), key_dtype).view(3, 10), want)
    assert _cast_flags(torch.zeros(3, 0, 2, 4), torch.zeros(3, 0, 2, 4, dtype=key_dtype)).shape == (3, 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_all_finite_by_bits_equals_isfinite(dtype):
    """``_all_finite`` reads the bits (magnitude below inf's): equal to ``isfinite(x).all()`` at every edge --
    the largest finite values, inf, NaNs of either sign and payload, subnormals, -0 -- and off its fast path."""
    info = torch.finfo(dtype)
    bits = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}[dtype]
    edges = torch.tensor([info.max, -info.max, info.tiny, info.tiny / 4, -0.0, 1.0], dtype=dtype)
    nans = torch.tensor([float("nan"), -float("nan")], dtype=dtype)
    odd_nan = (nans.view(bits) | 1).view(dtype)  # another payload
    for extra in (None, float("inf"), -float("inf"), *nans, *odd_nan):
        x = edges.clone() if extra is None else torch.cat([edges, torch.tensor([extra], dtype=dtype)])
        want = bool(torch.isfinite(x).all())
        assert _all_finite(x) == want, (dtype, extra)
        assert _all_finite(x.view(-1, 1).expand(-1, 2).t()) == want  # not contiguous: the plain check
    assert _all_finite(torch.zeros(0, dtype=dtype))


def test_gemma3_tap_hands_over_a_view_of_the_norm_output():
    from kscale.models.gemma3 import _tap

    attn = torch.nn.Module()
    attn.k_norm = torch.nn.Identity()
    tap = _tap(attn, "k")
    seen = {}
    tap.register_forward_hook(lambda _m, inp, _out: seen.__setitem__("tap", inp[0]))
    x_BHTD = torch.randn(2, HKV, 5, D)
    out = attn.k_norm(x_BHTD)
    assert seen["tap"].shape == (2, 5, HKV, D)
    assert seen["tap"].data_ptr() == out.data_ptr()  # a view: no copy of the layer's keys
    assert torch.equal(seen["tap"], x_BHTD.transpose(1, 2))
