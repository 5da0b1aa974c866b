"""Option groups shared by the `lmforge` commands: one dataclass each, declared once, reused everywhere.

A command takes a group as one typed parameter (`run: Run`, `device: Device`, `sampling: SamplingParams`);
cli.py turns the group's fields into flat flags (--run, --device, --quantize, --temperature ...) with the
help and defaults written here, so every command that takes a group shows the same flags and defaults.
`Annotated[Group, Without("stop")]` leaves out the fields a command cannot honour (they keep defaults).
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml
from jsonargparse import ArgumentParser, Namespace

from .config import DEFAULT_MAX_STEPS, Config, ConfigError
from .generate.params import SamplingParams

__all__ = [
    "GROUPS",
    "Defaults",
    "Device",
    "Harness",
    "InferenceDevice",
    "Run",
    "RunConfig",
    "SamplingParams",
    "Without",
    "parse_config",
    "parse_config_with_budget",
    "resolve_budget",
    "run_config",
]


@dataclass(frozen=True)
class Run:
    """The run.

    Args:
        run: RUN_DIR (its latest checkpoint) or a checkpoint directory
    """

    run: str


@dataclass(frozen=True)
class Device:
    """Device.

    Args:
        device: auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps
    """

    device: str = "auto"


@dataclass(frozen=True)
class InferenceDevice(Device):
    """Device and weights.

    Args:
        device: auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps
        quantize: int8: int8 weight-only linear layers (CPU inference)
    """

    quantize: str | None = None


@dataclass(frozen=True)
class Harness:
    """lm-evaluation-harness (pip install 'lmforge[eval]').

    Args:
        harness: lm-evaluation-harness tasks to run instead, comma-separated (names, or task .yaml files)
        num_fewshot: examples in each prompt (--harness; default: each task's own)
        limit: items per task, or a fraction of them below 1 (--harness)
        include_path: a folder of your own task YAML files (--harness)
        apply_chat_template: prompts in the run's chat template (--harness)
    """

    harness: str | None = None
    num_fewshot: int | None = None
    limit: float | None = None
    include_path: str | None = None
    apply_chat_template: bool = False

    def settings_given(self) -> list[str]:
        """The flags of the settings given, which mean something only with --harness."""
        values = (self.num_fewshot, self.limit, self.include_path, self.apply_chat_template or None)
        flags = ("--num-fewshot", "--limit", "--include-path", "--apply-chat-template")
        return [flag for flag, value in zip(flags, values, strict=True) if value is not None]


# The dataclasses whose fields become flat flags of every command that takes one.
GROUPS = (Run, Device, InferenceDevice, SamplingParams, Harness)


class Without:
    """Fields of a group a command does not take: `Annotated[SamplingParams, Without("stop")]`."""

    def __init__(self, *fields: str) -> None:
        self.fields = frozenset(fields)


class Defaults:
    """Config defaults of one command over the Config's own, e.g.
    `Annotated[RunConfig, Defaults({"train.lr": 1e-4})]`; a --config file and --section.key flags win."""

    def __init__(self, values: dict) -> None:
        self.values = dict(values)


@dataclass(frozen=True)
class RunConfig:
    """A training config from --config files and --section.key=value flags (preset < YAML < flags); cli.py
    builds it with run_config below.

    budget says where the step budget came from (train prints it first); model_given holds the model.*
    values as given, before family defaults resolve (a resume keeps the checkpoint's for the others).
    """

    config: Config
    budget: str
    model_given: dict


BUDGET_KEYS = ("max_steps", "max_tokens")
DEFAULT_BUDGET = (
    f"train.max_steps={DEFAULT_MAX_STEPS}, the default"  # what resolve_budget says with none given
)


def _budget_flags(argv: list[str]) -> set[str]:
    """Budget keys given as --train.KEY flags on the command line."""
    found = (re.match(r"--train\.(max_steps|max_tokens)(=|$)", arg) for arg in argv)
    return {m.group(1) for m in found if m}


def _budget_in_yaml(paths: list) -> set[str]:
    """Budget keys that the --config files set (to something other than null)."""
    keys: set[str] = set()
    for path in paths:
        data = yaml.safe_load(Path(os.fspath(path)).read_text(encoding="utf-8")) or {}
        train = data.get("train") if isinstance(data, dict) else None
        keys |= {k for k in BUDGET_KEYS if isinstance(train, dict) and train.get(k) is not None}
    return keys


def resolve_budget(ns: Namespace, argv: list[str]) -> str:
    """Keep the one budget key given at the highest level (YAML < command line); clear the other in ns.

    Returns where the budget came from, for the run's first lines. Both keys at one level is an error.
    """
    for where, keys in (
        ("the command line", _budget_flags(argv)),
        ("--config", _budget_in_yaml(ns.get("config") or [])),
    ):
        if len(keys) > 1:
            raise ConfigError(
                f"train.max_steps and train.max_tokens are both given by {where}: they are two ways to set "
                f"one budget; keep one"
            )
        if keys:
            (key,) = keys
            other = BUDGET_KEYS[1 - BUDGET_KEYS.index(key)]
            ns[f"train.{other}"] = None
            return f"train.{key}={ns[f'train.{key}']}, from {where}"
    return DEFAULT_BUDGET


def parse_config_with_budget(ns: Namespace, parser: ArgumentParser, argv: list[str]) -> tuple[Config, str]:
    """The validated Config of a train/estimate namespace, and where its budget came from."""
    sections = typing.get_type_hints(Config)
    for name, kind in sections.items():  # `model: [1, 2]` in a YAML: one line, not instantiation's TypeError
        value = ns.get(name)
        if dataclasses.is_dataclass(kind) and value is not None and not isinstance(value, (Namespace, dict)):
            raise ConfigError(
                f"{name}: {value!r} is not a section of keys: write it as '{name}:' followed by indented "
                "'key: value' lines"
            )
    try:
        budget = resolve_budget(ns, argv)
        init = parser.instantiate(ns)
        return Config(**{f.name: init[f.name] for f in dataclasses.fields(Config)}), budget
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from e


def parse_config(ns: Namespace, parser: ArgumentParser, argv: list[str] | None = None) -> Config:
    """Build the validated Config from the train subcommand's namespace (argv: to tell flags from YAML)."""
    return parse_config_with_budget(ns, parser, argv or [])[0]


def run_config(ns: Namespace, parser: ArgumentParser, argv: list[str]) -> RunConfig:
    """The RunConfig of a train/estimate namespace (argv: to tell the command line's budget from YAML's)."""
    config, budget = parse_config_with_budget(ns, parser, argv)
    return RunConfig(config, budget, ns.model.as_dict())
