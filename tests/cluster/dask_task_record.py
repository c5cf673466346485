"""A dask preload that records which tasks of the analysis each worker computed, and where each dask server
keeps its files.

``tests/cluster/test_slurm_nodes.py`` names this module in ``DASK_DISTRIBUTED__WORKER__PRELOAD`` and
``DASK_DISTRIBUTED__SCHEDULER__PRELOAD`` (dask's own ``distributed.{worker,scheduler}.preload`` settings) in
the environment it submits the sbatch job with; the job's ``dask worker`` and ``dask scheduler`` processes,
started by the sbatch body, import it and call :func:`dask_setup`. The scheduler writes
``$KSCALE_TEST_DASK_TASKS/scheduler.json`` (its Slurm node, ``local_directory``: its scratch space, and the
address its dashboard is bound to). Each worker adds a worker plugin. Whenever the worker finishes executing a
task (``executing -> memory``: computed here, not a result fetched from another worker) the plugin rewrites
``$KSCALE_TEST_DASK_TASKS/<slurm node>-<pid>.json``: the worker's address, its Slurm node (``SLURMD_NODENAME``,
which ``srun`` sets in the worker's step), its ``local_directory``, its dashboard's bound address and the keys
it computed, grouped by task name (``chunk_sums``: one joint block of the layer streamed). Nothing in kscale or
in the body changes; the scheduler places the tasks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from distributed.diagnostics.plugin import WorkerPlugin

NAME = "kscale-test-task-record"


class TaskRecord(WorkerPlugin):
    def __init__(self, folder: str):
        self.folder = Path(folder)
        self.node = os.environ.get("SLURMD_NODENAME", "?")
        self.path = self.folder / f"{self.node}-{os.getpid()}.json"
        self.worker = None
        self.tasks: dict[str, list[str]] = {}

    def setup(self, worker) -> None:
        self.worker = worker
        self._write()

    def transition(self, key, start, finish, **kwargs) -> None:
        if start == "executing" and finish == "memory":
            from dask.utils import key_split

            self.tasks.setdefault(key_split(key), []).append(str(key))
            self._write()

    def _write(self) -> None:
        _write_json(self.path, {"node": self.node, "pid": os.getpid(),
                                "address": getattr(self.worker, "address", None),
                                "local_directory": getattr(self.worker, "local_directory", None),
                                "dashboard": dashboard(self.worker), "tasks": self.tasks})


def dashboard(server) -> str | None:
    """The address a dask server's HTTP dashboard is bound to (``host:port``; its log prints the node's IP
    whatever the bind address), None without one."""
    http = getattr(server, "http_server", None)
    return f"{http.address}:{http.port}" if http is not None and getattr(http, "address", None) else None


def _write_json(path: Path, rec: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec))
    os.replace(tmp, path)


async def dask_setup(server) -> None:
    from distributed import Scheduler

    folder = os.environ.get("KSCALE_TEST_DASK_TASKS")
    if not folder:
        return
    if isinstance(server, Scheduler):
        _write_json(Path(folder) / "scheduler.json", {"node": os.environ.get("SLURMD_NODENAME", "?"),
                                                      "local_directory": server.local_directory,
                                                      "dashboard": dashboard(server)})
    else:
        await server.plugin_add(TaskRecord(folder), name=NAME)
