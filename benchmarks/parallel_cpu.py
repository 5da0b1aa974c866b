"""Step time of one process through parallelize(): DDP vs FSDP2, with and without activation checkpointing.

    python benchmarks/parallel_cpu.py [--steps 5] [--batch 4] [--device cpu]

World size 1 goes through the same code as many GPUs, so this measures what the wrapping itself costs
(FSDP2's hooks, the recomputation of checkpointed blocks) on the `lmforge bench` default shape.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lmforge.config import Config, FSDPConfig, ModelConfig, TrainConfig
from lmforge.model import GPT
from lmforge.presets import BENCH_MODEL
from lmforge.train.distributed import DistEnv, close_distributed
from lmforge.train.optim import build_optimizer
from lmforge.train.parallel import clip_grad_norm, parallelize


def time_steps(parallel: str, ac: str, args: argparse.Namespace) -> float:
    """Median seconds per optimizer step (after one untimed step)."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    model_cfg = ModelConfig(**BENCH_MODEL).resolved()
    cfg = Config(
        model=model_cfg,
        train=TrainConfig(parallel=parallel, activation_checkpointing=ac, micro_batch_size=args.batch),
        fsdp=FSDPConfig(),
    )
    model = GPT(model_cfg).to(device)
    train_model = parallelize(model, cfg, DistEnv(), device, "fp32")
    opt = build_optimizer(model, cfg.train, device.type)
    T, V = model_cfg.seq_len, model_cfg.vocab_size
    times = []
    for i in range(args.steps + 1):
        x = torch.randint(0, V, (args.batch, T), device=device)
        t0 = time.perf_counter()
        train_model(x, x).backward()
        clip_grad_norm(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    close_distributed()
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    base = None
    print("| parallel | activation checkpointing | s/step (median) | vs ddp/none |")
    print("|---|---|---|---|")
    for parallel in ("ddp", "fsdp"):
        for ac in ("none", "full"):
            t = time_steps(parallel, ac, args)
            base = base or t
            print(f"| {parallel} | {ac} | {t:.3f} | {t / base:.2f}x |")
    print(f"torch {torch.__version__}, {args.device}, threads {torch.get_num_threads()}, batch {args.batch}")


if __name__ == "__main__":
    main()
