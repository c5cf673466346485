"""Shared fixtures: tiny debug models saved to disk, spec builders, a session-wide local Ray.

Skip helpers live here too (``require_gpu``), so every test says why it skips in one vocabulary.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("KSCALE_CACHE", str(REPO / ".cache" / "kscale"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# every `kscale submit` records its run under $KSCALE_HOME: keep the tests' records out of the user's ~/.kscale
os.environ.setdefault("KSCALE_HOME", __import__("tempfile").mkdtemp(prefix="kscale-home-"))

require_gpu = pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU (run on the lent GPU machine)")


@pytest.fixture(scope="session")
def qwen_dir() -> str:
    from kscale.models.debug import debug_model_dir

    return debug_model_dir("qwen2_5_vl")


@pytest.fixture(scope="session")
def llava_dir() -> str:
    from kscale.models.debug import debug_model_dir

    return debug_model_dir("llava")


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One small local Ray for the session (no dashboard), shut down at the end; never `ray stop`."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="warning",
                 _temp_dir=str(tmp_path_factory.mktemp("ray")), configure_logging=True)
    yield ray
    ray.shutdown()


def extract_spec(tmp_path: Path, model: str = "debug:qwen2_5_vl", **over) -> dict:
    """A small extraction job as a dict; ``over`` replaces top-level sections (merged one level deep)."""
    d = {
        "kind": "extract", "name": "t",
        "model": {"path": model, "dtype": "float32"},
        "data": {"source": "generated", "generated": {"n_samples": 12, "image_size": 112}, "shard_size": 4},
        "extract": {"batch_size": 4, "key_dtype": "float32"},
        "output": {"path": str(tmp_path / "store")},
        "resources": {"executor": "local"},
    }
    for k, v in over.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    return d
