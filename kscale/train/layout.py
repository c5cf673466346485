"""The run directory of a ``kind: train`` job: file names other stages may rely on.

``kscale.train.run`` writes it, ``kscale.train.evaluate`` reads it back, and a bias job scores its
checkpoints (:mod:`kscale.bias.variants`); all three take the names from here, so the format is written
down once::

    metrics.jsonl                      one line per logged step
    split.json                         {"train": [...], "heldout": [...]} sample ids
    checkpoints/stepNNNNNNNN/          DeepSpeed state; adapter tensors under CHECKPOINT_PREFIX
    adapter/                           the final adapter (kscale.adapters: safetensors + config)
    eval.json, eval.md                 the before/after table
    errors.json                        samples skipped in this run, with the reason (train.max_seq_len)
    ranks/rankR.json                   parameters rank R holds after loading and at the first step
    report.html, train_*.png           the run's page (kscale.train.report)
    tensorboard/                       event files when train.report_to has tensorboard
"""

from __future__ import annotations

import re

from kscale.spec.adapter import RUN_ADAPTER_DIR

METRICS = "metrics.jsonl"
SPLIT = "split.json"
ERRORS = "errors.json"
RANKS = "ranks"
CHECKPOINTS = "checkpoints"
ADAPTER_DIR = RUN_ADAPTER_DIR  # "adapter": named with the spec, which checks `extract.adapter` paths
# DeepSpeed saves MaLoRAObjective's state: its ``malora`` (MaLoRAModel) wraps the base ``model``
CHECKPOINT_PREFIX = "malora.model."
STEP_DIR = re.compile(r"^step(\d+)$")


def checkpoint_tag(step: int) -> str:
    """The checkpoint folder name of ``step`` (matches ``STEP_DIR``; zero-padded so names sort by step)."""
    return f"step{step:08d}"
