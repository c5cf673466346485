"""Rank functions for tests of kscale.executors.ray_group: each joins the process group the way
kscale.eval.run.process_group does (env://, gloo) and talks to its peers."""

import os

import torch.distributed as dist


def gather_pids(spec, fail_rank: int | None = None):
    """(rank, world, every rank's (rank, pid, MASTER_ADDR)) after a real all_gather; ``fail_rank`` raises."""
    dist.init_process_group(backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == fail_rank:
        raise ValueError(f"rank {rank} refuses")
    got: list = [None] * world
    dist.all_gather_object(got, (rank, os.getpid(), os.environ["MASTER_ADDR"]))
    dist.destroy_process_group()
    return rank, world, got
