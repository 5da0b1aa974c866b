"""Run configuration: typed dataclasses, checked when built, saved as YAML into every run.

The CLI (jsonargparse) fills these from `--config FILE.yaml` and `--section.key=value` overrides; a
preset fills `model.*` defaults first, so a config file and the command line always win over it. Reading
and writing them as dicts and YAML files (a saved run's config.yaml): config_io.py.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import LmforgeError
from .model.config import ModelConfig
from .presets import get_preset

__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "EvalConfig",
    "FSDPConfig",
    "LogConfig",
    "LoraConfig",
    "ModelConfig",
    "TrainConfig",
]


class ConfigError(LmforgeError, ValueError):
    """A configuration value a user must fix; the message is one line naming the key."""


DEFAULT_MAX_STEPS = 1000  # train.max_steps when neither it nor train.max_tokens is given

# `lmforge finetune`'s defaults over train's (its --help shows them; a --config file or flag still wins).
FINETUNE_DEFAULTS = {
    # A sixth of pretraining's 6e-4: the weights already sit where pretraining put them, and steps as large
    # as pretraining's erase what it learned (catastrophic forgetting; SFT recipes for GPT-2-sized models
    # use 1e-5 to 1e-4). LoRA's adapters start at zero and often take 2e-4 (QLoRA, Dettmers et al., 2023).
    "train.lr": 1e-4,
    "train.warmup_steps": 10,  # a short ramp: AdamW's moments start at zero, the weights do not
    "train.min_lr_ratio": 0.0,  # decay to zero over the few epochs, as SFT recipes do
    "train.weight_decay": 0.0,  # decay pulls weights toward zero, not toward the base the fine-tune leaves
}


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {allowed}")


@dataclass
class TrainConfig:
    """Optimisation and hardware settings."""

    # The run's length, given one of two ways (never both): optimizer steps, or a token budget that
    # becomes ceil(max_tokens / tokens per step) steps. Neither given: DEFAULT_MAX_STEPS.
    max_steps: int | None = None
    max_tokens: int | None = None
    micro_batch_size: int | Literal["auto"] = 16  # sequences per forward/backward; auto: largest that fits
    global_batch_size: int | None = None  # sequences per optimizer step; None: micro_batch_size x world size
    lr: float = 6e-4  # peak learning rate (of AdamW's parameters, with optimizer=muon too)
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    warmup_steps: int = 100
    schedule: Literal["cosine", "wsd"] = "cosine"  # after warmup: cosine decay | warmup-stable-decay
    decay_fraction: float = 0.2  # wsd: the last share of the steps, decaying to the floor
    decay_shape: Literal["linear", "1-sqrt"] = "linear"  # wsd: how the decay falls
    weight_decay: float = 0.1  # on matmul weights only; never on norms, biases or embeddings
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    device: str = "auto"  # auto (cuda -> mps -> cpu), cpu, cuda, cuda:N, mps
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    compile: bool = False  # torch.compile the model
    seed: int = 1337
    data_order: Literal["random", "sequential"] = "random"  # shuffled windows, or packed in stream order
    max_bad_steps: int = 5  # stop after this many consecutive steps with a non-finite loss or grad norm
    early_stop_patience: int = 0  # stop after this many evaluations without improvement; 0 = off
    early_stop_min_delta: float = 0.0  # an improvement must lower val loss by more than this
    parallel: Literal["ddp", "fsdp"] = "ddp"  # ddp: replicate the model | fsdp: shard it (FSDP2, ZeRO-2/3)
    activation_checkpointing: Literal["none", "full", "every_k"] = "none"  # recompute blocks in backward
    activation_checkpointing_k: int = 2  # every_k: checkpoint one block in every k
    # adamw8bit needs torchao or bitsandbytes; muon: Muon on the blocks' matrices, AdamW on the rest
    optimizer: Literal["adamw", "adamw8bit", "muon"] = "adamw"
    muon_lr: float = 0.02  # optimizer=muon: peak lr of the blocks' matrices (the schedule scales it)
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0  # decoupled, as AdamW's: each step multiplies weights by 1 - lr * wd
    muon_nesterov: bool = True
    # lr per matrix shape: original sqrt(max(1, rows/cols)) | match_rms_adamw 0.2 sqrt(max(rows, cols)) | none
    muon_lr_adjust: Literal["original", "match_rms_adamw", "none"] = "original"
    muon_ns_steps: int = 5  # Newton-Schulz iterations of the orthogonalisation
    dist_timeout_s: int = 600  # a collective waiting longer than this ends the run with an error

    def __post_init__(self) -> None:
        for key, ok, allowed in _TRAIN_CHECKS:
            _require(ok(getattr(self, key)), f"train.{key}", getattr(self, key), allowed)
        if self.max_steps is not None and self.max_tokens is not None:
            raise ConfigError(
                f"train.max_steps={self.max_steps} and train.max_tokens={self.max_tokens} are both set: they "
                f"are two ways to give one budget; keep one"
            )

    def steps_for(self, tokens_per_step: int) -> int:
        """The run's length in optimizer steps, from whichever budget is set."""
        if self.max_tokens is not None:
            return math.ceil(self.max_tokens / tokens_per_step)
        return self.max_steps if self.max_steps is not None else DEFAULT_MAX_STEPS


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _positive_int_or_auto(v: Any) -> bool:
    return v == "auto" or (isinstance(v, int) and v >= 1)


# train.KEY -> (is the value allowed?, what is allowed), checked in this order when a TrainConfig is made.
_TRAIN_CHECKS: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("parallel", lambda v: v in ("ddp", "fsdp"), "must be ddp or fsdp"),
    (
        "activation_checkpointing",
        lambda v: v in ("none", "full", "every_k"),
        "must be none, full or every_k",
    ),
    ("activation_checkpointing_k", lambda v: v >= 1, "must be >= 1 (1 checkpoints every block)"),
    ("optimizer", lambda v: v in ("adamw", "adamw8bit", "muon"), "must be adamw, adamw8bit or muon"),
    ("schedule", lambda v: v in ("cosine", "wsd"), "must be cosine or wsd (warmup-stable-decay)"),
    (
        "decay_fraction",
        lambda v: 0 < v <= 1,
        "must be in (0, 1] (the share of steps that decay; typical 0.2)",
    ),
    ("decay_shape", lambda v: v in ("linear", "1-sqrt"), "must be linear or 1-sqrt"),
    ("muon_lr", lambda v: 0 < v <= 1, "must be in (0, 1] (typical: 0.02 to 0.05)"),
    ("muon_momentum", lambda v: 0 <= v < 1, "must be in [0, 1) (typical: 0.95)"),
    ("muon_weight_decay", lambda v: v >= 0, "must be >= 0"),
    (
        "muon_lr_adjust",
        lambda v: v in ("original", "match_rms_adamw", "none"),
        "must be original, match_rms_adamw or none",
    ),
    ("muon_ns_steps", lambda v: 1 <= v <= 20, "must be in [1, 20] (typical: 5)"),
    ("dist_timeout_s", lambda v: v >= 1, "must be >= 1 second"),
    ("max_bad_steps", lambda v: v >= 1, "must be >= 1"),
    ("early_stop_patience", lambda v: v >= 0, "must be >= 0"),
    ("early_stop_min_delta", lambda v: v >= 0, "must be >= 0"),
    ("max_steps", _optional(lambda v: v >= 1), "must be >= 1"),
    ("max_tokens", _optional(lambda v: v >= 1), "must be >= 1"),
    ("micro_batch_size", _positive_int_or_auto, "must be >= 1, or auto (the largest that fits in memory)"),
    ("global_batch_size", _optional(lambda v: v >= 1), "must be >= 1"),
    ("lr", lambda v: 0 < v <= 1, "must be in (0, 1] (typical: 1e-4 to 1e-3)"),
    # numpy's and Python's generators take seeds in [0, 2^32) and [0, 2^63): the common range.
    ("seed", lambda v: 0 <= v < 2**32, "must be in [0, 2^32)"),
    ("min_lr_ratio", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    ("warmup_steps", lambda v: v >= 0, "must be >= 0"),
    ("weight_decay", lambda v: v >= 0, "must be >= 0"),
    ("beta1", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("beta2", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("eps", lambda v: math.isfinite(v) and v > 0, "must be > 0 (typical: 1e-8)"),
    ("grad_clip", lambda v: v >= 0, "must be >= 0 (0 disables clipping)"),
    (
        "device",
        lambda v: re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v) is not None,
        "must be auto, cpu, cuda, cuda:N or mps",
    ),
)


@dataclass
class EvalConfig:
    """Validation during training."""

    every: int = 100  # steps between evaluations; 0 evaluates only at the start and the end
    batches: int = 20  # validation batches per evaluation (None of the split is sampled at random)
    at_start: bool = True  # evaluate the untrained model too, so progress is visible
    # Multiple-choice tasks scored at each evaluation (eval/downstream.py): FILE.jsonl (HellaSwag, ARC or
    # MMLU layout), NAME=FILE.jsonl or builtin:stdlib-next-line; a YAML list, or a,b on the command line.
    tasks: list[str] | str = field(default_factory=list)
    task_items: int = 200  # items per task and evaluation at most (a fixed sample), so evaluation stays cheap

    def __post_init__(self) -> None:
        _require(self.every >= 0, "eval.every", self.every, "must be >= 0")
        _require(self.batches >= 1, "eval.batches", self.batches, "must be >= 1")
        _require(self.task_items >= 1, "eval.task_items", self.task_items, "must be >= 1")
        if isinstance(self.tasks, str):  # --eval.tasks=a.jsonl,b.jsonl
            self.tasks = [t.strip() for t in self.tasks.split(",") if t.strip()]
        names = [task_spec(spec)[0] for spec in self.tasks]  # the files are read when training starts
        twice = sorted({n for n in names if names.count(n) > 1})
        _require(
            not twice,
            "eval.tasks",
            self.tasks,
            f"two tasks are named {next(iter(twice), '')!r}: write NAME=FILE.jsonl",
        )


def task_spec(spec: str) -> tuple[str, str]:
    """(name, source) of an eval.tasks entry: NAME=FILE.jsonl, FILE.jsonl (named by its stem) or
    builtin:NAME (named NAME). The name prefixes the task's metrics (NAME/acc), so it has no '/'."""
    name, eq, source = spec.partition("=")
    name, source = (name.strip(), source.strip()) if eq else ("", spec.strip())
    _require(bool(source), "eval.tasks", spec, "give FILE.jsonl, NAME=FILE.jsonl or builtin:NAME")
    if not name:
        name = source.removeprefix("builtin:") if source.startswith("builtin:") else Path(source).stem
    _require(
        bool(name) and "/" not in name and name.isprintable(),
        "eval.tasks",
        spec,
        "the task's name must be non-empty and without '/': write NAME=FILE.jsonl",
    )
    return name, source


@dataclass
class CheckpointConfig:
    """When and how many checkpoints are written."""

    every: int = 500  # steps between checkpoints; 0 saves only at the end
    keep_last: int = 3  # older step checkpoints are deleted once a newer one is complete

    def __post_init__(self) -> None:
        _require(self.every >= 0, "checkpoint.every", self.every, "must be >= 0")
        _require(self.keep_last >= 1, "checkpoint.keep_last", self.keep_last, "must be >= 1")


@dataclass
class LogConfig:
    """Console and metrics output."""

    every: int = 10  # steps between lines in metrics.jsonl
    progress: bool = True  # show a progress bar on a terminal
    tensorboard: bool = False  # also write TensorBoard event files under RUN_DIR/tb
    wandb: bool = False  # also log metrics and the config to Weights & Biases
    wandb_project: str = "lmforge"
    wandb_run_name: str | None = None  # None: the RUN_DIR's name
    wandb_mode: str | None = None  # online | offline | disabled; None: W&B's default (WANDB_MODE)
    sample_every: int = 0  # generate from sample_prompts every N evaluations (0: never)
    sample_prompts: list[str] = field(default_factory=lambda: ["The", "def "])
    sample_tokens: int = 48  # new tokens per sample
    report: bool = True  # write RUN_DIR/report.md and report.html (the report card) when the run ends

    def __post_init__(self) -> None:
        _require(self.every >= 1, "log.every", self.every, "must be >= 1")
        _require(
            self.sample_every >= 0, "log.sample_every", self.sample_every, "must be >= 0 (0: no samples)"
        )
        _require(self.sample_tokens >= 1, "log.sample_tokens", self.sample_tokens, "must be >= 1")
        _require(
            self.wandb_mode in (None, "online", "offline", "disabled"),
            "log.wandb_mode",
            self.wandb_mode,
            "must be online, offline or disabled",
        )


@dataclass
class FSDPConfig:
    """Sharding settings used when train.parallel is fsdp (FSDP2 `fully_shard`)."""

    reshard_after_forward: bool = True  # true: ZeRO-3 (weights sharded between uses) | false: ZeRO-2
    cpu_offload: bool = False  # keep sharded weights, gradients and optimizer state in CPU memory

    def __post_init__(self) -> None:
        for key in ("reshard_after_forward", "cpu_offload"):
            value = getattr(self, key)
            _require(isinstance(value, bool), f"fsdp.{key}", value, "must be true or false")


# Where LoRA adapters can go: the linear layers of every block (names under blocks.N).
LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


@dataclass
class LoraConfig:
    """Low-rank adapters (`lmforge finetune --lora.rank=R`): only they train; the base weights stay frozen."""

    rank: int = 0  # r of each adapter; 0: no adapters (a full fine-tune, or pretraining)
    alpha: float = 16.0  # the adapter's output is scaled by alpha / rank (Hu et al., 2021)
    # Every linear layer of the blocks by default: adapting all of them, not attention alone, is what
    # matches a full fine-tune (QLoRA, Dettmers et al., 2023, section 4).
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))

    def __post_init__(self) -> None:
        _require(self.rank >= 0, "lora.rank", self.rank, "must be >= 0 (0: no adapters)")
        _require(
            math.isfinite(self.alpha) and self.alpha > 0,
            "lora.alpha",
            self.alpha,
            "must be > 0 (typical: 16)",
        )
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        _require(
            bool(self.targets) and not bad and len(set(self.targets)) == len(self.targets),
            "lora.targets",
            self.targets,
            f"must be one or more of {', '.join(LORA_TARGETS)}, each once",
        )


@dataclass
class Config:
    """Everything one training run needs; saved as config.yaml in the run directory."""

    preset: str | None = None  # a named model size from lmforge.presets (fills model.* defaults)
    data: str | None = None  # DATA_DIR written by `lmforge prepare`
    out: str = "runs/run"  # RUN_DIR: checkpoints, metrics and the resolved config go here
    resume: str = "auto"  # auto: resume when RUN_DIR has checkpoints | never: refuse such a RUN_DIR | PATH
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        _require(bool(self.resume), "resume", self.resume, "must be auto, never or a checkpoint directory")
        if self.preset is not None:
            get_preset(self.preset)  # unknown names fail here, with a suggestion
        self.model = self.model.resolved()
        gb = self.train.global_batch_size
        if gb is not None and self.train.micro_batch_size != "auto" and gb % self.train.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size={gb} is not a multiple of train.micro_batch_size="
                f"{self.train.micro_batch_size}: gradient accumulation needs a whole number of micro-batches"
            )
