"""Option groups shared by the `lmforge` commands: one dataclass each, declared once, reused everywhere.

A command takes a group as one typed parameter (`run: Run`, `device: Device`, `sampling: SamplingParams`);
cli.py turns the group's fields into flat flags (--run, --device, --quantize, --temperature ...) with the
help and defaults written here, so every command that takes a group shows the same flags and defaults.
`Annotated[Group, Without("stop")]` leaves out the fields a command cannot honour (they keep defaults).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import Config
from .generate.params import SamplingParams

__all__ = ["GROUPS", "Device", "InferenceDevice", "Run", "RunConfig", "SamplingParams", "Without"]


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


# The dataclasses whose fields become flat flags of every command that takes one.
GROUPS = (Run, Device, InferenceDevice, SamplingParams)


class Without:
    """Fields of a group a command does not take: `Annotated[SamplingParams, Without("stop")]`."""

    def __init__(self, *fields: str) -> None:
        self.fields = frozenset(fields)


@dataclass(frozen=True)
class RunConfig:
    """A training config from --config files and --section.key=value flags (preset < YAML < flags).

    budget says where the step budget came from (train prints it first); model_given holds the model.*
    values as given, before family defaults resolve (a resume keeps the checkpoint's for the others).
    """

    config: Config
    budget: str
    model_given: dict
