"""Forward hooks on the language model's projections, only inside a context manager.

``capture(modules, rotary)`` records the output of each hooked projection (``k_proj`` gives the
pre-RoPE keys, (B, T, H*D)) and the ``position_ids`` the model passed to its rotary embedding, i.e.
the RoPE positions it really used (3-D for Qwen's M-RoPE, 1-D for Llama). Hooks are removed in
``finally``, so an exception never leaves a model hooked. The attention kernel is untouched.

Legend: B batch, T tokens, R rope rows, L hooked layers.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
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
def capture(modules: dict[Hashable, torch.nn.Module], rotary: torch.nn.Module | None = None) -> Iterator[Capture]:
    cap = Capture()
    handles = []

    def on_output(layer: Hashable):
        def hook(_mod, _inp, out):
            cap.outputs[layer] = out.detach()
        return hook

    def on_rotary(_mod, args, kwargs):
        x = args[0] if args else kwargs["x"]
        pos = args[1] if len(args) > 1 else kwargs["position_ids"]
        cap.positions_BTR = _positions_BTR(pos.detach(), x.shape[0])

    try:
        for layer, mod in modules.items():
            handles.append(mod.register_forward_hook(on_output(layer)))
        if rotary is not None:
            handles.append(rotary.register_forward_pre_hook(on_rotary, with_kwargs=True))
        yield cap
    finally:
        for h in handles:
            h.remove()
