"""Training data: the job's source split into train / held-out, and a deterministic micro-batch plan.

Records come from :func:`kscale.data.open_source` (the same sources as extraction: manifest, saved HF
dataset, generated shapes whose questions are answered only by the image); each needs an ``answer``.
They are tokenised by the model family's adapter (:meth:`kscale.models.registry.Adapter.build_batch`),
which also tags every token's modality and marks the answer span.

The plan is a pure function of (seed, step, micro-step, rank): no loader state to checkpoint, so a
resumed run reads exactly the micro-batches the killed run would have read. A record longer than
``train.max_seq_len`` tokens (prompt, image tokens and answer) is skipped like a record with an error,
the next one in order takes its place, and the reason is kept in ``plan.errors``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from kscale.data.records import Record, Source


@dataclass(frozen=True)
class Split:
    train: list[int]
    heldout: list[int]


def split_indices(n: int, heldout_fraction: float, max_heldout: int, seed: int) -> Split:
    """A seeded permutation: the first share is held out (capped), the rest trains."""
    if n < 2:
        raise ValueError(f"data: {n} record(s); training needs at least 2 (one is held out)")
    perm = np.random.default_rng(seed).permutation(n)
    n_heldout = min(max(1, round(n * heldout_fraction)), max_heldout, n - 1)
    return Split(train=sorted(perm[n_heldout:].tolist()), heldout=sorted(perm[:n_heldout].tolist()))


class MicroBatchPlan:
    """Which records form micro-batch (step, micro_step) on ``rank``: epochs of seeded shuffles."""

    def __init__(self, source: Source, indices: list[int], micro_batch_size: int, grad_accum: int,
                 world_size: int, seed: int, too_long: Callable[[Record], str | None] | None = None) -> None:
        self.source = source
        self.too_long = too_long
        self.errors: dict[int, str] = {}  # sample id -> why it was skipped (this process's draws)
        self.indices = indices
        self.micro_batch_size = micro_batch_size
        self.grad_accum = grad_accum
        self.world_size = world_size
        self.seed = seed
        self._orders: dict[int, np.ndarray] = {}

    def records(self, step: int, micro_step: int, rank: int) -> list[Record]:
        """The usable records of one micro-batch; unusable ones are replaced by the next in order."""
        first = ((step * self.grad_accum + micro_step) * self.world_size + rank) * self.micro_batch_size
        out: list[Record] = []
        position = first
        while len(out) < self.micro_batch_size:
            if position - first > 100 * self.micro_batch_size + len(self.indices):
                raise ValueError("data: no usable training records (every record has an error or no answer)")
            record = self.source.get(self._index(position))
            position += 1
            if record.error is None and record.answer:
                reason = self.too_long(record) if self.too_long is not None else None
                if reason is None:
                    out.append(record)
                else:
                    self.errors[record.sample_id] = reason
        return out

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.indices))
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.indices))}
        return self.indices[int(self._orders[epoch][offset])]


def collate(loaded: Any, records: list[Record]) -> Any:
    """Records to a :class:`kscale.models.registry.Batch` (inputs, modality tags, answer mask)."""
    return loaded.adapter.batch(loaded, [r.sample() for r in records])


def sequence_check(loaded: Any, max_seq_len: int) -> Callable[[Record], str | None]:
    """A record's reason to be skipped for length (None when it fits), memoised per sample id."""
    seen: dict[int, str | None] = {}

    def too_long(record: Record) -> str | None:
        if record.sample_id not in seen:
            n = int(collate(loaded, [record]).inputs["attention_mask"].sum())
            seen[record.sample_id] = (f"sequence of {n} tokens is longer than train.max_seq_len={max_seq_len}"
                                      if n > max_seq_len else None)
        return seen[record.sample_id]

    return too_long
