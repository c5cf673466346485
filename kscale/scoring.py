"""Answer scores, answer positions and counterfactual images: how a model is scored on (image, question,
answer) records, shared by the bias stage and the MaLoRA training stage (neither imports the other).

How it connects: a caller runs the model with ``logits_to_keep`` set to :func:`answer_positions` (only
logits that predict an answer token are materialised), then calls :func:`answer_scores` for the
teacher-forced log-likelihood and exact match of each row's answer span. The bias worker
(:mod:`kscale.bias.worker`) and the before/after table of :mod:`kscale.train.evaluate` score with these two
functions, under the image conditions of :func:`condition_image`, so both measure visual dependency the
same way; the MaLoRA objective (:mod:`kscale.train.objective`) keeps only the logits of
:func:`answer_positions` for its LM loss.

Image conditions change only the image: the same text, and an image of the same size (so the processor
gives the same number of image tokens), except ``none``, which removes the image (the blind baseline of
the language prior). Everything is a pure function of (seed, sample id), so any shard can be recomputed
anywhere with the same result.

- ``blank``: one constant colour;
- ``noise``: uniform random pixels, seeded by (seed, sample id);
- ``swapped``: the image of another sample of the source, ``donor = derangement(n, seed)[sample id]``
  (never the sample itself), resized to this sample's size. A donor without a usable image passes the
  turn to the next one along the derangement's cycle.

Legend: B rows (sample x candidate), T tokens, K kept logit positions, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from kscale.data.records import Record


@dataclass
class AnswerScores:
    """Teacher-forced scores of each row's answer span (float64 / bool numpy, length B)."""

    ll_sum: np.ndarray  # sum of log p(answer token | prefix)
    n_tokens: np.ndarray  # answer tokens scored
    exact: np.ndarray  # every answer token is the argmax (greedy decoding would produce the answer)
    greedy: list[str]  # argmax token ids at the answer positions, space-joined (for agreement)

    @property
    def ll_mean(self) -> np.ndarray:
        """Mean per-token log-likelihood (NaN for rows without answer tokens)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.ll_sum / self.n_tokens


def answer_positions(answer_mask_BT: torch.Tensor) -> torch.Tensor:
    """Positions whose next token is an answer token in any row: the logits ``answer_scores`` needs (K,)."""
    return torch.nonzero(answer_mask_BT[:, 1:].any(dim=0)).squeeze(-1)


def answer_scores(logits_BKV: torch.Tensor, input_ids_BT: torch.Tensor, answer_mask_BT: torch.Tensor,
                  keep_K: torch.Tensor) -> AnswerScores:
    """Log-likelihood and exact match of the answer span from logits at positions ``keep_K``.

    Logit position ``k`` predicts token ``k + 1``; a row's answer tokens are where ``answer_mask_BT`` is set.
    """
    keep_K = keep_K.to(input_ids_BT.device)
    targets_BK = input_ids_BT[:, keep_K + 1]
    valid_BK = answer_mask_BT[:, keep_K + 1]
    logp_BKV = torch.log_softmax(logits_BKV.float(), dim=-1)
    logp_BK = logp_BKV.gather(-1, targets_BK.unsqueeze(-1)).squeeze(-1)
    argmax_BK = logits_BKV.argmax(-1)
    hit_BK = (argmax_BK == targets_BK) | ~valid_BK
    ll = (logp_BK.double() * valid_BK).sum(1)
    greedy = [" ".join(str(int(t)) for t in argmax_BK[b][valid_BK[b]]) for b in range(len(argmax_BK))]
    return AnswerScores(ll.cpu().numpy(), valid_BK.sum(1).cpu().numpy(), hit_BK.all(1).cpu().numpy(), greedy)


def derangement(n: int, seed: int) -> np.ndarray:
    """donor[i] != i for every i (n >= 2): a seeded random cycle through all indices."""
    if n < 2:
        raise ValueError(f"a swapped image needs at least 2 samples, got {n}")
    order = np.random.default_rng([seed, n, 0x5A]).permutation(n)
    donor = np.empty(n, dtype=np.int64)
    donor[order] = np.roll(order, -1)  # each index takes the next one in the shuffled cycle
    return donor


def blank_image(like: Image.Image, rgb: list[int]) -> Image.Image:
    return Image.new("RGB", like.size, tuple(int(v) for v in rgb))


def noise_image(like: Image.Image, seed: int, sample_id: int) -> Image.Image:
    rng = np.random.default_rng([seed, sample_id, 0x4E])
    w, h = like.size
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")


def swap_donor(source, sample_id: int, seed: int) -> tuple[int, Image.Image]:
    """(donor sample id, its image resized to the sample's size) for the ``swapped`` condition."""
    n = len(source)
    donor_of = derangement(n, seed)
    j = int(donor_of[sample_id])
    for _ in range(n - 1):
        rec = source.get(j)
        if rec.error is None and rec.image is not None and j != sample_id:
            return j, rec.image
        j = int(donor_of[j])
    raise ValueError(f"sample {sample_id}: no other sample with a usable image to swap in")


def condition_image(rec: Record, condition: str, seed: int, blank_rgb: list[int],
                    donor_image: Image.Image | None) -> Image.Image | None:
    """The image ``rec`` is scored with under ``condition``."""
    if condition == "real":
        return rec.image
    if condition == "none":
        return None
    if condition == "blank":
        return blank_image(rec.image, blank_rgb)
    if condition == "noise":
        return noise_image(rec.image, seed, rec.sample_id)
    assert condition == "swapped" and donor_image is not None
    return donor_image.convert("RGB").resize(rec.image.size, Image.BILINEAR)
