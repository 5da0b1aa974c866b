"""train(cfg): the whole training run, top to bottom.

set up (device, precision, processes, data, plan) -> open the run directory (lock, resume point) ->
build (model, parallelism, optimizer, batch source, guards; restore a checkpoint) -> loop of named steps
(`train_step`, `log_step`, `evaluate`, `save`) until a stop reason -> `finish` (last evaluation and
checkpoint). Every event goes to one RunLog; batches come from the data folder's batch source, so a new
kind of training data is a new source in `data/batches.py`, not a new loop.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from .. import checkpoint as ckpt_io
from ..config import Config, ConfigError
from ..data import load_meta
from ..data.batches import BatchSource, eval_batches, training_batches
from ..device import autocast, peak_flops, pick_device, pick_precision
from ..errors import LmforgeError
from ..eval.downstream import Downstream
from ..eval.metrics import evaluate_loss, loss_report
from ..lora import adapt
from ..model import GPT, flops_per_token
from ..run_dir import RunDir
from ..runlock import RunLock, RunLockedError
from ..words import counted
from .autobatch import oom_guard, resolve_micro_batch
from .dist_checkpoint import Checkpointer, loader_state_for
from .distributed import (
    DistEnv,
    all_agree,
    all_reduce_mean,
    all_reduce_sum,
    close_distributed,
    collective_errors,
    init_distributed,
)
from .guards import BadStepGuard, EarlyStopping
from .hooks import prepare_run_dir
from .logging import truncate_metrics
from .optim import apply_optimizer_settings, build_optimizer, set_lr
from .parallel import check_supported, clip_grad_norm, grad_sync, parallelize
from .plan import Plan, count_params_from_config, make_plan, plan_warnings, print_dry_run, resolve_vocab
from .resume import check_resume_compatible, find_resume_point, has_training_state, restore_rng, rng_state
from .runlog import RunLog, start_facts
from .signals import StopFlag

__all__ = ["Plan", "TrainResult", "make_plan", "train"]


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
class Setup:
    """Where and how the run computes, decided before anything is written."""

    cfg: Config
    env: DistEnv
    device: torch.device
    precision: str
    data_meta: dict
    plan: Plan
    say: Callable[[str], None]  # a line on rank 0's console
    base: dict | None = None  # a fine-tune's base checkpoint (finetuned.base_record), in every checkpoint
    tasks: Downstream | None = None  # eval.tasks, read (and checked) before anything is written
    batches: BatchSource | None = None  # this rank's training batches, opened (and checked) likewise


@dataclass
class StepOutcome:
    """What one optimizer step did."""

    lr: float
    loss_sum: torch.Tensor  # the mean loss over the step's micro-batches (a device scalar)
    grad_norm: torch.Tensor
    finite: bool  # False: the update was skipped (a non-finite loss or gradient norm)
    epoch_ended: bool  # this step used the last windows of an epoch


def train(
    cfg: Config,
    dry_run: bool = False,
    console: Console | None = None,
    init_tensors: dict[str, torch.Tensor] | None = None,
    base: dict | None = None,
) -> TrainResult | None:
    """Train (or resume) the run described by cfg; returns None for a dry run.

    init_tensors: starting weights for a new run (e.g. an imported HF model); a resume ignores them, but
    for LoRA (cfg.lora.rank) they are the frozen base weights the adapters sit on, needed on every start.
    base: the record of the base checkpoint of a fine-tune (`lmforge finetune`), which a resume must match.
    """
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise ConfigError(f"--out '{cfg.out}' is a file: give a folder for the run (new, or one to resume)")
    console = console or Console()
    lock = RunLock(cfg.out)  # taken by rank 0 before the run directory is read, held until the end
    try:
        setup = set_up(cfg, console, dry_run, base)
        if setup is None:  # a dry run: printed, nothing trained
            close_distributed()
            return None
        resume_from, saved, init_tensors = open_run_dir(setup, lock, init_tensors)
        result = Training(setup, resume_from, saved, init_tensors, console).run()
        close_distributed()
        return result
    except BaseException:
        # Leave the process group (FSDP makes one even for a single process) so that a caller in the
        # same Python process starts clean. No barrier: the other ranks may never get here.
        close_distributed(barrier=False)
        raise
    finally:
        lock.release()


def set_up(cfg: Config, console: Console, dry_run: bool, base: dict | None = None) -> Setup | None:
    """Device, precision and processes; the data's vocabulary and the batch plan. None after a dry run."""
    device = pick_device(cfg.train.device)
    precision = pick_precision(cfg.train.precision, device)
    check_supported(cfg, device, precision)  # parallel settings this device cannot run fail here
    env = init_distributed(device.type, cfg.train.dist_timeout_s)
    if device.type == "cuda" and env.world_size > 1:
        device = torch.device("cuda", env.local_rank)

    def say(message: str) -> None:
        if env.is_main:  # soft_wrap: a long path stays on one line, whole, in logs
            console.print(message, highlight=False, soft_wrap=True)

    if cfg.data is None:
        raise ConfigError("data is not set: pass --data DATA_DIR (made by `lmforge prepare`)")
    data_meta = load_meta(cfg.data)
    # The run records where its data is as an absolute path: eval, reports and resumes started from
    # another folder find it (a path relative to where `train` ran means nothing there).
    cfg = dataclasses.replace(cfg, data=os.path.abspath(cfg.data))
    cfg = resolve_vocab(cfg, data_meta, console if env.is_main else None)
    if cfg.train.micro_batch_size == "auto":
        cfg = resolve_micro_batch(cfg, device, precision, env.world_size, say, estimate_only=dry_run)
    plan = make_plan(cfg, env.world_size)
    tasks = Downstream.load(cfg.eval, cfg.data)
    for warning in plan_warnings(cfg, plan):
        say(f"warning: {warning}")
    if dry_run:
        n_params, fpt = count_params_from_config(cfg), flops_per_token(cfg.model)
        print_dry_run(cfg, plan, precision, device, n_params, fpt, console)
        return None
    # Both splits hold windows of this length for every rank, checked before the run directory is
    # written: a refusal leaves nothing behind (no half-made run that `status` would call crashed).
    batches = training_batches(
        cfg.data, data_meta, plan.seq_len, plan.micro_batch_size, cfg.train.seed, env.rank,
        env.world_size, order=cfg.train.data_order,
    )  # fmt: skip
    eval_batches(cfg.data, data_meta, plan.seq_len, plan.micro_batch_size, 1)
    return Setup(cfg, env, device, precision, data_meta, plan, say, base, tasks, batches)


def open_run_dir(
    s: Setup, lock: RunLock, init_tensors: dict | None
) -> tuple[Path | None, dict | None, dict | None]:
    """Lock the run directory, find the checkpoint to resume from, prepare the directory.

    Returns (checkpoint, its verified meta, starting weights); a weights-only checkpoint (an import)
    becomes the starting weights of a fresh run.
    """
    cfg, env, run_dir = s.cfg, s.env, Path(s.cfg.out)
    refused = None
    if env.is_main:  # one writer per run directory (runlock.py)
        try:
            lock.acquire(s.say)
        except LmforgeError as e:
            refused = e
    if all_agree(refused is not None, env, s.device):  # the other ranks stop too, rather than wait
        raise refused or RunLockedError(f"rank 0 could not lock {run_dir}: see its error")
    resume_from, saved = find_resume_point(cfg, run_dir, s.say)
    if saved:
        check_resume_compatible(saved, cfg, s.data_meta, s.say, base=s.base)
    if saved and not has_training_state(saved):  # e.g. `lmforge import`: its weights start this run
        init_tensors, resume_from, saved = ckpt_io.load_checkpoint(resume_from, verify=False)[0], None, None
    if env.is_main:
        prepare_run_dir(run_dir, cfg, fresh=not saved, say=s.say)
    return resume_from, saved, init_tensors


class Training:
    """One run's model, optimizer, batches and guards, and the named steps of its loop."""

    def __init__(
        self, s: Setup, resume_from: Path | None, saved: dict | None, init: dict | None, console: Console
    ) -> None:
        cfg, plan, env, device = s.cfg, s.plan, s.env, s.device
        self.s, self.cfg, self.plan, self.env, self.device = s, cfg, plan, env, device
        self.run_dir = Path(cfg.out)
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        self.model = GPT(cfg.model).to(device)
        if init is not None and (not saved or cfg.lora.rank):  # a LoRA checkpoint holds no base weights
            ckpt_io.load_model_weights(self.model, init)
            s.say("initialised the model from the given weights")
        if cfg.lora.rank:  # before parallelism and the optimizer, which see the adapters and frozen weights
            s.say(adapt(self.model, cfg.lora, s.base["vocab_size"]))
        # activation checkpointing -> compile -> FSDP2 or DDP; `model` stays the module to save and evaluate
        self.train_model = parallelize(self.model, cfg, env, device, s.precision)
        self.optimizer = build_optimizer(self.model, cfg.train, device.type)
        self.checkpointer = Checkpointer(
            self.model, self.optimizer, env, sharded=cfg.train.parallel == "fsdp"
        )
        self.batches = s.batches
        self.bad_steps = BadStepGuard(cfg.train.max_bad_steps)
        self.early = EarlyStopping(cfg.train.early_stop_patience, cfg.train.early_stop_min_delta)
        self.step, self.tokens, self.rolled_back_from = 0, 0, None
        if saved:
            self.restore(resume_from, saved)
        self.start_step = self.step
        self.last_ckpt, self.ckpt_step = resume_from, (saved["step"] if saved else None)
        self.scaler = torch.amp.GradScaler(device.type, enabled=s.precision == "fp16")
        self.peak, self.fpt = peak_flops(device), flops_per_token(cfg.model)
        # Evaluation computes in fp32 whatever the training precision, as `lmforge eval` does, so a run's
        # val_loss equals eval's loss and compares across machines (bf16 on one CPU, fp32 on another).
        # FSDP2's mixed-precision policy casts the sharded weights to bf16 itself, so there it stays bf16.
        self.eval_precision = "bf16" if cfg.train.parallel == "fsdp" and s.precision == "bf16" else "fp32"
        s.say(
            f"model {count_params_from_config(cfg) / 1e6:.2f}M params ({cfg.model.family}) | device {device} "
            f"{s.precision} | batch {plan.global_batch_size}x{plan.seq_len} tokens (accum {plan.grad_accum}, "
            f"world {env.world_size}) | {counted(plan.max_steps, 'step')} ({plan.max_steps * plan.tokens_per_step:,} tokens)"
        )
        self.log = RunLog(cfg, self.run_dir, console, plan.max_steps, self.step, env.is_main)
        how = start_facts(s, resume_from if saved else None, self.rolled_back_from)
        self.log.started(self.step, self.tokens, how)
        self.first_eval: dict | None = None
        self.last_eval: dict | None = None

    def restore(self, resume_from: Path, saved: dict) -> None:
        """Weights, optimizer, data position, random state and guards from a checkpoint."""
        env, s = self.env, self.s
        state_tensors = self.checkpointer.load(resume_from, saved)
        apply_optimizer_settings(
            self.optimizer, self.cfg.train
        )  # saved groups hold the old betas, eps, decay
        self.batches.load_state_dict(loader_state_for(saved["loader"], env.world_size))
        restore_rng(state_tensors, saved["rng"])
        guards = saved.get("guards", {})
        self.bad_steps.load_state_dict(guards.get("bad_steps", {"total": 0, "consecutive": 0}))
        self.early.load_state_dict(guards.get("early_stop", {}))
        self.step, self.tokens = saved["step"], saved["tokens"]
        if env.is_main:  # lines a crash wrote after this checkpoint would otherwise appear twice
            self.rolled_back_from = truncate_metrics(RunDir(self.run_dir).metrics, self.step)
        s.say(f"resuming {self.run_dir} from {resume_from} (step {self.step}, {self.tokens:,} tokens)")
        if saved.get("world_size", env.world_size) != env.world_size:
            s.say(
                f"note: the checkpoint was written by {saved['world_size']} processes and this run has "
                f"{env.world_size}: weights and optimizer state are resharded; the data continues after the "
                f"windows already consumed"
            )

    # --- the loop --------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Train until a stop reason (budget, signal, early stop, divergence); then finish."""
        cfg, env = self.cfg, self.env
        with (
            StopFlag() as stop,
            collective_errors(env, cfg.train.dist_timeout_s),
            oom_guard(cfg, self.plan.micro_batch_size, self.s.precision, self.device, env.world_size),
        ):
            if cfg.eval.at_start and self.step == 0:
                self.first_eval = self.last_eval = self.evaluate()
            self.model.train()
            self.t_log, self.tokens_at_log = time.time(), self.tokens
            while (reason := self.stop_reason(stop)) is None:
                outcome = self.train_step()
                self.log_step(outcome)
                if self.bad_steps.diverged:
                    reason = ("diverged", self.diverged_message(f"{self.bad_steps.consecutive} consecutive"))
                    break
                paused = time.time()
                self.periodic(outcome)
                self.t_log += time.time() - paused  # tok_per_s counts training, not evals or saves
            status, message = self.finish(*reason, stop)
        self.log.end(status, self.step, self.tokens, message, signal=stop.name())
        return TrainResult(
            self.run_dir,
            self.step,
            self.tokens,
            self.first_eval,
            self.last_eval,
            self.last_ckpt,
            status,
            message,
        )

    def stop_reason(self, stop: StopFlag) -> tuple[str, str] | None:
        """Why the loop stops before the next step, agreed by every rank; None to go on."""
        env, device, early = self.env, self.device, self.early
        # every rank must agree, or one would wait forever in a collective the others left
        if all_agree(stop.requested, env, device):
            return "preempted", ""
        if all_agree(early.should_stop, env, device):  # also stops a resumed early-stopped run
            return "early_stopped", (
                f"early stop at step {self.step}: val loss has not improved by more than "
                f"{self.cfg.train.early_stop_min_delta} for {early.bad_evals} evaluations "
                f"(best {early.best:.4f} at step {early.best_step})"
            )
        if self.step >= self.plan.max_steps:
            return "finished", ""
        return None

    def train_step(self) -> StepOutcome:
        """Forward and backward over the micro-batches, clip, and one optimizer update (skipped when the
        loss or gradient norm is not finite)."""
        cfg, plan, device, optimizer, scaler = self.cfg, self.plan, self.device, self.optimizer, self.scaler
        lr = set_lr(optimizer, self.step, cfg.train, plan.max_steps)
        loss_sum = torch.zeros((), device=device)
        epoch_before = self.batches.epoch
        for micro in range(plan.grad_accum):
            x, y = self.batches.next_batch()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            sync = micro == plan.grad_accum - 1
            with grad_sync(self.train_model, sync=sync), autocast(device, self.s.precision):
                loss = self.train_model(x, y) / plan.grad_accum
            scaler.scale(loss).backward()
            loss_sum += loss.detach()
        scaler.unscale_(optimizer)
        grad_norm = clip_grad_norm(
            self.model, cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
        )
        # One host sync per step: a non-finite loss or grad norm skips the update, so the weights and
        # AdamW moments stay as they were. With fp16 the GradScaler already skips such steps itself.
        # All ranks decide together, so none steps while another skips.
        finite = scaler.is_enabled() or not all_agree(
            not torch.isfinite(grad_norm + loss_sum), self.env, device
        )
        if finite:
            scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += plan.tokens_per_step
        self.bad_steps.record(finite)
        self.log.notify("step", self.step)
        return StepOutcome(lr, loss_sum, grad_norm, finite, self.batches.epoch != epoch_before)

    def log_step(self, out: StepOutcome) -> None:
        """A skipped step always; a train line every log.every steps and at the last."""
        step, bad = self.step, self.bad_steps
        if not out.finite:
            self.log.bad_step(
                {
                    "type": "bad_step",
                    "step": step,
                    "train_loss": out.loss_sum.item(),
                    "grad_norm": float(out.grad_norm),
                    "bad_steps": bad.total,
                    "consecutive": bad.consecutive,
                }
            )
        if step % self.cfg.log.every and step != self.plan.max_steps:
            return
        tok_per_s = (self.tokens - self.tokens_at_log) / max(time.time() - self.t_log, 1e-9)
        record = {
            "type": "train",
            "step": step,
            "tokens": self.tokens,
            "train_loss": all_reduce_mean(out.loss_sum.item(), self.env, self.device),
            "lr": out.lr,
            "grad_norm": float(out.grad_norm),
            "tok_per_s": tok_per_s,
        }
        if self.peak:
            record["mfu"] = self.fpt * tok_per_s / (self.peak * self.env.world_size)
        self.log.train(record)
        self.t_log, self.tokens_at_log = time.time(), self.tokens

    def periodic(self, out: StepOutcome) -> None:
        """Evaluate every eval.every steps; save every checkpoint.every steps and at each epoch's end."""
        step, cfg, last = self.step, self.cfg, self.plan.max_steps
        if cfg.eval.every and step % cfg.eval.every == 0 and step < last:
            self.last_eval = self.evaluate()
        periodic = cfg.checkpoint.every and step % cfg.checkpoint.every == 0
        if (periodic or out.epoch_ended) and step < last:
            self.save_once()

    def evaluate(self) -> dict:
        """Validation loss, perplexity, bits per byte and eval.tasks; a new best val loss also saves `best`."""
        cfg, plan, step, env = self.cfg, self.plan, self.step, self.env
        self.log.notify("eval", step)
        batches = eval_batches(
            cfg.data, self.s.data_meta, plan.seq_len, plan.micro_batch_size, cfg.eval.batches
        )
        loss, _ = evaluate_loss(self.model, batches, self.device, "fp32")
        bytes_per_token = self.s.data_meta.get("val_bytes_per_token")
        report = {"step": step, **loss_report(all_reduce_mean(loss, env, self.device), bytes_per_token)}
        if self.s.tasks:  # in the model's fp32 weights, as val loss; the items are split between the ranks
            add_up = functools.partial(all_reduce_sum, env=env, device=self.device)
            report |= self.s.tasks.score(self.model, env.rank, env.world_size, add_up)
        self.log.evaluated(report, self.tokens, self.eval_precision, self.model)
        if self.early.update(report["val_loss"], step):
            self.save(name=ckpt_io.BEST, extra={"val_loss": report["val_loss"]})
        return report

    def save(self, name: str | None = None, extra: dict | None = None) -> Path:
        """A checkpoint of everything a resume needs (weights, optimizer, data position, RNG, guards)."""
        rng_tensors, rng_meta = rng_state()
        guards = {"bad_steps": self.bad_steps.state_dict(), "early_stop": self.early.state_dict()}
        extra = {**({"base": self.s.base} if self.s.base else {}), **(extra or {})}
        meta = ckpt_io.checkpoint_meta(
            self.cfg, self.tokens, self.s.data_meta, self.batches.state_dict(), rng_meta, self.s.precision,
            guards, **extra,
        )  # fmt: skip
        keep = self.cfg.checkpoint.keep_last
        path = self.checkpointer.save(self.run_dir, self.step, meta, rng_tensors, keep, name=name)
        self.log.checkpoint(path, self.step)
        return path

    def save_once(self) -> None:
        """Save this step unless it is saved already."""
        if self.ckpt_step != self.step:
            self.last_ckpt, self.ckpt_step = self.save(), self.step

    def finish(self, status: str, message: str, stop: StopFlag) -> tuple[str, str]:
        """The last evaluation and checkpoint; the final status and message."""
        ran = self.step - self.start_step
        if status == "finished" and ran and self.bad_steps.consecutive >= ran:
            # shorter than train.max_bad_steps, but nothing of it trained: not a success
            status, message = "diverged", self.diverged_message(f"all {ran}")
        done_before = status == "finished" and not ran and self._evaluated_before()  # a finished run again
        if (
            status == "finished"
            and not done_before
            and (self.last_eval is None or self.last_eval["step"] != self.step)
        ):
            self.last_eval = self.evaluate()
        if status == "finished" and not ran and self.start_step:
            self.s.say(
                f"the run had already trained its {self.plan.max_steps} steps: nothing to do (raise "
                "train.max_steps or train.max_tokens to train further)"
            )
        if status == "preempted":
            who = stop.name() or "a stop signal on another rank"
            message = f"received {who}: saved step {self.step}; run the same command again to resume"
        if status != "diverged":  # a diverged run keeps its last good checkpoint as the newest
            self.save_once()
        return status, message

    def _evaluated_before(self) -> bool:
        """Whether metrics.jsonl already holds an evaluation at this step. Rank 0 writes it (other ranks may
        not see the file); an evaluation is collective, so every rank takes rank 0's answer."""
        seen = self.env.is_main and any(
            r.get("type") == "eval" and r.get("step") == self.step
            for r in RunDir(self.run_dir).read_metrics()
        )
        return all_agree(seen, self.env, self.device)

    def diverged_message(self, how_many: str) -> str:
        """The one line a diverged run ends with."""
        where = (
            f"the last good checkpoint is {self.last_ckpt}" if self.last_ckpt else "no checkpoint was written"
        )
        return (
            f"training diverged: {how_many} steps with a non-finite loss or gradient norm "
            f"(train.max_bad_steps={self.cfg.train.max_bad_steps}); {where}: lower train.lr or raise "
            f"train.warmup_steps, then run again"
        )
