"""Fixtures for MaLoRA tests: a tiny random Qwen2.5-VL built from a config, and batches with images.

Legend: B batch, T tokens, P image patches (pixel rows), N image tokens per image.
"""

from __future__ import annotations

import pytest
import torch

from tests.unit.train.tiny_qwen import TinyVLM, tiny_batch, tiny_qwen


@pytest.fixture
def tiny() -> TinyVLM:
    return tiny_qwen(seed=0)


@pytest.fixture
def batch(tiny: TinyVLM) -> dict[str, torch.Tensor]:
    """Two sequences, the first with one image, the second text only (padded to the same length)."""
    return tiny_batch(tiny, with_image=[True, False], seed=1)


@pytest.fixture(scope="session")
def debug_qwen_dir(tmp_path_factory) -> str:
    """The registered tiny Qwen2.5-VL saved like a real checkpoint (kscale.models.debug)."""
    from kscale.models.debug import build_debug_model

    return build_debug_model("qwen2_5_vl", tmp_path_factory.mktemp("debug_qwen"), seed=0)


@pytest.fixture
def loaded_qwen(debug_qwen_dir):
    """A fresh copy of the debug model loaded through kscale.models (float32, CPU)."""
    from kscale.models.registry import load_model
    from kscale.spec import ModelSpec

    loaded = load_model(ModelSpec(path=debug_qwen_dir, device="cpu", dtype="float32"))
    loaded.model.config.use_cache = False
    return loaded


@pytest.fixture
def qa_batch(loaded_qwen):
    """Six generated (image, question, answer) samples, one without its image, as a kscale.models Batch."""
    from kscale.data.generated import GeneratedSource
    from kscale.spec import GeneratedDataSpec

    src = GeneratedSource(GeneratedDataSpec(n_samples=6, seed=0, tasks=["color", "shape", "position"]))
    recs = [src.get(i) for i in range(6)]
    images = [r.image if i != 5 else None for i, r in enumerate(recs)]
    return loaded_qwen.adapter.build_batch(loaded_qwen, images, [r.text for r in recs], [r.answer for r in recs])
