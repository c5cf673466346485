"""Resuming a train run never executes code from the run folder.

DeepSpeed's checkpoint engine reads every ``.pt`` file with ``torch.load(weights_only=False)``: full
unpickling, so a crafted ``checkpoints/latest`` + ``.pt`` in a run folder runs arbitrary code on resume
(issue 11, finding 5). :func:`weights_only_checkpoints` swaps the engine's ``checkpoint_engine`` for one
whose ``load`` uses ``torch.load(weights_only=True)``: tensors, containers and primitives only, plus the
few plain DeepSpeed classes its own checkpoints hold (``DEEPSPEED_SAFE_GLOBALS``, found with
``torch.serialization.get_unsafe_globals_in_checkpoint`` on ZeRO 2 and 3 checkpoints, with and without
CPU offload of the optimizer and parameters: an enum, a loss scaler's attributes, a dataclass of two
ints). Anything else is refused with :class:`UnsafeCheckpoint`, naming the file and the global it asked
for. :func:`checkpoint_tag_to_load` reads ``latest`` and accepts only a ``stepNNNNNNNN`` folder inside
``checkpoints/`` (no path from the file is followed).
"""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path
from typing import Any, Iterator

from kscale.errors import KscaleError
from kscale.train.layout import STEP_DIR

DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.zero.config:ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler:LossScaler",
    "deepspeed.runtime.fp16.loss_scaler:DynamicLossScaler",
    "deepspeed.utils.tensor_fragment:fragment_address",
)


class UnsafeCheckpoint(KscaleError):
    """A checkpoint in the run folder is not loadable as weights only (it would run code), or ``latest``
    names something that is not one of this run's checkpoint folders."""


def _safe_globals() -> list[Any]:
    out = []
    for ref in DEEPSPEED_SAFE_GLOBALS:
        mod, _, name = ref.partition(":")
        try:
            out.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):  # another DeepSpeed version: that class is simply not allowed
            continue
    return out


def load_weights_only(path: str | Path, map_location: Any = None) -> Any:
    """``torch.load(path, weights_only=True)`` with DeepSpeed's plain classes allowed; UnsafeCheckpoint
    for a file that asks for anything else (nothing of it is executed)."""
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "GLOBAL" in ln or "global" in ln), lines[0] if lines else repr(e))
        raise UnsafeCheckpoint(f"checkpoint {str(path)!r} is not loadable as weights only, refusing to unpickle "
                               f"it (it could run code): {why.strip()[:300]}") from None


class _WeightsOnlyEngine:
    """A DeepSpeed checkpoint engine whose ``load`` is :func:`load_weights_only`; everything else is the
    engine it wraps."""

    def __init__(self, inner: Any):
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        return load_weights_only(path, map_location)


@contextlib.contextmanager
def weights_only_checkpoints(engine: Any) -> Iterator[None]:
    """Within the block, ``engine.load_checkpoint`` reads every file with ``weights_only=True``."""
    inner = engine.checkpoint_engine
    engine.checkpoint_engine = _WeightsOnlyEngine(inner)
    try:
        yield
    finally:
        engine.checkpoint_engine = inner


def checkpoint_tag_to_load(root: Path) -> str | None:
    """The tag named by ``root/latest`` when it is a ``stepNNNNNNNN`` folder of ``root``; None without
    ``latest``; UnsafeCheckpoint for anything else (a path, ``..``, a missing folder)."""
    latest = root / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text(errors="replace").strip()
    if not STEP_DIR.match(tag) or not (root / tag).is_dir():
        raise UnsafeCheckpoint(f"{str(latest)!r} names {tag[:80]!r}, not a step folder of {str(root)!r}")
    return tag
