"""kscale.models.rope: the config-built rotary equals the loaded model's, and blockwise RoPE equals
transformers' apply_rotary_pos_emb on 1-D and 3-D positions.

Legend: N tokens, H heads, D head dim, R rope rows.
"""

from __future__ import annotations

import sys

import dask.array as da
import numpy as np
import torch

from kscale.models.rope import apply_rope, load_rotary
from kscale.store.rope import rope_lazy


def test_config_rotary_and_blockwise_rope_equal_transformers(family_models):
    sdpa, _ = family_models  # both families (fixture parameter)
    family = sdpa.info.family
    rotary = load_rotary(sdpa.info.path)  # from config.json only
    model_rotary = sdpa.adapter.rotary_module(sdpa.model)
    R = sdpa.adapter.rope_rows
    N, H, D = 50, sdpa.info.num_kv_heads, sdpa.info.head_dim
    g = torch.Generator().manual_seed(0)
    pos_NR = torch.randint(0, 300, (N, R), generator=g)
    keys_NHD = torch.randn(N, H, D, generator=g)
    native = pos_NR.T[:, None, :] if R == 3 else pos_NR.T  # (3, 1, N) or (1, N)
    cos, sin = model_rotary(keys_NHD, native)
    mod = sys.modules[type(sdpa.adapter.decoder_layers(sdpa.model)[0].self_attn).__module__]
    k = keys_NHD.transpose(0, 1)[None]  # (1, H, N, D)
    _, want = mod.apply_rotary_pos_emb(k, k, cos, sin)
    want_NHD = want[0].transpose(0, 1).numpy()
    np.testing.assert_allclose(apply_rope(keys_NHD.numpy(), pos_NR.numpy(), rotary), want_NHD, atol=1e-6, rtol=0)
    lazy = rope_lazy(da.from_array(keys_NHD.numpy(), chunks=(7, H, D)), pos_NR.numpy(), rotary)
    assert lazy.numblocks[0] == 8
    np.testing.assert_allclose(lazy.compute(), want_NHD, atol=1e-6, rtol=0)
