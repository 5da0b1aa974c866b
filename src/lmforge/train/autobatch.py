"""`train.micro_batch_size=auto` and out-of-memory errors people can act on.

auto tries a forward and backward pass of the model at a micro-batch and halves it until one fits; the
global batch stays what the config says, through gradient accumulation. On CUDA a real out-of-memory
error says "does not fit". LMFORGE_MEMORY_LIMIT (bytes, or 300M / 2G) pretends the device has that much
memory: a trial fits when its measured peak plus the optimizer state it will need stays under the limit.
On a CPU without that limit the estimate decides (running out of host memory swaps or kills a process
instead of raising an error that could be caught).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import re
from collections.abc import Callable, Iterator

import torch

from ..config import Config
from ..device import autocast
from ..errors import LmforgeError
from ..estimate import (
    GIB,
    Device,
    largest_micro_batch,
    make_it_fit,
    measure_step_peak,
    memory_breakdown,
    optimizer_bytes,
    setting_from_config,
)
from ..model import GPT
from .distributed import all_min

LIMIT_ENV = "LMFORGE_MEMORY_LIMIT"


class OutOfMemory(LmforgeError, RuntimeError):
    """Training ran out of device memory; the message quotes the estimate and what to change."""


def parse_size(text: str) -> int:
    """'300M', '2G', '1.5GiB' or a plain number of bytes -> bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not m:
        raise OutOfMemory(f"{LIMIT_ENV}={text!r}: write a number of bytes or e.g. 300M, 2G")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def memory_limit() -> int | None:
    """The simulated memory limit from LMFORGE_MEMORY_LIMIT, if set."""
    value = os.environ.get(LIMIT_ENV)
    return parse_size(value) if value else None


def _next_smaller(b: int, per_rank: int | None) -> int:
    """Half of b, or (with a fixed per-rank batch) the largest divisor of it that is at most half of b."""
    if per_rank is None:
        return b // 2
    return max((d for d in range(1, b // 2 + 1) if per_rank % d == 0), default=0)


def _optimizer_bytes(cfg: Config) -> int:
    return optimizer_bytes(cfg.model, cfg.train.optimizer)


def _trial_fits(
    model: GPT, b: int, cfg: Config, device: torch.device, precision: str, limit: int | None
) -> bool:
    """One forward/backward at micro-batch b: does it (plus the optimizer state to come) fit?"""
    T, V = cfg.model.seq_len, cfg.model.vocab_size
    x = torch.randint(0, V, (b, T), device=device)
    y = torch.randint(0, V, (b, T), device=device)
    extra = _optimizer_bytes(cfg)
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            with autocast(device, precision):
                loss = model(x, y)
            loss.backward()
            peak = torch.cuda.max_memory_allocated(device)  # includes the weights
            capacity = limit if limit is not None else torch.cuda.get_device_properties(device).total_memory
            return peak + extra <= capacity
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        with autocast(device, precision):
            peak = measure_step_peak(model, x, y)
        return limit is None or weights + peak + extra <= limit
    except torch.OutOfMemoryError:
        return False
    finally:
        model.zero_grad(set_to_none=True)
        del x, y
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def resolve_micro_batch(
    cfg: Config,
    device: torch.device,
    precision: str,
    world_size: int,
    say: Callable[[str], None],
    estimate_only: bool = False,
    build_model: Callable[[], torch.nn.Module] | None = None,
) -> Config:
    """cfg with micro_batch_size=auto replaced by the largest micro-batch that fits (global batch kept).

    estimate_only (a dry run): the estimate decides, nothing is run. build_model: the model as training
    will run it (activation checkpointing, FSDP); by default a plain GPT on the device, so with FSDP over
    several GPUs and no build_model the estimate decides (a whole model per GPU would not be the test).
    """
    gb = cfg.train.global_batch_size
    if gb is not None and gb % world_size:
        raise OutOfMemory(f"train.global_batch_size={gb} is not a multiple of the world size {world_size}")
    per_rank = gb // world_size if gb else None
    limit = memory_limit()
    s = setting_from_config(cfg, world_size, precision)
    sharded = getattr(cfg.train, "parallel", "ddp") == "fsdp" and world_size > 1
    if estimate_only or (device.type != "cuda" and limit is None) or (sharded and build_model is None):
        capacity = limit or _device_memory(device)
        kind = "cuda" if device.type == "cuda" else "cpu"
        mb = largest_micro_batch(cfg.model, s, capacity, kind, upto=per_rank or 1024)
        b = mb if per_rank is None else max((d for d in range(1, mb + 1) if per_rank % d == 0), default=0)
        how = f"by the estimate for {capacity / GIB:.1f} GiB of available memory"
    else:
        capacity = limit or _device_memory(device)
        # start above what the estimate allows, so the trials, not the estimate, have the last word
        guess = max(
            1, largest_micro_batch(cfg.model, s, capacity, "cuda" if device.type == "cuda" else "cpu")
        )
        b = per_rank or 2 * guess
        model = build_model() if build_model is not None else GPT(cfg.model).to(device)
        try:
            while b >= 1 and not _trial_fits(model, b, cfg, device, precision, limit):
                b = _next_smaller(b, per_rank)
        finally:
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        how = f"by trial ({'simulated limit ' if limit else ''}{capacity / GIB:.2f} GiB)"
    b = all_min(b, device)  # every rank uses the smallest micro-batch any rank found
    if b < 1:
        raise OutOfMemory(
            f"train.micro_batch_size=auto: even a micro-batch of 1 does not fit ({how}); "
            f"{_suggestion(cfg, s, capacity, device.type)}"
        )
    accum = (gb // (b * world_size)) if gb else 1
    say(
        f"train.micro_batch_size=auto -> {b} {how}; global batch {gb or b * world_size}, accumulation {accum}"
    )
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=b))


def _device_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return _available_host_memory()


def _available_host_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * GIB


def _suggestion(cfg: Config, s, capacity: int, kind: str) -> str:
    fixed, what = make_it_fit(
        cfg.model, s, Device("this device", capacity, 1.0, kind if kind == "cuda" else "cpu")
    )
    if fixed is None:
        return "use a smaller model or more GPUs"
    return f"try: {what} ({fixed.describe()})"


def oom_message(cfg: Config, micro_batch: int, precision: str, device: torch.device, world_size: int) -> str:
    """One line: out of memory, the estimate for this setting, and a change that fits."""
    s = dataclasses.replace(setting_from_config(cfg, world_size, precision), micro_batch_size=micro_batch)
    kind = "cuda" if device.type == "cuda" else "cpu"
    mem = memory_breakdown(cfg.model, s, kind)
    parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in mem.items())
    if device.type == "cuda":
        capacity = torch.cuda.get_device_properties(device).total_memory
    else:
        capacity = memory_limit() or _available_host_memory()
    return (
        f"out of memory on {device} ({capacity / GIB:.1f} GiB) at micro-batch {micro_batch}: the estimate is "
        f"{sum(mem.values()) / GIB:.2f} GiB per device ({parts} GiB); {_suggestion(cfg, s, capacity, kind)}, "
        f"or --train.micro_batch_size=auto"
    )


@contextlib.contextmanager
def oom_guard(
    cfg: Config, micro_batch: int, precision: str, device: torch.device, world_size: int
) -> Iterator[None]:
    """Turn an out-of-memory error inside the block into one clear line (no CUDA traceback)."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise OutOfMemory(oom_message(cfg, micro_batch, precision, device, world_size)) from None
    except RuntimeError as e:  # MPS and the CPU allocator raise plain RuntimeErrors
        if "out of memory" not in str(e).lower() or isinstance(e, LmforgeError):
            raise
        raise OutOfMemory(oom_message(cfg, micro_batch, precision, device, world_size)) from None
