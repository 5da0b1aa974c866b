"""Process-group setup and model wrapping. A single process is world size 1 and takes the same path."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank, world size, local rank (torchrun's environment variables)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files and prints."""
        return self.rank == 0


def init_distributed(device_type: str, timeout_s: int = 600) -> DistEnv:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); otherwise world size 1.

    A collective that waits longer than timeout_s fails instead of hanging (train.dist_timeout_s).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistEnv()
    env = DistEnv(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(
            backend="cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo",
            timeout=timedelta(seconds=timeout_s),
        )
    return env


def close_distributed(barrier: bool = True) -> None:
    """Leave the process group, if one was joined; with ``barrier``, once every rank has got here."""
    if dist.is_available() and dist.is_initialized():
        # A rank's last collective can return while its messages are still on the way to the
        # others; tearing the group down (and exiting) before they arrive can abort a peer. The
        # barrier makes every rank finish its collectives first.
        try:
            if barrier:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def all_reduce_mean(value: float, env: DistEnv, device: torch.device) -> float:
    """Mean of a scalar over ranks (identity for world size 1)."""
    if env.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / env.world_size
