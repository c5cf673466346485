"""Training curves beyond ``metrics.jsonl``: TensorBoard and Weights & Biases, chosen by ``train.report_to``.

:class:`RunLoggers` is created on rank 0 by :func:`kscale.train.run.run_train` and receives every record
that goes to ``metrics.jsonl`` (loss terms, learning rate, gradient norm, step time, the gate of every
adapted layer and branch), then the before/after evaluation table at the end. ``metrics.jsonl`` stays the
source of truth (the HTML report, :mod:`kscale.train.report`, is built from it); these are views.

- ``tensorboard``: event files in ``<run dir>/tensorboard`` (``torch.utils.tensorboard`` when the
  ``tensorboard`` package is installed, else ``tensorboardX``, which ``ray[train]`` brings);
  ``tensorboard --logdir <run dir>/tensorboard``.
- ``wandb``: ``wandb.init(project=..., name=<job name>, dir=<run dir>, id=<stable per run dir>,
  resume="allow")``, so a resumed run continues the same W&B run; offline with ``WANDB_MODE=offline``.

A backend that is asked for but not installed fails at start with the install command.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

TAGS = ("loss", "lm", "align", "lr", "grad_norm", "step_seconds")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record as flat scalar tags: ``train/<term>`` and ``gates/<layer>.<branch>``."""
    out = {}
    for k, v in record.items():
        if k in ("step", "gates") or v is None or not isinstance(v, (int, float)):
            continue
        out[f"train/{k}"] = float(v)
    for name, v in (record.get("gates") or {}).items():
        out[f"gates/{name}"] = float(v)
    return out


def _summary_writer(log_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        try:
            from tensorboardX import SummaryWriter
        except ImportError as err:
            raise ImportError("train.report_to: tensorboard needs `pip install tensorboard` "
                              "(or tensorboardX)") from err
    return SummaryWriter(log_dir=str(log_dir))


class RunLoggers:
    """The chosen backends; ``log(record)`` each logged step, ``log_eval(table, step)`` once, ``close()``."""

    def __init__(self, report_to: list[str], run_dir: Path, run_name: str, config: dict[str, Any]) -> None:
        self.tb = self.wandb_run = None
        if "tensorboard" in report_to:
            self.tb = _summary_writer(Path(run_dir) / "tensorboard")
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError as err:
                raise ImportError("train.report_to: wandb needs `pip install wandb` (and `wandb login`, "
                                  "or WANDB_MODE=offline)") from err
            run_id = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]
            self.wandb_run = wandb.init(project="kscale", name=run_name, dir=str(run_dir), id=run_id,
                                        resume="allow", config=config)

    def log(self, record: dict[str, Any]) -> None:
        values, step = scalars(record), int(record["step"])
        if self.tb is not None:
            for tag, v in values.items():
                self.tb.add_scalar(tag, v, step)
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def log_eval(self, table: dict[str, dict[str, float]], step: int) -> None:
        values = {f"eval/{variant}/{metric}": float(v) for variant, row in table.items() for metric, v in row.items()}
        if self.tb is not None:
            for tag, v in values.items():
                self.tb.add_scalar(tag, v, step)
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
