"""The one `lmforge` command: each subcommand is a typed function in commands/ (its signature is the
command line; the rules are in commands/__init__.py). jsonargparse builds each parser from the
signature and docstring, argv is parsed once, and main() calls the function with what was parsed.

lmforge prepare  --source SRC[:WEIGHT] ... --out DATA_DIR [--tokenizer bpe|wordpiece|unigram|word|char|gpt2|tiktoken:NAME|FILE]
lmforge train    --config configs/X.yaml --data DATA_DIR --out RUN_DIR [--resume auto|never|PATH] [--section.key=value ...]
lmforge finetune --from BASE_RUN_DIR --data SFT_DATA --out SFT_RUN [--lora.rank=R] [--section.key=value ...]
lmforge merge    --run SFT_RUN --out MERGED_RUN
lmforge generate --run RUN_DIR --prompt "..." [--stream] | --input prompts.txt --output results.jsonl
lmforge chat     --run RUN_DIR
lmforge serve    --run RUN_DIR [--host 127.0.0.1] [--port 8000]
lmforge export   --run RUN_DIR --format hf|safetensors|onnx|gguf --out DIR [--dtype f32|f16|bf16|q8_0] [--license ID]
lmforge import   hf:HF_DIR --out RUN_DIR
lmforge eval     --run RUN_DIR [--data DATA_DIR | --text FILE] [--tasks NAME=FILE.jsonl] [--quantize int8] | --harness TASKS
lmforge consolidate --run RUN_DIR [--out DIR]
lmforge quickstart
lmforge bench    [--preset P] [--batch N] [--compare hf|none]
lmforge estimate --config configs/X.yaml [--preset P] [--gpu NAME] [--gpus N] [--section.key=value ...]
lmforge plot     RUN_DIR [RUN_DIR ...] [--out FILE.png|.html]
lmforge report   RUN_DIR
lmforge status   RUN_DIR
lmforge doctor   [--run-dir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import os
import re
import signal
import sys
import time
import typing
import warnings
from argparse import ArgumentError
from collections.abc import Callable
from pathlib import Path

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace
from rich.console import Console

from .commands import COMMANDS, EXIT_DIVERGED, EXIT_PREEMPTED
from .config import Config, ConfigError
from .config_io import all_keys, unknown_key_message
from .errors import LmforgeError
from .options import GROUPS, Defaults, RunConfig, Without, parse_config, run_config
from .presets import get_preset

__all__ = ["EXIT_DIVERGED", "EXIT_PREEMPTED", "EXIT_USAGE", "build_parser", "main", "parse", "parse_config"]

EXIT_USAGE = 2  # bad input: a config value, missing data, an unusable checkpoint, a failed checkpoint write


def _unwrap(hint) -> tuple[typing.Any, frozenset[str]]:
    """(type, fields it leaves out) of a parameter's annotation: Group, or Annotated[Group, Without(...)]."""
    if typing.get_origin(hint) is typing.Annotated:
        base, *extras = typing.get_args(hint)
        return base, frozenset().union(*(e.fields for e in extras if isinstance(e, Without)))
    return hint, frozenset()


def _config_defaults(fn: Callable, name: str) -> dict:
    """The config defaults a command sets over the Config's own: Annotated[RunConfig, Defaults({...})]."""
    hint = typing.get_type_hints(fn, include_extras=True)[name]
    extras = typing.get_args(hint)[1:] if typing.get_origin(hint) is typing.Annotated else ()
    return {key: value for e in extras if isinstance(e, Defaults) for key, value in e.values.items()}


def _params(fn: Callable) -> list[tuple[str, typing.Any, frozenset[str]]]:
    """(name, type, fields left out) of each parameter of a command function."""
    hints = typing.get_type_hints(fn, include_extras=True)
    return [(name, *_unwrap(hints[name])) for name in inspect.signature(fn).parameters]


def _swap(parser: ArgumentParser, old, new) -> None:
    """Put the action `new` where `old` was: in the parser, its --help group and its option table."""
    parser._actions[parser._actions.index(old)] = new
    for group in parser._action_groups:
        if old in group._group_actions:
            group._group_actions[group._group_actions.index(old)] = new
    for flag in old.option_strings:
        parser._option_string_actions.pop(flag, None)
    for flag in new.option_strings:
        parser._option_string_actions[flag] = new


def _plain_action(*flags: str, **kwargs):
    """A standard argparse action (append, store_true, nargs='+'), made by argparse itself."""
    return argparse.ArgumentParser(add_help=False).add_argument(*flags, **kwargs)


def _posix_flags(parser: ArgumentParser, dests: list[str]) -> None:
    """lmforge's spelling of the arguments jsonargparse made from a signature: --batch-size for batch_size,
    a switch for a bool that defaults to False (--stream), a repeated flag for a list (--stop A --stop B,
    each value taken as written), one or more values for a positional list (plot RUN_DIR RUN_DIR). A
    trailing underscore, which keeps a Python keyword a name, is not written (from_ is --from)."""
    for dest in dests:
        if "." in dest:  # a nested config key keeps its name: --model.n_layer
            continue
        old = next(a for a in parser._actions if a.dest == dest)
        hint = getattr(old, "_typehint", None)
        is_list = list in {typing.get_origin(t) for t in (hint, *typing.get_args(hint))}
        flag = f"--{dest.rstrip('_').replace('_', '-')}"
        if not old.option_strings:
            if is_list:
                _swap(parser, old, _plain_action(dest, nargs="+", metavar=dest.upper(), help=old.help))
        elif is_list:
            new = _plain_action(flag, dest=dest, action="append", default=old.default, help=old.help)
            new.required = old.required
            _swap(parser, old, new)
        elif hint is bool and old.default is False:
            _swap(parser, old, _plain_action(flag, dest=dest, action="store_true", help=old.help))
        else:
            for spelling in old.option_strings:
                del parser._option_string_actions[spelling]
            old.option_strings = [flag]
            parser._option_string_actions[flag] = old
            if dest.endswith("_"):
                old.metavar = dest.rstrip("_").upper()


def command_parser(fn: Callable) -> ArgumentParser:
    """The parser of one command, made from its function's signature and docstring."""
    parser = ArgumentParser(description=_description(fn), exit_on_error=False)
    given = set()  # parameters that are not the function's own flags
    for name, kind, without in _params(fn):
        if kind is Console:
            given.add(name)
        elif kind is RunConfig:
            parser.add_argument("--config", action=ActionConfigFile, help="a YAML config (see configs/)")
            parser.add_class_arguments(Config, nested_key=None, fail_untyped=False)
            parser.set_defaults(_config_defaults(fn, name))
            given.add(name)
        elif kind in GROUPS:
            added = parser.add_class_arguments(kind, nested_key=None, skip=set(without), instantiate=False)
            _posix_flags(parser, added)
            given.add(name)
    _posix_flags(parser, parser.add_function_arguments(fn, as_positional=True, as_group=False, skip=given))
    return parser


def _description(fn: Callable) -> str:
    """A command's description: its docstring without the Args: section."""
    return (inspect.getdoc(fn) or "").split("\n\nArgs:")[0]


def build_parser(only: str | None = None) -> tuple[ArgumentParser, dict[str, ArgumentParser]]:
    """The top-level parser and each subcommand's parser, one per function in COMMANDS.

    only: build that command's parser in full and the others as stubs that just name themselves in
    `lmforge --help` (a full parser takes tens of milliseconds to build from its signature).
    """
    root = ArgumentParser(
        prog="lmforge", description="Train GPT-style language models and use them.", exit_on_error=False
    )
    subs = root.add_subcommands(dest="command", required=True)
    parsers = {
        name: command_parser(fn)
        if only in (None, name)
        else ArgumentParser(description=_description(fn), exit_on_error=False)
        for name, fn in COMMANDS.items()
    }
    for name, parser in parsers.items():
        subs.add_subcommand(name, parser, help=parser.description.splitlines()[0])
    return root, parsers


def _given(args: list[str], flags: tuple[str, ...]) -> list[tuple[str, str]]:
    """(flag, value) of each of `flags` in args, written --flag VALUE or --flag=VALUE, in order."""
    found = []
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag in flags and (eq or i + 1 < len(args)):
            found.append((flag, value if eq else args[i + 1]))
    return found


def _yaml_preset(path: str) -> tuple[bool, str | None]:
    """(whether it sets one, the preset) of a --config file; an unreadable file is the parser's to report."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False, None
    return (True, data["preset"]) if isinstance(data, dict) and "preset" in data else (False, None)


def preset_defaults(parser: ArgumentParser, args: list[str]) -> None:
    """Make the preset's model.* the defaults of a command that takes --preset, before its one parse.

    The preset is the last one given, by --preset or a --config file, as the parse would see it; the
    files and flags given after it still win over its values (preset < YAML < flags).
    """
    if "--preset" not in parser._option_string_actions:
        return
    name = None
    for flag, value in _given(args, ("--preset", "--config")):
        if flag == "--preset":
            name = None if value == "null" else value
        else:
            sets, preset = _yaml_preset(value)
            name = preset if sets else name
    if name:
        try:
            preset = get_preset(str(name))
        except ValueError as e:
            raise ConfigError(str(e)) from e
        parser.set_defaults({f"model.{k}": v for k, v in preset.items()})


def _command_of(argv: list[str]) -> str:
    """The subcommand argv names (the first word), or "" when it names none."""
    return argv[0] if argv and argv[0] in COMMANDS else ""


def parse(
    argv: list[str], built: tuple[ArgumentParser, dict[str, ArgumentParser]] | None = None
) -> tuple[str, Namespace, dict[str, ArgumentParser]]:
    """Parse argv once (a preset first becomes the model defaults): (command, its namespace, the parsers)."""
    root, parsers = built or build_parser(only=_command_of(argv))
    if argv and argv[0] in parsers:
        preset_defaults(parsers[argv[0]], argv[1:])
    ns = root.parse_args(argv)
    return ns.command, ns[ns.command], parsers


def _group(kind: type, values, without: frozenset[str] = frozenset()):
    """An option group (or bench's ModelConfig) from parsed values; a bad value is one ConfigError line."""
    names = [f.name for f in dataclasses.fields(kind) if f.name not in without]
    try:
        return kind(**{name: values[name] for name in names})
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from e


def run(command: str, ns: Namespace, parser: ArgumentParser, argv: list[str], console: Console) -> int:
    """Call the command's function with what was parsed; its exit code (None: 0)."""
    fn = COMMANDS[command]
    kwargs = {}
    for name, kind, without in _params(fn):
        if kind is Console:
            kwargs[name] = console
        elif kind is RunConfig:
            kwargs[name] = run_config(ns, parser, argv)
        elif dataclasses.is_dataclass(kind):
            kwargs[name] = _group(kind, ns if kind in GROUPS else ns[name], without)
        else:
            kwargs[name] = ns[name]
    return fn(**kwargs) or 0


def _unknown_flag(flag: str, parser: ArgumentParser | None) -> str:
    """'unknown option' with the nearest flag of the command; config keys get the config's suggestion."""
    key = flag.lstrip("-").split("=")[0]
    if parser is None or "." in key or "--config" in parser._option_string_actions:
        return unknown_key_message(key, all_keys())
    near = difflib.get_close_matches(flag.split("=")[0], list(parser._option_string_actions), n=1)
    return f"unknown option {flag.split('=')[0]}" + (f" (did you mean {near[0]}?)" if near else "")


def _one_line(err: Exception, parser: ArgumentParser | None = None) -> str:
    """A jsonargparse/argparse error as one line, with a 'did you mean' for unknown keys."""
    msg = str(err)
    unknown = re.search(r"unrecognized arguments: (\S+)", msg)
    if unknown:
        return _unknown_flag(unknown.group(1), parser)
    missing = re.search(r"the following arguments are required: (.+)", msg)
    if missing:  # jsonargparse names them by key (generate.run): say the flag the user types
        keys = [key.split(".", 1)[-1].strip() for key in missing.group(1).split(",")]
        flags = {a.dest: (a.option_strings or [a.dest.upper()])[0] for a in parser._actions} if parser else {}
        return "missing " + ", ".join(flags.get(key, key) for key in keys)
    group = re.search(r"(Group|Subcommand) '(\w+)' does not accept (?:option|nested key) '([\w.]+)'", msg)
    if group:
        key = group.group(3) if group.group(1) == "Subcommand" else f"{group.group(2)}.{group.group(3)}"
        return unknown_key_message(key, all_keys())
    key = re.search(r'Parser key "([\w.]+)":\s*(.*)', msg, re.S)
    if key:
        detail = " ".join(key.group(2).split())
        return _bad_value(key.group(1), detail) or f"{key.group(1)}: {detail}"
    return " ".join(msg.split())


def _bad_value(key: str, detail: str) -> str | None:
    """jsonargparse's type error for a key as `key='value': must be TYPE` (None: not a type error)."""
    single = re.fullmatch(r"Expected a (.+?)\. Got value: (.*)", detail)
    union = re.search(r"Subtypes: \[(.*?)\] Errors:.* Given value: (.*)$", detail)
    if single:
        kinds, value = [single.group(1)], single.group(2)
    elif union:
        kinds, value = re.findall(r"<class '\w+'>|typing\.Literal\[[^\]]*\]", union.group(1)), union.group(2)
    else:
        return None
    names = []
    for kind in kinds:
        literal = re.fullmatch(r"typing\.Literal\[(.*)\]", kind)
        if literal:
            names += [v.strip() for v in literal.group(1).split(",")]
        else:
            name = re.sub(r"<class '(\w+)'>", r"\1", kind)
            names.append({"NoneType": "null", "str": "text", "bool": "true or false"}.get(name, name))
    return f"{key}={value!r}: must be {' or '.join(names)}"


class _Console(Console):
    """The commands' stdout. When the output's reader is gone (`| head` that has its lines, a closed
    terminal), later output goes nowhere; a command that stops on a hang-up (training, which then saves a
    checkpoint) is asked to stop as SIGHUP asks, and any other ends quietly, as rich's console does."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        hangup = getattr(signal, "SIGHUP", None)
        if hangup is not None and callable(signal.getsignal(hangup)):  # a handler is listening
            signal.raise_signal(hangup)
            return
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lmforge` console script; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    console = _Console()
    err = Console(stderr=True)
    built = build_parser(only=_command_of(argv))
    try:
        command, ns, parsers = parse(argv, built)
        return run(command, ns, parsers[command], argv, console)
    except ArgumentError as e:
        parser = built[1].get(argv[0]) if argv else None
        _say_error(err, _one_line(e, parser), everywhere=True)
        return EXIT_USAGE
    except LmforgeError as e:
        _say_error(err, str(e), everywhere=isinstance(e, ConfigError))
        return getattr(e, "exit_code", EXIT_USAGE)
    except OSError as e:
        if e.filename is None:  # not about a path the user gave: a bug to see whole
            raise
        _say_error(err, _path_error(e), everywhere=False)
        return EXIT_USAGE
    except KeyboardInterrupt:
        err.print("lmforge: interrupted", highlight=False, soft_wrap=True)
        return 130


def _path_error(e: OSError) -> str:
    """One line for a path that cannot be used (a file where a folder should be, a read-only or virtual
    file system, no permission). Commands write through temporary names beside the target and remove them
    on failure, so such a name is shown as its folder."""
    path = Path(e.filename)
    temporary = ".tmp" in path.name
    where = f"in '{path.parent}'" if temporary else f"'{path}'"
    if isinstance(e, FileExistsError | NotADirectoryError):
        return f"cannot write {where}: a file stands where a folder is needed; choose another path"
    why = e.strerror or type(e).__name__
    if temporary:
        return f"cannot write {where} ({why}): choose an output path in a writable folder"
    return f"cannot use {where} ({why}): check the path and its permissions"


RANK0_SAYS_S = 10  # how long other ranks wait, under torchrun, for rank 0 to print an error all meet


def _say_error(err: Console, message: str, everywhere: bool) -> None:
    """`lmforge: error: MESSAGE` on stderr. Under torchrun, an error every rank meets alike (a flag, a
    config value) is printed by rank 0 alone, and any other names the rank that met it."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        if everywhere and rank != 0:
            # Give way: torchrun stops every rank once one exits, and rank 0 must live to say it. A rank
            # still here after that (rank 0 did not meet the error after all) says it itself.
            time.sleep(RANK0_SAYS_S)
        if not (everywhere and rank == 0) and not message.startswith("rank "):
            message = f"rank {rank} of {world}: {message}"
    # markup=False: a message is plain text ("pip install 'lmforge[hf]'" lost its [hf] as a rich tag).
    err.print(f"lmforge: error: {message}", highlight=False, markup=False, soft_wrap=True)


def entry() -> None:
    """The `lmforge` program (and `python -m lmforge`): main(), with lmforge's own warnings shown as one
    line each (`lmforge: warning: ...`) instead of Python's file, line number and source line."""
    warnings.showwarning = _show_warning
    sys.exit(main())


_PACKAGE = str(Path(__file__).resolve().parent)
_python_show_warning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if str(Path(filename).resolve()).startswith(_PACKAGE):
        Console(stderr=True).print(
            f"lmforge: warning: {message}", highlight=False, markup=False, soft_wrap=True
        )
    else:  # another package's warning keeps Python's format
        _python_show_warning(message, category, filename, lineno, file, line)


if __name__ == "__main__":
    entry()
