"""The MaLoRA objective: LM loss on answer tokens + lambda x key alignment at the target layers.

:class:`MaLoRAObjective` is the module DeepSpeed (or a plain PyTorch loop) wraps: its ``forward`` runs
the adapted model once, with forward hooks on the target layers' ``k_proj`` (installed by
:func:`capture_keys` and removed in ``finally``), and returns the total loss and its terms. Keeping the
whole loss inside one module forward means ZeRO-3 gathers every parameter it touches, including the
frozen-base reference pass.

The keys are the k_proj outputs (pre-RoPE): those are what the adapter changes directly, and RoPE would
mix position into the statistics. The captured tensors are graph nodes of the first forward; with
non-reentrant activation checkpointing the backward from the alignment loss reaches them by recomputing
the layer (the recompute is flagged by the mask-replay wrapper and not captured twice). Reentrant
checkpointing would run the first forward under no_grad, which is why MaLoRA only enables the
non-reentrant kind.

Alignment losses, per KV head, in float32, image keys pulled toward text keys (the text side is detached
or comes from the frozen base model):

- ``mmd``: squared MMD of a Gaussian kernel estimated with random Fourier features.
- ``coral``: squared Frobenius distance of covariances / (4 D^2).
- ``mean``: squared distance of means / D.

Legend: B batch, T tokens, K kept logit positions, V vocab, N image keys, M text keys, H KV heads,
D head dim, F random features.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from kscale.models.registry import IMAGE, TEXT, VIDEO, model_info, resolve_layers
from kscale.scoring import answer_positions  # the logits the loss needs: those predicting answer tokens
from kscale.spec.train import AlignConfig
from kscale.adapters.model import MaLoRAModel, model_adapter

MEDIAN_SAMPLE = 128  # keys per side used by the median-distance bandwidth heuristic


@torch.no_grad()
def encode_images(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``inputs`` with ``pixel_values`` replaced by the frozen vision tower's output (``mm_encoder_outputs``).

    The tower runs once, without a graph (the family adapter's ``image_features``, as the model's forward
    would call it); the model's forward then only scatters the features into the image placeholders (and
    the frozen-base reference pass reuses them).
    """
    out = {k: v for k, v in inputs.items() if k != "pixel_values"}
    out["mm_encoder_outputs"] = {"image": model_adapter(model).image_features(model, inputs)}
    return out


@contextmanager
def capture_keys(wrapped: MaLoRAModel, layers: list[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Record the k_proj output of ``layers`` during the block (first forward only, not recomputes)."""
    captured: dict[int, torch.Tensor] = {}
    key_modules = model_adapter(wrapped.model).key_modules(wrapped.model)
    handles = []

    def hook_for(idx: int):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if not wrapped.context.recomputing:
                captured[idx] = out
        return hook

    try:
        for idx in layers:
            handles.append(key_modules[idx].register_forward_hook(hook_for(idx)))
        yield captured
    finally:
        for h in handles:
            h.remove()


def lm_loss(logits_BKV: torch.Tensor, targets_BK: torch.Tensor, valid_BK: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens, in float32."""
    ce_BK = F.cross_entropy(logits_BKV.float().transpose(1, 2), targets_BK, reduction="none")
    return (ce_BK * valid_BK).sum() / valid_BK.sum().clamp(min=1)


def mean_loss(img_NHD: torch.Tensor, txt_MHD: torch.Tensor) -> torch.Tensor:
    return (img_NHD.mean(0) - txt_MHD.mean(0)).square().sum(-1).mean() / img_NHD.shape[-1]


def coral_loss(img_NHD: torch.Tensor, txt_MHD: torch.Tensor) -> torch.Tensor:
    D = img_NHD.shape[-1]
    return (_covariance(img_NHD) - _covariance(txt_MHD)).square().sum((-1, -2)).mean() / (4 * D * D)


def _covariance(x_NHD: torch.Tensor) -> torch.Tensor:
    xc_HND = (x_NHD - x_NHD.mean(0)).transpose(0, 1)
    return xc_HND.transpose(1, 2) @ xc_HND / max(x_NHD.shape[0] - 1, 1)


def median_bandwidth(img_NHD: torch.Tensor, txt_MHD: torch.Tensor) -> torch.Tensor:
    """Median pairwise distance of a pooled sample, per head (detached): shape (H,)."""
    pooled_HPD = torch.cat([img_NHD[:MEDIAN_SAMPLE], txt_MHD[:MEDIAN_SAMPLE]]).detach().transpose(0, 1)
    dist_HPP = torch.cdist(pooled_HPD, pooled_HPD)
    upper_2Q = torch.triu_indices(dist_HPP.shape[-1], dist_HPP.shape[-1], 1, device=dist_HPP.device)
    return dist_HPP[:, upper_2Q[0], upper_2Q[1]].median(dim=-1).values.clamp(min=1e-6)


def rff_mmd_loss(img_NHD: torch.Tensor, txt_MHD: torch.Tensor, omega_HDF: torch.Tensor, phase_HF: torch.Tensor,
                 bandwidth: float | None) -> torch.Tensor:
    """Squared MMD of the Gaussian kernel exp(-|x-y|^2 / 2 sigma^2) with random Fourier features.

    Gradient flows to the image keys only; the text keys are the target (detached or frozen-base).
    """
    sigma_H = median_bandwidth(img_NHD, txt_MHD) if bandwidth is None else torch.full(
        (img_NHD.shape[1],), bandwidth, device=img_NHD.device)
    w_HDF = omega_HDF / sigma_H[:, None, None]
    scale = math.sqrt(2.0 / omega_HDF.shape[-1])

    def mean_features(x_NHD: torch.Tensor) -> torch.Tensor:
        return torch.cos(torch.bmm(x_NHD.transpose(0, 1), w_HDF) + phase_HF[:, None, :]).mean(1)

    with torch.no_grad():  # the text side is a fixed target: no graph over its (often many) keys
        target_HF = mean_features(txt_MHD)
    return (scale * scale) * (mean_features(img_NHD) - target_HF).square().sum(-1).mean()


class MaLoRAObjective(nn.Module):
    """LM + alignment loss around a :class:`MaLoRAModel`; ``forward`` returns ``(loss, terms)``."""

    def __init__(self, malora: MaLoRAModel, align: AlignConfig,
                 dummy_pixels: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.malora = malora
        self.align = align
        self.dummy_pixels = dummy_pixels
        info = model_info(malora.model)
        self.num_kv_heads, self.head_dim = info.num_kv_heads, info.head_dim
        self.align_layers = resolve_layers(align.layers, info.num_layers, "align.layers")
        g = torch.Generator().manual_seed(align.seed)
        shape = (self.num_kv_heads, self.head_dim, align.mmd_features)
        device = next(malora.model.parameters()).device
        self.register_buffer("rff_omega", torch.randn(shape, generator=g).to(device), persistent=False)
        self.register_buffer("rff_phase", (torch.rand(shape[0], shape[2], generator=g) * 2 * math.pi).to(device),
                             persistent=False)

    def forward(self, inputs: dict[str, torch.Tensor], answer_mask_BT: torch.Tensor,
                modality_BT: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs = self._encode_images(inputs)
        image_BT = (modality_BT == IMAGE) | (modality_BT == VIDEO)
        text_BT = modality_BT == TEXT
        wants_align = self.align.loss != "none"
        # The reference pass runs on every rank whenever configured, images or not: same collectives.
        reference = self._frozen_text_keys(inputs) if wants_align and self.align.text_reference == "frozen" else None
        use_align = wants_align and bool(image_BT.any()) and int(text_BT.sum()) >= 2
        keep_K = answer_positions(answer_mask_BT)
        with capture_keys(self.malora, self.align_layers if use_align else []) as keys:
            logits_BKV = self.malora(**inputs, logits_to_keep=keep_K, use_cache=False).logits
        targets_BK = inputs["input_ids"][:, keep_K + 1]
        lm = lm_loss(logits_BKV, targets_BK, answer_mask_BT[:, keep_K + 1].float())
        align = logits_BKV.new_zeros((), dtype=torch.float32)
        if use_align:  # micro-batches without images skip the term; the branches still ran above
            # Token indices once per micro-batch: boolean indexing per layer would sync the device each time.
            img_N, txt_M = image_BT.flatten().nonzero().squeeze(-1), text_BT.flatten().nonzero().squeeze(-1)
            for idx in self.align_layers:
                keys_PF = keys[idx].flatten(0, 1)
                txt_PF = reference[idx].flatten(0, 1) if reference is not None else keys_PF.detach()
                align = align + self.alignment(keys_PF[img_N], txt_PF[txt_M]) / len(self.align_layers)
        loss = lm + self.align.weight * align
        return loss, {"loss": loss.detach(), "lm": lm.detach(), "align": align.detach()}

    def alignment(self, img_NF: torch.Tensor, txt_MF: torch.Tensor) -> torch.Tensor:
        """The configured alignment loss between image and text keys (float32, averaged over heads)."""
        img_NHD = img_NF.float().view(-1, self.num_kv_heads, self.head_dim)
        txt_MHD = txt_MF.float().view(-1, self.num_kv_heads, self.head_dim)
        if self.align.loss == "mean":
            return mean_loss(img_NHD, txt_MHD)
        if self.align.loss == "coral":
            return coral_loss(img_NHD, txt_MHD)
        return rff_mmd_loss(img_NHD, txt_MHD, self.rff_omega.float(), self.rff_phase.float(), self.align.mmd_bandwidth)

    @torch.no_grad()
    def _encode_images(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the (frozen) vision tower first, on every micro-batch, and hand its output to the model.

        Under ZeRO-3 every rank must gather the same modules in the same order. A micro-batch without
        images would skip the vision tower inside the model's forward, so the tower always runs here,
        before the language model, on the real pixels or on ``dummy_pixels`` (output discarded).
        """
        model = self.malora.model
        if "pixel_values" not in inputs:
            if self.dummy_pixels is not None:
                dummy = {k: v.to(self._device()) for k, v in self.dummy_pixels.items()}
                model_adapter(model).image_features(model, dummy)
            return inputs
        return encode_images(model, inputs)

    def _device(self) -> torch.device:
        return next(iter(self.malora.adapter_parameters().values())).device

    @torch.no_grad()
    def _frozen_text_keys(self, inputs: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Keys of the base model (both branches off) on the same micro-batch."""
        with self.malora.branches(image=False, text=False), capture_keys(self.malora, self.align_layers) as keys:
            self.malora(**inputs, logits_to_keep=1, use_cache=False)
        return dict(keys)
