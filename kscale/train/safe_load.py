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

The checkpoint engine is not DeepSpeed's only reader: its optimizers read some files themselves with
``torch.load(weights_only=False)`` (issue 21, item 2): ``base_optimizer`` and ZeRO-3's ``stage3`` read
``zero/optimizer_state.pt`` and the per-parameter ``zero/<name>/*.pt`` of a universal checkpoint
(``deepspeed.checkpoint.universal_checkpoint``), ``zero_to_fp32`` the ZeRO-3 shards when no optimizer state is
loaded. So :func:`weights_only_checkpoints` also replaces ``torch.load`` itself for the duration of the load:
every call, whatever ``weights_only`` its caller passes, becomes :func:`load_weights_only`. The spec refuses
the DeepSpeed settings that select those other readers (``train.deepspeed.extra.checkpoint...``,
:data:`kscale.spec.train.CHECKPOINT_LOADING_EXTRA`); the patch holds even where a reader is reached anyway.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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


def _torch_load() -> Callable[..., Any]:
    """torch's own ``torch.load``, also while :func:`weights_only_torch_load` has replaced it."""
    import torch

    return getattr(torch.load, "_kscale_replaces", torch.load)


def load_weights_only(path: Any, map_location: Any = None, *, mmap: bool | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` with DeepSpeed's plain classes allowed; UnsafeCheckpoint
    for a file that asks for anything else (nothing of it is executed)."""
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return _torch_load()(path, map_location=map_location, weights_only=True, mmap=mmap)
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
def weights_only_torch_load() -> Iterator[None]:
    """Within the block every ``torch.load`` (also reached as ``torch.serialization.load``) is
    :func:`load_weights_only`: its ``weights_only=False`` and ``pickle_module`` are ignored. Process-wide,
    so hold it only around a load (the training loop's own threads load nothing meanwhile)."""
    import torch

    real = _torch_load()
    previous = torch.load, torch.serialization.load

    @functools.wraps(real)
    def forced(f: Any, map_location: Any = None, pickle_module: Any = None, *, weights_only: bool | None = None,
               mmap: bool | None = None, **pickle_load_args: Any) -> Any:
        return load_weights_only(f, map_location, mmap=mmap)

    forced._kscale_replaces = real  # type: ignore[attr-defined]
    torch.load = torch.serialization.load = forced
    try:
        yield
    finally:
        torch.load, torch.serialization.load = previous


@contextlib.contextmanager
def weights_only_checkpoints(engine: Any) -> Iterator[None]:
    """Within the block, ``engine.load_checkpoint`` reads every file with ``weights_only=True``: through its
    checkpoint engine and through any ``torch.load`` DeepSpeed calls directly."""
    inner = engine.checkpoint_engine
    engine.checkpoint_engine = _WeightsOnlyEngine(inner)
    try:
        with weights_only_torch_load():
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
