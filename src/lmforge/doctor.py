"""`lmforge doctor`: what this machine offers for training, on one screen, with what to fix."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

GIB = 1024**3
# optional package -> what it enables
OPTIONAL = {
    "transformers": "export/import hf, bench --compare hf",
    "datasets": "Hugging Face datasets as a source",
    "onnx": "export --format onnx",
    "onnxruntime": "checking ONNX exports",
    "gguf": "export --format gguf",
    "tiktoken": "GPT-2/cl100k tokenizers",
    "tensorboard": "log.tensorboard=true",
    "wandb": "log.wandb=true",
    "matplotlib": "lmforge plot",
    "bitsandbytes": "8-bit AdamW (train.optimizer=adamw8bit)",
}
EXTRA = {  # the pyproject extra that installs a package
    "transformers": "hf",
    "datasets": "hf",
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "gguf": "gguf",
    "tiktoken": "tiktoken",
    "tensorboard": "logging",
    "wandb": "logging",
    "matplotlib": "plot",
}


@dataclass
class Check:
    """One line of the report: a name, what was found, and a fix when something is missing (else '')."""

    name: str
    value: str
    fix: str = ""
    ok: bool = True


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def doctor_report(run_dir: str | Path = ".") -> list[Check]:
    """All checks, in the order they are shown."""
    import torch

    checks = [
        Check("python", f"{platform.python_version()} ({platform.platform(terse=True)})"),
        Check("torch", torch.__version__),
    ]
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    checks += _cuda_checks() if cuda else _no_cuda_checks(mps)
    checks.append(_compile_check(cuda))
    checks.append(_disk_check(Path(run_dir)))
    checks += _package_checks()
    return checks


def _cuda_checks() -> list[Check]:
    """The CUDA version, each GPU, bf16 and flash attention."""
    import torch

    checks = [Check("CUDA", f"{torch.version.cuda}, {torch.cuda.device_count()} GPU(s)")]
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        checks.append(
            Check(f"  cuda:{i}", f"{p.name}, {p.total_memory / GIB:.1f} GiB, compute {p.major}.{p.minor}")
        )
    bf16 = torch.cuda.is_bf16_supported()
    checks.append(
        Check("bf16", "yes" if bf16 else "no", "" if bf16 else "fp16 with a gradient scaler is used", bf16)
    )
    flash = torch.backends.cuda.is_flash_attention_available() and torch.backends.cuda.flash_sdp_enabled()
    major = torch.cuda.get_device_properties(0).major
    flash = flash and major >= 8
    checks.append(
        Check(
            "flash attention",
            "yes (SDPA flash kernel)" if flash else "no (SDPA falls back to memory-efficient/math kernels)",
            ""
            if flash
            else "needs an Ampere (sm80) or newer GPU and a CUDA build of torch with flash kernels",
            flash,
        )
    )
    return checks


def _no_cuda_checks(mps: bool) -> list[Check]:
    """Without CUDA: what to install for it, the Apple GPU, and the CPU's bf16."""
    from .device import cpu_has_native_bf16

    fix = "no GPU visible: training runs on the CPU (fine for tiny models); install a CUDA build of torch"
    native = cpu_has_native_bf16()
    return [
        Check("CUDA", "not available", fix if not mps else "", mps),
        Check("MPS (Apple GPU)", "available" if mps else "not available"),
        Check(
            "bf16", "native on this CPU" if native else "no native bf16 on this CPU (precision auto -> fp32)"
        ),
        Check("flash attention", "CUDA only (the CPU uses its own fused SDPA kernel)"),
    ]


def _package_checks() -> list[Check]:
    """The optional packages: a heading, then each one's version or how to install it."""
    checks = [Check("optional packages", "")]
    for pkg, what in OPTIONAL.items():
        v = _version(pkg)
        fix = ""
        if v is None:
            fix = f"pip install 'lmforge[{EXTRA[pkg]}]'" if pkg in EXTRA else f"pip install {pkg}"
            fix += f" (for {what})"
        checks.append(Check(f"  {pkg}", v or "not installed", fix, ok=True))
    return checks


def _compile_check(cuda: bool) -> Check:
    import torch

    if not hasattr(torch, "compile"):
        return Check("torch.compile", "not in this torch", "upgrade torch to >= 2.6", False)
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    triton = importlib.util.find_spec("triton") is not None
    if cuda and not triton:
        return Check(
            "torch.compile", "no triton", "pip install triton (GPU kernels for train.compile=true)", False
        )
    if not cuda and not cc:
        return Check(
            "torch.compile", "no C compiler", "install gcc or clang to use train.compile=true on CPU", False
        )
    return Check("torch.compile", f"available ({'triton' if cuda else 'C++ via ' + Path(cc).name})")


def _disk_check(run_dir: Path) -> Check:
    probe = run_dir.resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    ok = free >= 10 * GIB
    fix = "" if ok else "under 10 GiB free: checkpoints of a 1B model take ~18 GiB each with optimizer state"
    return Check(f"free disk ({run_dir})", f"{free / GIB:.1f} GiB", fix, ok)


def format_report(checks: list[Check]) -> list[str]:
    """Aligned name/value lines, then the list of fixes."""
    width = max(len(c.name) for c in checks) + 2
    lines = []
    for c in checks:
        mark = "!! " if not c.ok else ("-- " if c.fix else "   ")
        lines.append(f"{mark}{c.name.ljust(width)}{c.value}".rstrip())
    fixes = [c for c in checks if c.fix]
    lines.append("")
    if fixes:
        lines.append("what to fix or add:")
        lines += [f"  {c.name.strip()}: {c.fix}" for c in fixes]
    else:
        lines.append("nothing to fix")
    return lines
