"""Fixtures for MaLoRA tests: a tiny random Qwen2.5-VL built from a config, and batches with images.

Legend: B batch, T tokens, P image patches (pixel rows), N image tokens per image.
"""

from __future__ import annotations

import pytest
import torch

from kscale.train.testing import TinyVLM, tiny_batch, tiny_qwen


@pytest.fixture
def tiny() -> TinyVLM:
    return tiny_qwen(seed=0)


@pytest.fixture
def batch(tiny: TinyVLM) -> dict[str, torch.Tensor]:
    """Two sequences, the first with one image, the second text only (padded to the same length)."""
    return tiny_batch(tiny, with_image=[True, False], seed=1)
