"""Configs as plain dicts and YAML files: the dict of a config, and a Config built from a dict or a YAML
file (a run's config.yaml), with unknown keys and wrongly typed values refused in one line naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from types import UnionType
from typing import Any, Literal

import yaml

from .config import (
    CheckpointConfig,
    Config,
    ConfigError,
    EvalConfig,
    FSDPConfig,
    LogConfig,
    LoraConfig,
    ModelConfig,
    TrainConfig,
)

__all__ = ["all_keys", "config_from_dict", "config_to_dict", "load_yaml_config", "unknown_key_message"]


def config_to_dict(cfg: Any) -> dict:
    """A plain dict (YAML/JSON-ready) of a config dataclass."""
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict) -> Config:
    """Build and validate a Config from a nested dict (e.g. a saved config.yaml), rejecting unknown keys."""
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    kwargs: dict[str, Any] = {}
    types = {
        "model": ModelConfig,
        "train": TrainConfig,
        "eval": EvalConfig,
        "checkpoint": CheckpointConfig,
        "log": LogConfig,
        "fsdp": FSDPConfig,
        "lora": LoraConfig,
    }
    for key, value in d.items():
        if key not in sections:
            raise ConfigError(unknown_key_message(_key_name(key), list(sections)))
        if key in types:
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{key}={_short_repr(value)}: must be a mapping of settings (key: value)")
            known = [f.name for f in dataclasses.fields(types[key])]
            for sub in value or {}:
                if sub not in known:
                    raise ConfigError(
                        unknown_key_message(f"{key}.{_key_name(sub)}", [f"{key}.{k}" for k in known])
                    )
            _check_types(key, types[key], value or {})
            if key == "train":
                value = _upgrade_budget(value or {})
            kwargs[key] = value or {}
        else:
            _check_types("", Config, {key: value})
            kwargs[key] = value
    try:
        for key, cls in types.items():
            if key in kwargs:
                kwargs[key] = cls(**kwargs[key])
        return Config(**kwargs)
    except ConfigError:
        raise
    except (ValueError, ArithmeticError) as error:  # the model's own checks raise ValueError
        raise ConfigError(" ".join(str(error).split())) from None


def _key_name(key: Any) -> str:
    """A key for a one-line message: a plain name as it is, anything else as a short repr."""
    return key if isinstance(key, str) and key.isprintable() and key else _short_repr(key)


def _short_repr(value: Any) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int too long to print (sys.get_int_max_str_digits)
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(hint: Any) -> str:
    """``int | Literal['auto']`` as ``int or 'auto'``: what a user may write."""
    if typing.get_origin(hint) in (typing.Union, UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is Literal:
        return " or ".join(repr(arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return hint.__name__ if isinstance(hint, type) else str(hint)


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether ``value`` (as read from YAML) fits the annotation ``hint`` of a config field."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, UnionType):
        return any(_type_ok(value, arg) for arg in args)
    if origin is Literal:
        return any(type(value) is type(arg) and value == arg for arg in args)
    if origin is list:
        return isinstance(value, list) and all(_type_ok(v, args[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:  # YAML writes 1.0 as 1: an int is a number too
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _check_types(section: str, cls: type, values: dict) -> None:
    """ConfigError, naming the key, for a value of the wrong type (a string where a number goes)."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if not _type_ok(value, hints[key]):
            name = f"{section}.{key}" if section else key
            raise ConfigError(f"{name}={_short_repr(value)}: must be {_type_name(hints[key])}")


def _upgrade_budget(train: dict) -> dict:
    """Configs saved before the budget became one setting hold both keys, and max_tokens decided then."""
    if train.get("max_steps") is not None and train.get("max_tokens") is not None:
        return {**train, "max_steps": None}
    return train


def load_yaml_config(path: str | Path) -> Config:
    """Read a config YAML (as written into run directories)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError, ValueError, RecursionError) as error:
        # ValueError: an integer too long for int(); RecursionError: nesting deeper than the parser goes.
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise ConfigError(
            f"{path}: not a valid YAML config ({reason}): fix the file or write it again"
        ) from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a config must be a mapping of sections (model:, train:, ...), not {_short_repr(data)}"
        )
    return config_from_dict(data or {})


def unknown_key_message(key: str, known: list[str]) -> str:
    """One line: the unknown key and the closest known one."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown config key {key}{hint}"


def all_keys() -> list[str]:
    """Every dotted key a Config accepts (model.n_layer, train.lr, ...)."""
    keys = []
    for f in dataclasses.fields(Config):
        if dataclasses.is_dataclass(
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        ):
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(f.default_factory())]
        else:
            keys.append(f.name)
    return keys
