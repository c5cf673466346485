"""The hooks' per-row flags (from each row's max and min) equal ``isfinite`` over every value.

``capture_keys`` flags a kept token NONFINITE when the model gave a non-finite key and OVERFLOW when the
cast to the key dtype gives one; the writer refuses the shard on either. The flags come from the row's
max and min only (~10x cheaper on CPU); this checks the shortcut against the full reference on rows with
NaN, +-inf, values that round into and out of float16's range, and float32 values near its maximum.
"""

from __future__ import annotations

import pytest
import torch

from kscale.extract.hooks import NONFINITE, OVERFLOW, _flags_N


def reference(sel_NHD: torch.Tensor, key_dtype: torch.dtype) -> torch.Tensor:
    cast = sel_NHD.to(key_dtype)
    flags = (~torch.isfinite(sel_NHD).flatten(1).all(1)).to(torch.int8) * NONFINITE
    return flags | (~torch.isfinite(cast).flatten(1).all(1)).to(torch.int8) * OVERFLOW


@pytest.mark.parametrize("key_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_flags_from_max_and_min_equal_isfinite_everywhere(key_dtype):
    x = torch.randn(24, 3, 8, generator=torch.Generator().manual_seed(0))
    specials = [float("nan"), float("inf"), -float("inf"), 65519.0, 65520.0, -65520.0, -70000.0, 3e38, -3.4e38]
    for i, v in enumerate(specials):
        x[2 * i, i % 3, i % 8] = v
    x[20, 0, 0], x[20, 1, 0] = float("inf"), -float("inf")
    x[21, 0, 0], x[21, 2, 7] = float("nan"), float("inf")
    x[22] = float("nan")
    got, want = _flags_N(x, key_dtype), reference(x, key_dtype)
    assert torch.equal(got, want), (got, want)
    assert (want == 0).any() and (want == NONFINITE | OVERFLOW).any()
    assert (want == OVERFLOW).any() == (key_dtype != torch.float32)  # float32 keys never overflow
