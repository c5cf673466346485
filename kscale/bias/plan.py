"""The bias job's deterministic shard plan: every model variant x every data shard.

A :class:`BiasShard` is the unit of work, retry and resume. It carries its :class:`Variant` (so a Ray
actor needs nothing else to score it) and the sample range of :func:`kscale.data.plan_shards`. Results
land in ``shards/<name>.parquet`` with the commit marker ``shards/<name>.done.json`` written last.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kscale.bias.variants import Variant
from kscale.data import plan_shards


@dataclass(frozen=True)
class BiasShard:
    variant: Variant
    index: int
    start: int  # first sample id
    stop: int  # one past the last sample id

    @property
    def name(self) -> str:
        return f"{self.variant.slug}.s{self.index:06d}"


def plan(variants: list[Variant], n_samples: int, shard_size: int) -> list[BiasShard]:
    return [BiasShard(v, s.index, s.start, s.stop) for v in variants for s in plan_shards(n_samples, shard_size)]


def table_path(run_dir: str | Path, shard: BiasShard) -> Path:
    return Path(run_dir) / "shards" / f"{shard.name}.parquet"


def marker_path(run_dir: str | Path, shard: BiasShard) -> Path:
    return Path(run_dir) / "shards" / f"{shard.name}.done.json"
