"""The `lmforge` subcommands, one typed function each: the signature is the command line.

cli.py turns each function into its parser with jsonargparse. Plain parameters before `*` without a
default are positional arguments; the others are flags, underscores written as dashes (batch_size is
--batch-size); a `bool` defaulting to False is a switch (--stream); a `list[str]` flag is repeated
(--stop A --stop B). A parameter typed with a group of options.py (Run, Device, SamplingParams ...) adds
that group's fields as flags, the same on every command; `RunConfig` adds --config and every
--section.key of the Config; a `Console` parameter is given by cli.py. The docstring's first line is the
command's line in `lmforge --help`, the docstring its description, its Args: section the flags' help.
A command returns None, or an exit code.

Adding a subcommand: write one such function in making.py (data, training, runs) or using.py (using a
run), and add one line to COMMANDS below. Heavy modules are imported inside the functions, so
`lmforge --help` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable

from . import making, using
from .making import EXIT_DIVERGED, EXIT_PREEMPTED

__all__ = ["COMMANDS", "EXIT_DIVERGED", "EXIT_PREEMPTED"]

# name -> function, in the order of `lmforge --help`.
COMMANDS: dict[str, Callable] = {
    "prepare": making.prepare,
    "train": making.train,
    "finetune": making.finetune,
    "merge": making.merge,
    "generate": using.generate,
    "chat": using.chat,
    "serve": using.serve,
    "export": using.export,
    "import": using.import_hf,
    "quickstart": making.quickstart,
    "bench": making.bench,
    "eval": using.evaluate,
    "estimate": making.estimate,
    "plot": making.plot,
    "report": making.report,
    "status": making.status,
    "doctor": making.doctor,
    "consolidate": making.consolidate,
}
