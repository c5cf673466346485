"""Fixtures for bias tests: the registered tiny models loaded once, generated records, a job builder.

Legend: B batch, T tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models run fastest single-threaded on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _load(path: str):
    from kscale.models import load_model
    from kscale.spec import ModelSpec

    return load_model(ModelSpec(path=path, dtype="float32", device="cpu"))


@pytest.fixture(scope="session")
def qwen(qwen_dir):
    return _load(qwen_dir)


@pytest.fixture(scope="session")
def llava(llava_dir):
    return _load(llava_dir)


def records(n: int, tasks=("color", "shape", "conflict"), size: int = 56, seed: int = 0):
    from kscale.data.generated import GeneratedSource
    from kscale.spec import GeneratedDataSpec

    src = GeneratedSource(GeneratedDataSpec(n_samples=n, image_size=size, seed=seed, tasks=list(tasks)))
    return src, [src.get(i) for i in range(n)]


def bias_job(tmp_path: Path, model: str, **over) -> dict:
    """A small bias job dict; ``over`` replaces top-level sections (merged one level deep)."""
    d = {
        "kind": "bias", "name": "tb",
        "model": {"path": model, "dtype": "float32", "device": "cpu"},
        "data": {"source": "generated", "shard_size": 4,
                 "generated": {"n_samples": 8, "image_size": 56, "tasks": ["color", "conflict"]}},
        "bias": {"batch_size": 4, "bootstrap": 200,
                 "dropping": {"fractions": [0.5, 1.0], "orders": ["random", "most_attended", "text"]}},
        "output": {"path": str(tmp_path / "bias")},
        "resources": {"executor": "local", "torch_threads": 1},
    }
    for k, v in over.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    return d
