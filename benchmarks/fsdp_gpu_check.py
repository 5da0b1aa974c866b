"""One GPU: gpt2-124m through FSDP2 + torch.compile + activation checkpointing; peak memory vs the estimate.

    python benchmarks/fsdp_gpu_check.py [--steps 5] [--micro-batch 8] [--ac full] [--preset gpt2-124m]

Trains a few steps on random tokens through the same `parallelize()` the training loop uses (world size
1: a one-process group, bf16 compute / fp32 reduce), then prints the measured peak of allocated CUDA
memory next to `--dry-run`'s estimate, as a line to paste into benchmarks/RESULTS.md. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import time

import torch

from lmforge.config import Config, ModelConfig, TrainConfig
from lmforge.estimate import memory_breakdown, setting_from_config
from lmforge.model import GPT
from lmforge.presets import get_preset
from lmforge.train.distributed import DistEnv, close_distributed
from lmforge.train.optim import build_optimizer
from lmforge.train.parallel import clip_grad_norm, parallelize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2-124m")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--ac", default="full", help="none | full | every_k")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    model_cfg = ModelConfig(**get_preset(args.preset), seq_len=args.seq_len).resolved()
    train_cfg = TrainConfig(
        micro_batch_size=args.micro_batch,
        parallel="fsdp",
        activation_checkpointing=args.ac,
        compile=not args.no_compile,
        precision="bf16",
    )
    cfg = Config(model=model_cfg, train=train_cfg)
    model = GPT(cfg.model).to(device)
    model.train()
    train_model = parallelize(model, cfg, DistEnv(), device, "bf16")
    optimizer = build_optimizer(model, cfg.train, device.type)
    V = cfg.model.vocab_size
    torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        x = torch.randint(0, V, (args.micro_batch, args.seq_len), device=device)
        y = torch.randint(0, V, (args.micro_batch, args.seq_len), device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = train_model(x, y)
        loss.backward()
        clip_grad_norm(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        print(f"step {step + 1}: loss {loss.item():.4f} ({times[-1]:.3f} s)")
    peak = torch.cuda.max_memory_allocated(device)
    est = memory_breakdown(cfg.model, setting_from_config(cfg, gpus=1, precision="bf16"), "cuda")
    gib = 1024**3
    print(
        f"| {torch.cuda.get_device_name(device)} | torch {torch.__version__} | {args.preset} | micro-batch "
        f"{args.micro_batch} x {args.seq_len} | fsdp, compile={train_cfg.compile}, ac={args.ac}, bf16 | "
        f"peak allocated {peak / gib:.2f} GiB | estimate {sum(est.values()) / gib:.2f} GiB | "
        f"step {sorted(times)[len(times) // 2]:.3f} s (median) |"
    )
    close_distributed()


if __name__ == "__main__":
    main()
