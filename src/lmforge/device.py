"""Device and numeric precision: pick them once, the same way for training and inference."""

from __future__ import annotations

import contextlib
import functools
import os
import platform

import torch

from .errors import LmforgeError


class DeviceError(LmforgeError, ValueError):
    """A device or precision this machine cannot provide; one line saying what to use instead."""


@contextlib.contextmanager
def one_intra_op_thread():
    """Run the block with one intra-op thread, then give the calling thread its count back.

    GNU OpenMP keeps a team of worker threads for every thread that has run a parallel op, and with more
    of them than cores its workers sleep between ops instead of spinning: a batched decode step on the
    continuous batcher's thread took about twice as long once the thread that loaded the model had a team
    too (bench model, 8 rows, 2 cores: 5.5-6.8 ms against 2.6-3.1 ms). Set-up work done on one thread for
    another to decode with (loading, the batcher's cache and packed weights) runs in here and starts none.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def pick_device(name: str = "auto") -> torch.device:
    """'auto' tries cuda, then mps, then cpu; an explicit name that is not available fails in one line."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"train.device={name!r}: no CUDA GPU is visible; use --train.device=cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"train.device={name!r}: MPS is not available; use --train.device=cpu or auto")
    return device


# LMFORGE_CPU_BF16=1 or 0 overrides the detection below: CI runs the precision-sensitive tests both ways
# on any machine, and a user can keep a CPU with native bf16 in fp32 without editing configs.
CPU_BF16_ENV = "LMFORGE_CPU_BF16"


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 matmuls natively (AVX512-BF16 or AMX on x86, bf16 on Apple M2+).

    On CPUs without it, bf16 matmuls are emulated: measured 36x slower than fp32 on an AVX2 EPYC
    (3072x256 @ 256x768: 27 ms fp32, 990 ms bf16, torch 2.13). `LMFORGE_CPU_BF16=1|0` overrides the answer.
    """
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("1", "0"):
        return forced == "1"
    if forced:
        raise DeviceError(f"{CPU_BF16_ENV}={forced!r}: must be 1 (use bf16 on the CPU) or 0 (do not)")
    return _detected_native_bf16()


@functools.lru_cache(maxsize=1)
def _detected_native_bf16() -> bool:
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return bool(_cpuinfo_words() & {"avx512_bf16", "amx_bf16"})
    if platform.system() == "Darwin":
        return machine == "arm64" and "M1" not in platform.processor()
    if machine in ("aarch64", "arm64"):
        # Linux on Arm lists features as "Features : ... bf16 ..." (Neoverse V1/V2, Graviton 3 and later).
        return "bf16" in _cpuinfo_words()
    return False


def _cpuinfo_words(path: str = "/proc/cpuinfo") -> set[str]:
    """The words of cpuinfo's "flags" (x86) and "Features" (Arm) lines; empty where it is unreadable."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [line for line in f if line.lower().startswith(("flags", "features")) and ":" in line]
    except OSError:
        return set()
    return {word for line in lines for word in line.split(":", 1)[1].split()}


def pick_precision(precision: str, device: torch.device) -> str:
    """Resolve 'auto': bf16 on CUDA with bf16 and on CPUs with native bf16; fp16 on older GPUs; else fp32."""
    if precision != "auto":
        if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise DeviceError("train.precision='bf16': this GPU has no bf16; use fp16 or auto")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def autocast(device: torch.device, precision: str):
    """The autocast context for a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# Dense bf16 tensor-core peak FLOP/s from vendor datasheets, for MFU (model FLOPs utilisation).
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card is 756e12
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


def peak_flops(device: torch.device) -> float | None:
    """Datasheet bf16 peak of the current GPU, or None when unknown (then MFU is not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name and "PCIe" in name:
        return 756e12
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None
