"""The MaLoRA layer: a frozen Linear plus a gated low-rank update chosen by each token's modality.

    out = W x + m_img * g_img * s * B_img A_img drop(x) + m_txt * g_txt * s * B_txt A_txt drop(x)

with ``s = alpha / r``, ``m_img`` the token's image mask and ``m_txt = 1 - m_img``. Both branches run on
every token of every micro-batch (a dense blend with the mask, never an index select), so every rank
touches every parameter each step and ZeRO-3's gathers never diverge, even on a micro-batch with no image.

The layer does not see input ids. It reads the mask from a :class:`ModalityContext` that the model-level
hook in :mod:`kscale.adapters.model` fills before each forward, and that the checkpoint wrapper
there restores while a layer is recomputed in the backward pass.

Legend: B batch, T tokens, C input features, O output features, R rank, N branches (1 or 2; NR stacked).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kscale.spec.malora import MaLoRAConfig

# Every trainable MaLoRA parameter is an attribute of MaLoRALinear with one of these names; saved adapters
# use them as the last component of each key. Gates: the per-layer value (or sigmoid bias) and, for a
# token-conditioned gate, its weight vector.
MALORA_PARAM_NAMES = (
    "malora_A_img",
    "malora_B_img",
    "malora_gate_img",
    "malora_gate_img_w",
    "malora_A_txt",
    "malora_B_txt",
    "malora_gate_txt",
    "malora_gate_txt_w",
)
BRANCHES = ("img", "txt")


@dataclass
class ModalityContext:
    """Shared, per-model state read by every MaLoRA layer during a forward.

    ``image_mask_BT`` is set by the model-level pre-hook from the input ids; the branch switches serve
    ablations (image branch off) and the frozen-base reference of the objective (both off).
    """

    image_mask_BT: torch.Tensor | None = None
    image_on: bool = True
    text_on: bool = True
    recomputing: bool = False

    @contextmanager
    def replaying(self, image_mask_BT: torch.Tensor | None, recomputing: bool) -> Iterator[None]:
        """Pin the mask of the forward being replayed (activation recomputation), then restore."""
        saved = (self.image_mask_BT, self.recomputing)
        self.image_mask_BT, self.recomputing = image_mask_BT, recomputing
        try:
            yield
        finally:
            self.image_mask_BT, self.recomputing = saved

    @contextmanager
    def branches(self, image: bool = True, text: bool = True) -> Iterator[None]:
        saved = (self.image_on, self.text_on)
        self.image_on, self.text_on = image, text
        try:
            yield
        finally:
            self.image_on, self.text_on = saved


class MaLoRALinear(nn.Module):
    """``base_layer`` (frozen) plus the two gated low-rank branches; see the module docstring."""

    def __init__(self, base_layer: nn.Linear, config: MaLoRAConfig, context: ModalityContext) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.config = config
        self.context = context
        self.scaling = config.scaling
        self.text_merged = False
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.branches = tuple(b for b, on in zip(BRANCHES, (config.image_branch, config.text_branch)) if on)
        weight = base_layer.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        for branch in self.branches:
            A_RC = torch.empty(config.rank, base_layer.in_features, **factory)
            B_OR = torch.zeros(base_layer.out_features, config.rank, **factory)
            self._init_branch(A_RC, B_OR)
            setattr(self, f"malora_A_{branch}", nn.Parameter(A_RC))
            setattr(self, f"malora_B_{branch}", nn.Parameter(B_OR))
            if config.gate == "scalar":  # shape (1,), not 0-dim: ZeRO cannot partition 0-dim tensors
                setattr(self, f"malora_gate_{branch}", nn.Parameter(torch.full((1,), config.initial_gate, **factory)))
            elif config.gate == "token":
                bias = math.log(config.initial_gate / (1.0 - config.initial_gate))
                setattr(self, f"malora_gate_{branch}", nn.Parameter(torch.full((1,), bias, **factory)))
                setattr(self, f"malora_gate_{branch}_w", nn.Parameter(torch.zeros(base_layer.in_features, **factory)))

    def _init_branch(self, A_RC: torch.Tensor, B_OR: torch.Tensor) -> None:
        if self.config.init == "gaussian":
            nn.init.normal_(A_RC, std=1.0 / self.config.rank)
        else:  # PEFT's default for A
            nn.init.kaiming_uniform_(A_RC, a=math.sqrt(5))
        if self.config.init == "random":
            nn.init.kaiming_uniform_(B_OR, a=math.sqrt(5))

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        out_BTO = self.base_layer(x_BTC)
        if not self._active_branches():
            return out_BTO
        return out_BTO + self.low_rank_update(x_BTC)

    def low_rank_update(self, x_BTC: torch.Tensor) -> torch.Tensor:
        """Both branches in one pass: A's stacked to (NR, C), a per-token branch weight, B's stacked to (O, NR).

        A per-layer gate and the scaling are folded into B (an O x R product per call, not a B x T x O
        one); only a token-conditioned gate multiplies the activations. The per-token weight is the
        mask, so ``h`` keeps one non-zero branch per token and autograd saves one (B, T, NR) tensor.
        """
        A_RC = torch.cat([getattr(self, f"malora_A_{b}") for b in self.branches])
        B_OR = torch.cat([getattr(self, f"malora_B_{b}") * self._weight_gate(b) for b in self.branches], dim=1)
        h_BTNR = F.linear(self.dropout(x_BTC), A_RC).unflatten(-1, (len(self.branches), self.config.rank))
        weight_BTN1 = torch.stack([self._branch_weight(b, x_BTC) for b in self.branches], dim=-2)
        return F.linear((h_BTNR * weight_BTN1).flatten(-2), B_OR)

    def _weight_gate(self, branch: str) -> torch.Tensor | float:
        """What multiplies B: scaling, times the per-layer gate when the gate is a learned value."""
        if self.config.gate == "scalar":
            return getattr(self, f"malora_gate_{branch}") * self.scaling
        return self.scaling

    def _branch_weight(self, branch: str, x_BTC: torch.Tensor) -> torch.Tensor:
        """Per-token weight of a branch, shape (B, T, 1): its mask (0 where switched off), times a token gate."""
        img_BT1 = self._image_mask(x_BTC)
        if branch == "img":
            mask_BT1 = img_BT1 if self.context.image_on else torch.zeros_like(img_BT1)
        elif self.text_merged:  # W already holds the text update: take it back out where it does not apply
            mask_BT1 = -img_BT1 if self.context.text_on else -torch.ones_like(img_BT1)
        else:
            mask_BT1 = 1.0 - img_BT1 if self.context.text_on else torch.zeros_like(img_BT1)
        if self.config.gate == "token":
            return mask_BT1 * self.gate(branch, x_BTC)
        return mask_BT1

    def gate(self, branch: str, x_BTC: torch.Tensor) -> torch.Tensor:
        """The branch's gate: a constant 1, a learned (1,) value, or sigmoid(w.x + b) of shape (B, T, 1)."""
        if self.config.gate == "fixed":
            return torch.ones(1, dtype=x_BTC.dtype, device=x_BTC.device)
        bias = getattr(self, f"malora_gate_{branch}")
        if self.config.gate == "scalar":
            return bias
        w_C = getattr(self, f"malora_gate_{branch}_w")
        return torch.sigmoid(x_BTC @ w_C.unsqueeze(-1) + bias)

    def _image_mask(self, x_BTC: torch.Tensor) -> torch.Tensor:
        mask_BT = self.context.image_mask_BT
        if mask_BT is None:
            raise RuntimeError("MaLoRA layer called without a modality mask: call the model with input_ids")
        if mask_BT.shape != x_BTC.shape[:-1]:
            raise RuntimeError(
                f"modality mask of shape {tuple(mask_BT.shape)} does not match the layer input "
                f"{tuple(x_BTC.shape)}; the mask is derived from input_ids of the same call"
            )
        return mask_BT.unsqueeze(-1).to(device=x_BTC.device, dtype=x_BTC.dtype)  # layers may sit on other GPUs

    def _active_branches(self) -> bool:
        ctx = self.context
        img = ctx.image_on and "img" in self.branches
        txt = "txt" in self.branches and (ctx.text_on or self.text_merged)
        return img or txt

    @torch.no_grad()
    def merge_text_branch(self) -> None:
        """Fold ``g_txt * s * B_txt A_txt`` into W; the text branch then only cancels itself on image tokens."""
        if "txt" not in self.branches or self.text_merged:
            raise RuntimeError("no unmerged text branch to merge")
        if self.config.gate == "token":
            raise ValueError("a token-conditioned text gate depends on x and cannot be merged into W")
        delta_OC = (self.malora_B_txt.float() @ self.malora_A_txt.float()) * self.scaling
        if self.config.gate == "scalar":
            delta_OC = delta_OC * self.malora_gate_txt.float()
        self.base_layer.weight += delta_OC.to(self.base_layer.weight.dtype)
        for name in ("malora_A_txt", "malora_B_txt", "malora_gate_txt"):
            if hasattr(self, name):
                getattr(self, name).requires_grad_(False)
        self.text_merged = True

    def extra_repr(self) -> str:
        c = self.config
        return f"rank={c.rank}, alpha={c.alpha}, gate={c.gate}, branches={self.branches}"
