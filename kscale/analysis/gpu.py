"""Random features in torch, on the worker's GPU when it has one (``mmd.backend``: auto | torch).

The same computation as ``features._per_sample_rf``: per normalisation one product ``X U^T`` (float64),
per config the argument scaled and cast to ``compute_dtype``, cos and sin, and per-sample sums in
float64 (``index_add_``). ``auto`` uses this path only where CUDA is visible (decided in the worker, not
the driver); ``torch`` uses it always, on the CPU when there is no GPU (the default suite checks that
path against numpy to 1e-6). Results come back as numpy float64, so the sums merge as before.

Shapes: N rows, d head dim, D frequencies, S samples of the block, C configs.
"""

from __future__ import annotations

import numpy as np


def torch_device(backend: str):
    """The torch device for ``backend`` in this process, or None for the numpy path."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu") if backend == "torch" else None


def per_sample_rf_torch(plan, target, x_Nd: np.ndarray, smp, device) -> np.ndarray:
    """Per-sample cos/sin sums (S, C, 2, D) of every config of ``plan`` for one target."""
    import torch

    freqs = plan.freqs
    D = freqs.directions_Dd.shape[0]
    dtype = torch.float32 if plan.dtype == "float32" else torch.float64
    u_dD = torch.as_tensor(freqs.directions_Dd.T, dtype=torch.float64, device=device)
    centre = torch.as_tensor(target.centre_d, dtype=torch.float64, device=device)
    scale = torch.as_tensor(target.scale_d, dtype=torch.float64, device=device)
    out = torch.zeros((len(smp.ids_S), len(plan.configs), 2, D), dtype=torch.float64, device=device)
    rows = max(1, min(plan.batch_rows * 8, 2**26 // D))
    for lo in range(0, len(x_Nd), rows):
        xb = torch.as_tensor(np.asarray(x_Nd[lo:lo + rows], np.float64), device=device)
        idx = torch.as_tensor(smp.index_N[lo:lo + rows], device=device)
        z: dict[str, torch.Tensor] = {}
        for c, cfg in enumerate(plan.configs):
            zc = _projection(xb, cfg.normalisation, u_dD, centre, scale, z)
            w = torch.as_tensor(freqs.radii[cfg.kernel] / (target.bandwidth[cfg.normalisation] * cfg.multiple),
                                dtype=torch.float64, device=device)
            arg = (zc * w).to(dtype)
            out[:, c, 0].index_add_(0, idx, torch.cos(arg).to(torch.float64))
            out[:, c, 1].index_add_(0, idx, torch.sin(arg).to(torch.float64))
    return out.cpu().numpy()


def _projection(xb, how: str, u_dD, centre, scale, cache: dict):
    import torch

    if how not in cache:
        if how == "none":
            cache[how] = xb @ u_dD
        elif how == "l2":
            raw = _projection(xb, "none", u_dD, centre, scale, cache)
            cache[how] = raw / torch.clamp(torch.linalg.vector_norm(xb, dim=1, keepdim=True), min=1e-30)
        elif how == "standardize":
            cache[how] = ((xb - centre) / scale) @ u_dD
        else:
            raise ValueError(f"unknown normalisation {how!r}")
    return cache[how]
