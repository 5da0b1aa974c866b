"""What a run writes beside metrics.jsonl, behind a few named hooks the loop calls (the files' names are
`RunDir`'s, run_dir.py).

- RUN_DIR/config.yaml and RUN_DIR/tokenizer.json: written by `prepare_run_dir` before training.

- RUN_DIR/train.log: one timestamped line per logged step, evaluation, checkpoint and the end (always).
- RUN_DIR/status.json: a heartbeat (pid, host, state, step, tokens, speed, last checkpoint) that
  `lmforge status` reads to say whether the run is alive.
- RUN_DIR/tb/: TensorBoard event files when log.tensorboard=true.
- Weights & Biases when log.wandb=true: the same metrics and the resolved config.
- RUN_DIR/samples.jsonl: text generated from log.sample_prompts every log.sample_every evaluations, also
  sent to TensorBoard and W&B.

Only rank 0 writes (`enabled=False` elsewhere makes every hook a no-op). A failed write of train.log,
status.json or samples.jsonl (a full disk) stops the run with one line, like one of metrics.jsonl.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from .. import checkpoint as ckpt_io
from ..config import Config
from ..config_io import config_to_dict
from ..data.folder import data_tokenizer
from ..errors import LmforgeError
from ..eval.downstream import scalar_name, summary
from ..run_dir import RunDir
from ..safewrite import LineFile, copy_atomic
from .logging import discard_metrics

# metrics.jsonl key -> TensorBoard / W&B name
METRIC_NAMES = {
    "train_loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tok_per_s": "train/tok_per_s",
    "mfu": "train/mfu",
    "val_loss": "val/loss",
    "val_ppl": "val/ppl",
    "val_bpb": "val/bpb",
}


class BackendError(LmforgeError):
    """A logging backend was asked for but cannot run (e.g. its package is not installed)."""


def prepare_run_dir(run_dir: Path, cfg: Config, fresh: bool, say: Callable[[str], None]) -> None:
    """Before training (rank 0, holding the run's lock): remove what an interrupted save or rotation left,
    drop the metrics of an earlier start that never checkpointed (`fresh`), write config.yaml and copy the
    tokenizer, each file whole or not at all."""
    run = RunDir(run_dir)
    run.path.mkdir(parents=True, exist_ok=True)
    for left in ckpt_io.clean_leftovers(run.path):
        say(f"removed {left.name} (left by an interrupted save or rotation)")
    if fresh and (n := discard_metrics(run.metrics)):  # else its steps would appear twice
        say(f"note: removed {run.metrics.name} ({n} lines) of a start that ended before its first checkpoint")
    run.write_config(config_to_dict(cfg))
    copy_atomic(data_tokenizer(cfg.data), run.tokenizer, "the tokenizer")


class RunHooks:
    """Side effects of a training run: train.log, status.json, TensorBoard, W&B and samples."""

    def __init__(self, cfg: Config, run_dir: Path, max_steps: int, step: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.cfg = cfg
        self.run = RunDir(run_dir)
        self.max_steps = max_steps
        self.evals = 0
        self.tb = None
        self.wandb = None
        self.status: dict = {}
        self.previous: dict = {}
        if not enabled:
            return
        self._log = LineFile(self.run.log, "the run log")
        if cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise BackendError(
                    "log.tensorboard=true needs the tensorboard package: pip install 'lmforge[logging]'"
                ) from e
            self.tb = SummaryWriter(log_dir=str(self.run.tensorboard))
        previous = self.run.read_status()
        self.previous = previous  # the heartbeat of the run's previous start, for its start line
        if cfg.log.wandb:  # a resumed run continues the same W&B run
            self.wandb = _start_wandb(cfg, self.run.path, previous.get("wandb_id"))
        now = time.time()
        self.status = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "state": "running",
            "started": now,
            "updated": now,
            "step": step,
            "max_steps": max_steps,
            "tokens": 0,
        }
        if self.wandb is not None:
            self.status["wandb_id"] = self.wandb.id
        self.line(f"start at step {step} of {max_steps} ({cfg.model.family}, {cfg.model.n_layer} layers)")
        self._beat()

    # --- the hooks -----------------------------------------------------------------------------
    def train_step(self, record: dict) -> None:
        """After a train line of metrics.jsonl."""
        if not self.enabled:
            return
        mfu = f" | mfu {100 * record['mfu']:.1f}%" if record.get("mfu") is not None else ""
        self.line(
            f"step {record['step']} | loss {record['train_loss']:.4f} | lr {record['lr']:.3g} | "
            f"grad norm {record['grad_norm']:.3f} | {record['tok_per_s']:,.0f} tok/s{mfu}"
        )
        self._scalars(record)
        self.status.update(
            {k: record.get(k) for k in ("step", "tokens", "train_loss", "tok_per_s")}, updated=time.time()
        )
        self._beat()

    def evaluated(self, record: dict, tokens: int, model=None) -> None:
        """After an evaluation; every log.sample_every evaluations, also generate samples."""
        if not self.enabled:
            return
        self.line(
            f"step {record['step']} | val loss {record['val_loss']:.4f} | ppl {record['val_ppl']:.1f}"
            + summary(record)
        )
        self._scalars(record)
        best = self.status.get("best_val_loss")
        if best is None or record["val_loss"] < best:
            self.status["best_val_loss"] = record["val_loss"]
        self.status.update(step=record["step"], tokens=tokens, updated=time.time())
        self._beat()
        self.evals += 1
        every = self.cfg.log.sample_every
        if every and model is not None and self.evals % every == 0:
            self.samples(model, record["step"], tokens)

    def checkpoint(self, path: Path | None, step: int) -> None:
        """After a checkpoint is written."""
        if not self.enabled or path is None:
            return
        self.line(f"step {step} | saved checkpoint {path}")
        self.status.update(last_checkpoint=str(path), updated=time.time())
        self._beat()

    def end(self, state: str, step: int, tokens: int, message: str = "") -> None:
        """When the run stops (finished, preempted, early_stopped, diverged)."""
        if not self.enabled:
            return
        self.line(f"end: {state} at step {step}, {tokens:,} tokens" + (f" | {message}" if message else ""))
        self.status.update(state=state, step=step, tokens=tokens, updated=time.time())
        self._beat()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.summary["state"] = state
            self.wandb.finish(exit_code=0 if state in ("finished", "early_stopped") else 1)
        self._log.close()
        self.enabled = False

    # --- parts ----------------------------------------------------------------------------------
    def line(self, text: str) -> None:
        """One timestamped line in train.log."""
        if self.enabled:
            self._log.append(time.strftime("%Y-%m-%d %H:%M:%S ") + text + "\n")

    def samples(self, model, step: int, tokens: int) -> list[dict]:
        """Generate from the fixed prompts (seeded, so runs can be compared); write them everywhere."""
        if "FSDP" in type(model).__name__:  # a sharded model cannot generate on rank 0 alone
            return []
        from ..data import Tokenizer
        from ..generate.engine import stream_text
        from ..generate.sampling import SamplingParams

        tok = Tokenizer.load(self.run.tokenizer)
        was_training = model.training
        model.eval()
        out = []
        try:
            for i, prompt in enumerate(self.cfg.log.sample_prompts):
                text = "".join(
                    stream_text(
                        model, tok, prompt, self.cfg.log.sample_tokens, SamplingParams(0.8, 50), seed=i
                    )
                )
                out.append({"step": step, "tokens": tokens, "prompt": prompt, "text": text})
        finally:
            model.train(was_training)
        samples_file = LineFile(self.run.samples, "samples")
        try:
            samples_file.append("".join(json.dumps(rec) + "\n" for rec in out))
        finally:
            samples_file.close()
        body = "\n\n".join(f"**{r['prompt']}**{r['text']}" for r in out)
        if self.tb is not None:
            self.tb.add_text("samples", body, step)
            self.tb.flush()
        if self.wandb is not None:
            import wandb

            table = wandb.Table(
                columns=["step", "prompt", "text"], data=[[step, r["prompt"], r["text"]] for r in out]
            )
            self.wandb.log({"samples": table}, step=step)
        self.line(f"step {step} | {len(out)} samples written to {self.run.samples.name}")
        return out

    def _scalars(self, record: dict) -> None:
        names = {k: METRIC_NAMES.get(k) or scalar_name(k) for k in record}  # eval.tasks' keys: tasks/...
        values = {names[k]: v for k, v in record.items() if names[k] and v is not None}
        step = record["step"]
        if self.tb is not None:
            for name, v in values.items():
                self.tb.add_scalar(name, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def _beat(self) -> None:
        self.run.write_status(self.status)


def _start_wandb(cfg: Config, run_dir: Path, run_id: str | None):
    try:
        import wandb
    except ImportError as e:
        raise BackendError("log.wandb=true needs the wandb package: pip install 'lmforge[logging]'") from e
    return wandb.init(
        project=cfg.log.wandb_project,
        name=cfg.log.wandb_run_name or run_dir.name,
        dir=str(run_dir),
        mode=cfg.log.wandb_mode,
        config=config_to_dict(cfg),
        id=run_id,
        resume="allow" if run_id else None,
    )
