"""Process groups and the scalar collectives the run agrees through. A single process is world size 1 and
takes the same path (every collective returns its own value)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import LmforgeError


class DistributedError(LmforgeError, RuntimeError):
    """A collective failed or timed out; the message names this rank and what to check."""


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


def all_reduce_sum(values: list[float], env: DistEnv, device: torch.device) -> list[float]:
    """Elementwise sums of a list of scalars over ranks (the list itself for world size 1)."""
    if env.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def ensure_process_group(device: torch.device, timeout_s: int) -> None:
    """FSDP2 needs a process group even alone: a one-process group kept in memory (no network)."""
    if dist.is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timedelta(seconds=timeout_s)
    )


def all_agree(flag: bool, env: DistEnv, device: torch.device) -> bool:
    """True on every rank if it is true on any rank, so all ranks stop (or skip) together."""
    if env.world_size == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_ok(ok: bool) -> bool:
    """Whether every rank succeeded (a failure on one rank is seen by all, so none waits forever)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return ok
    t = torch.tensor([0 if ok else 1], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return int(t.item()) == 0


def all_min(value: int, device: torch.device) -> int:
    """The smallest value any rank has (the value itself without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


@contextlib.contextmanager
def collective_errors(env: DistEnv, timeout_s: int) -> Iterator[None]:
    """Turn a timed-out or broken collective into one line naming this rank and what to check."""
    try:
        yield
    except (RuntimeError, dist.DistError) as e:
        if env.world_size == 1 or isinstance(e, LmforgeError):
            raise
        text = str(e).lower()
        if "timed out" in text or "timeout" in text:
            raise DistributedError(
                f"rank {env.rank} of {env.world_size}: a collective did not finish within "
                f"train.dist_timeout_s={timeout_s}s: another rank crashed, hangs or is much slower; read the "
                f"other ranks' logs (NCCL_DEBUG=INFO on GPUs) and raise train.dist_timeout_s if they are only slow"
            ) from e
        if "connection" in text or "peer" in text or "closed" in text:
            raise DistributedError(
                f"rank {env.rank} of {env.world_size}: lost contact with another rank during a collective "
                f"(it exited or was killed); read the other ranks' logs for the first error"
            ) from e
        raise
