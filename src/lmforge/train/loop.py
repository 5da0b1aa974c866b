"""train(cfg): the whole training run, top to bottom.

setup -> data -> plan -> model and optimizer -> resume -> loop (forward/backward over micro-batches,
clip, step, log, evaluate, checkpoint) -> final evaluation and checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from rich.console import Console

from .. import checkpoint as ckpt_io
from ..config import Config, ConfigError, config_to_dict
from ..data import TokenLoader, iter_eval_batches, load_meta
from ..device import autocast, peak_flops, pick_device, pick_precision
from ..errors import LmforgeError
from ..eval.metrics import evaluate_loss, loss_report
from ..model import GPT, flops_per_token
from ..runlock import RunLock, RunLockedError
from .autobatch import oom_guard, resolve_micro_batch
from .dist_checkpoint import Checkpointer, loader_state_for
from .distributed import DistEnv, all_reduce_mean, close_distributed, init_distributed
from .guards import BadStepGuard, EarlyStopping
from .hooks import RunHooks, prepare_run_dir
from .logging import ConsoleReporter, MetricsWriter, truncate_metrics
from .optim import apply_optimizer_settings, build_optimizer, lr_at
from .parallel import all_agree, check_supported, clip_grad_norm, collective_errors, grad_sync, parallelize
from .resume import check_resume_compatible, find_resume_point, has_training_state, restore_rng, rng_state
from .signals import StopFlag, signal_hook_for_tests


@dataclass
class TrainResult:
    """What a finished run reports back."""

    run_dir: Path
    step: int
    tokens: int
    first_eval: dict | None  # the first evaluation of this run (at step 0 for a fresh run)
    last_eval: dict | None
    checkpoint: Path | None
    status: str = "finished"  # finished | preempted (signal) | early_stopped | diverged (non-finite steps)
    message: str = ""


@dataclass
class Plan:
    """Batch arithmetic derived from the config and the world size."""

    micro_batch_size: int
    grad_accum: int
    global_batch_size: int
    seq_len: int
    tokens_per_step: int
    max_steps: int


def make_plan(cfg: Config, world_size: int) -> Plan:
    """Global batch = micro-batch x accumulation x world size; the token budget decides max_steps if given."""
    t = cfg.train
    gb = t.global_batch_size or t.micro_batch_size * world_size
    if gb % (t.micro_batch_size * world_size):
        raise ConfigError(
            f"train.global_batch_size={gb} is not a multiple of micro_batch_size x world size "
            f"({t.micro_batch_size} x {world_size})"
        )
    seq_len = cfg.model.seq_len
    tokens_per_step = gb * seq_len
    max_steps = t.steps_for(tokens_per_step)
    return Plan(
        t.micro_batch_size, gb // (t.micro_batch_size * world_size), gb, seq_len, tokens_per_step, max_steps
    )


def plan_warnings(cfg: Config, plan: Plan) -> list[str]:
    """Settings that cannot do what they say in a run of plan.max_steps steps, one line each."""
    steps, out = plan.max_steps, []
    if cfg.train.warmup_steps >= steps:
        out.append(
            f"train.warmup_steps={cfg.train.warmup_steps} is not shorter than the run ({steps} steps): "
            f"the learning rate never reaches train.lr"
        )
    for key, every, what in (
        ("eval.every", cfg.eval.every, "evaluation happens only at the start and the end"),
        ("checkpoint.every", cfg.checkpoint.every, "the only checkpoint is the final one"),
    ):
        if every >= steps:
            out.append(f"{key}={every} is not shorter than the run ({steps} steps): {what}")
    return out


def resolve_vocab(cfg: Config, meta: dict, console: Console | None) -> Config:
    """The data's tokenizer defines the vocabulary; a different model.vocab_size is replaced with a note."""
    data_vocab = int(meta["vocab_size"])
    if cfg.model.vocab_size not in (None, data_vocab) and console is not None:
        console.print(
            f"note: model.vocab_size {cfg.model.vocab_size} -> {data_vocab} (from the data's tokenizer)"
        )
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=data_vocab))


def count_params_from_config(cfg: Config) -> int:
    """Exact parameter count without building the model."""
    from ..model import param_breakdown

    return param_breakdown(cfg.model)["total"]


def train(
    cfg: Config,
    dry_run: bool = False,
    console: Console | None = None,
    init_tensors: dict[str, torch.Tensor] | None = None,
) -> TrainResult | None:
    """Train (or resume) the run described by cfg; returns None for a dry run.

    init_tensors: starting weights for a new run (e.g. an imported HF model); a resume ignores them.
    """
    lock = RunLock(cfg.out)  # taken by rank 0 before the run directory is read, held until the end
    try:
        return _train(cfg, dry_run, console, init_tensors, lock)
    except BaseException:
        # Leave the process group (FSDP makes one even for a single process) so that a caller in the
        # same Python process starts clean. No barrier: the other ranks may never get here.
        close_distributed(barrier=False)
        raise
    finally:
        lock.release()


def _train(
    cfg: Config,
    dry_run: bool,
    console: Console | None,
    init_tensors: dict[str, torch.Tensor] | None,
    lock: RunLock,
) -> TrainResult | None:
    console = console or Console()
    # --- setup -------------------------------------------------------------------------------
    device = pick_device(cfg.train.device)
    precision = pick_precision(cfg.train.precision, device)
    check_supported(cfg, device, precision)  # parallel settings this device cannot run fail here
    env: DistEnv = init_distributed(device.type, cfg.train.dist_timeout_s)
    if device.type == "cuda" and env.world_size > 1:
        device = torch.device("cuda", env.local_rank)

    def say(message: str) -> None:
        if env.is_main:  # soft_wrap: a long path stays on one line, whole, in logs
            console.print(message, highlight=False, soft_wrap=True)

    if cfg.data is None:
        raise ConfigError("data is not set: pass --data DATA_DIR (made by `lmforge prepare`)")
    data_meta = load_meta(cfg.data)
    cfg = resolve_vocab(cfg, data_meta, console if env.is_main else None)
    if cfg.train.micro_batch_size == "auto":
        cfg = resolve_micro_batch(cfg, device, precision, env.world_size, say, estimate_only=dry_run)
    plan = make_plan(cfg, env.world_size)
    for warning in plan_warnings(cfg, plan):
        say(f"warning: {warning}")
    n_params = count_params_from_config(cfg)
    fpt = flops_per_token(cfg.model)

    if dry_run:
        print_dry_run(cfg, plan, precision, device, n_params, fpt, console)
        close_distributed()
        return None

    # --- run directory and resume point -----------------------------------------------------
    run_dir = Path(cfg.out)
    refused = None
    if env.is_main:  # one writer per run directory (runlock.py)
        try:
            lock.acquire(say)
        except LmforgeError as e:
            refused = e
    if all_agree(refused is not None, env, device):  # the other ranks stop too, rather than wait
        raise refused or RunLockedError(f"rank 0 could not lock {run_dir}: see its error")
    resume_from, saved = find_resume_point(cfg, run_dir, say)
    if saved:
        check_resume_compatible(saved, cfg, data_meta, say)
    if saved and not has_training_state(saved):  # e.g. `lmforge import`: its weights start this run
        init_tensors, resume_from, saved = ckpt_io.load_checkpoint(resume_from, verify=False)[0], None, None
    if env.is_main:
        prepare_run_dir(run_dir, cfg, fresh=not saved, say=say)

    # --- model, optimizer, data --------------------------------------------------------------
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    model = GPT(cfg.model).to(device)
    if init_tensors is not None and not saved:
        ckpt_io.load_model_weights(model, init_tensors)
        say("initialised the model from the given weights")
    # activation checkpointing -> compile -> FSDP2 or DDP; `model` stays the module to save and evaluate
    train_model = parallelize(model, cfg, env, device, precision)
    optimizer = build_optimizer(model, cfg.train, device.type)
    checkpointer = Checkpointer(model, optimizer, env, sharded=cfg.train.parallel == "fsdp")
    loader = TokenLoader(
        cfg.data,
        "train",
        plan.seq_len,
        plan.micro_batch_size,
        cfg.train.seed,
        env.rank,
        env.world_size,
        order=cfg.train.data_order,
    )
    bad_steps = BadStepGuard(cfg.train.max_bad_steps)
    early = EarlyStopping(cfg.train.early_stop_patience, cfg.train.early_stop_min_delta)
    step, tokens = 0, 0
    if saved:
        state_tensors = checkpointer.load(resume_from, saved)
        apply_optimizer_settings(optimizer, cfg.train)  # the saved groups hold the old betas, eps, decay
        loader.load_state_dict(loader_state_for(saved["loader"], env.world_size))
        restore_rng(state_tensors, saved["rng"])
        guards = saved.get("guards", {})
        bad_steps.load_state_dict(guards.get("bad_steps", {"total": 0, "consecutive": 0}))
        early.load_state_dict(guards.get("early_stop", {}))
        step, tokens = saved["step"], saved["tokens"]
        if env.is_main:  # lines a crash wrote after this checkpoint would otherwise appear twice
            truncate_metrics(run_dir / "metrics.jsonl", step)
        say(f"resuming {run_dir} from {resume_from} (step {step}, {tokens:,} tokens)")
        if saved.get("world_size", env.world_size) != env.world_size:
            say(
                f"note: the checkpoint was written by {saved['world_size']} processes and this run has "
                f"{env.world_size}: weights and optimizer state are resharded; the data continues after the "
                f"windows already consumed"
            )
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    peak = peak_flops(device)

    say(
        f"model {n_params / 1e6:.2f}M params ({cfg.model.family}) | device {device} {precision} | "
        f"batch {plan.global_batch_size}x{plan.seq_len} tokens (accum {plan.grad_accum}, world {env.world_size}) | "
        f"{plan.max_steps} steps"
    )
    metrics = MetricsWriter(run_dir / "metrics.jsonl", enabled=env.is_main)
    hooks = RunHooks(cfg, run_dir, plan.max_steps, step, enabled=env.is_main)
    reporter = ConsoleReporter(console, plan.max_steps, step, env.is_main, cfg.log.progress)
    bytes_per_token = data_meta.get("val_bytes_per_token")
    # Evaluation computes in fp32 whatever the training precision, as `lmforge eval` does, so a run's
    # val_loss equals eval's loss and compares across machines (bf16 on one CPU, fp32 on another).
    # FSDP2's mixed-precision policy casts the sharded weights to bf16 itself, so there it stays bf16.
    eval_precision = "bf16" if cfg.train.parallel == "fsdp" and precision == "bf16" else "fp32"
    test_signal = signal_hook_for_tests()  # test-only; None in real runs

    def save(name: str | None = None, extra: dict | None = None) -> Path:
        rng_tensors, rng_meta = rng_state()
        meta = {
            "config": config_to_dict(cfg),
            "tokens": tokens,
            "tokenizer_sha256": data_meta.get("tokenizer_sha256"),
            "tokenizer_id": data_meta.get("tokenizer_id"),
            "data_fingerprint": data_meta.get("fingerprint"),
            "loader": loader.state_dict(),
            "rng": rng_meta,
            "precision": precision,
            "guards": {"bad_steps": bad_steps.state_dict(), "early_stop": early.state_dict()},
            **(extra or {}),
        }
        path = checkpointer.save(run_dir, step, meta, rng_tensors, cfg.checkpoint.keep_last, name=name)
        reporter.print(f"saved checkpoint {path}")
        hooks.checkpoint(path, step)
        return path

    def run_eval() -> dict:
        if test_signal and test_signal[1] == "eval" and test_signal[2] == step:
            os.kill(os.getpid(), test_signal[0])  # test-only: a signal arriving during evaluation
        batches = iter_eval_batches(cfg.data, "val", plan.seq_len, plan.micro_batch_size, cfg.eval.batches)
        loss, _ = evaluate_loss(model, batches, device, "fp32")
        report = {"step": step, **loss_report(all_reduce_mean(loss, env, device), bytes_per_token)}
        metrics.write({"type": "eval", "tokens": tokens, **report, "precision": eval_precision})
        hooks.evaluated(report, tokens, model)
        bpb = f" | val bpb {report['val_bpb']:.3f}" if "val_bpb" in report else ""
        reporter.print(f"step {step}: val loss {report['val_loss']:.4f} | ppl {report['val_ppl']:.1f}{bpb}")
        if early.update(report["val_loss"], step):
            save(name=ckpt_io.BEST, extra={"val_loss": report["val_loss"]})
        return report

    # --- loop ----------------------------------------------------------------------------------
    status, message = "running", ""
    last_ckpt, ckpt_step = resume_from, (saved["step"] if saved else None)

    def save_once() -> Path | None:
        nonlocal last_ckpt, ckpt_step
        if ckpt_step != step:
            last_ckpt, ckpt_step = save(), step
        return last_ckpt

    with (
        StopFlag() as stop,
        collective_errors(env, cfg.train.dist_timeout_s),
        oom_guard(cfg, plan.micro_batch_size, precision, device, env.world_size),
    ):

        def stop_requested() -> bool:
            # every rank must agree, or one would wait forever in a collective the others left
            return all_agree(stop.requested, env, device)

        first_eval = run_eval() if (cfg.eval.at_start and step == 0) else None
        last_eval = first_eval
        model.train()
        t_log, tokens_at_log = time.time(), tokens
        while status == "running":
            if stop_requested():
                status = "preempted"
                break
            if all_agree(early.should_stop, env, device):  # also stops a resumed early-stopped run
                status = "early_stopped"
                message = (
                    f"early stop at step {step}: val loss has not improved by more than "
                    f"{cfg.train.early_stop_min_delta} for {early.bad_evals} evaluations "
                    f"(best {early.best:.4f} at step {early.best_step})"
                )
                break
            if step >= plan.max_steps:
                status = "finished"
                break
            lr = lr_at(step, cfg.train, plan.max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            epoch_before = loader.epoch
            for micro in range(plan.grad_accum):
                x, y = loader.next_batch()
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with grad_sync(train_model, sync=micro == plan.grad_accum - 1), autocast(device, precision):
                    loss = train_model(x, y) / plan.grad_accum
                scaler.scale(loss).backward()
                loss_sum += loss.detach()
            scaler.unscale_(optimizer)
            grad_norm = clip_grad_norm(
                model, cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
            )
            # One host sync per step: a non-finite loss or grad norm skips the update, so the weights and
            # AdamW moments stay as they were. With fp16 the GradScaler already skips such steps itself.
            # All ranks decide together, so none steps while another skips.
            finite = scaler.is_enabled() or not all_agree(
                not torch.isfinite(grad_norm + loss_sum), env, device
            )
            if finite:
                scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += plan.tokens_per_step
            bad_steps.record(finite)
            if test_signal and test_signal[1] == "step" and test_signal[2] == step:
                os.kill(os.getpid(), test_signal[0])  # test-only: a signal arriving during step `step`

            if not finite:
                metrics.write(
                    {
                        "type": "bad_step",
                        "step": step,
                        "train_loss": loss_sum.item(),
                        "grad_norm": float(grad_norm),
                        "bad_steps": bad_steps.total,
                        "consecutive": bad_steps.consecutive,
                    }
                )
                reporter.print(
                    f"step {step}: non-finite loss or gradient norm, optimizer step skipped "
                    f"({bad_steps.consecutive} in a row, {bad_steps.total} in all)"
                )
            log_now = step % cfg.log.every == 0 or step == plan.max_steps
            if log_now:
                dt = max(time.time() - t_log, 1e-9)
                tok_per_s = (tokens - tokens_at_log) / dt
                mfu = fpt * tok_per_s / (peak * env.world_size) if peak else None
                train_loss = all_reduce_mean(loss_sum.item(), env, device)
                record = {
                    "type": "train",
                    "step": step,
                    "tokens": tokens,
                    "train_loss": train_loss,
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "tok_per_s": tok_per_s,
                }
                if mfu is not None:
                    record["mfu"] = mfu
                metrics.write(record)
                hooks.train_step(record)
                reporter.step(step, train_loss, tok_per_s, mfu, log_line=True)
                t_log, tokens_at_log = time.time(), tokens
            if bad_steps.diverged:
                status = "diverged"
                where = (
                    f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written"
                )
                message = (
                    f"training diverged: {bad_steps.consecutive} consecutive steps with a non-finite loss or "
                    f"gradient norm (train.max_bad_steps={cfg.train.max_bad_steps}); {where}: lower train.lr "
                    f"or raise train.warmup_steps, then run again"
                )
                break
            if cfg.eval.every and step % cfg.eval.every == 0 and step < plan.max_steps:
                last_eval = run_eval()
            epoch_ended = loader.epoch != epoch_before  # this step used the last windows of an epoch
            periodic = cfg.checkpoint.every and step % cfg.checkpoint.every == 0
            if (periodic or epoch_ended) and step < plan.max_steps:
                save_once()

        # --- end -------------------------------------------------------------------------------
        if status == "finished" and (last_eval is None or last_eval["step"] != step):
            last_eval = run_eval()
        if status == "preempted":
            who = stop.name() or "a stop signal on another rank"
            message = f"received {who}: saved step {step}; run the same command again to resume"
        if status != "diverged":  # a diverged run keeps its last good checkpoint as the newest
            save_once()
    if message:
        reporter.print(message)
    hooks.end(status, step, tokens, message)
    reporter.close()
    metrics.close()
    close_distributed()
    return TrainResult(run_dir, step, tokens, first_eval, last_eval, last_ckpt, status, message)


def print_dry_run(
    cfg: Config, plan: Plan, precision: str, device: torch.device, n_params: int, fpt: int, console: Console
) -> None:
    """The resolved config and the estimator's plan for this device; nothing is trained."""
    from ..estimate import estimate, local_device, report_lines

    console.print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip(), highlight=False)
    est = estimate(cfg, device=local_device(device), precision=precision)
    console.print(f"memory estimate and plan on {device} ({precision}):", highlight=False)
    for line in report_lines(est):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
