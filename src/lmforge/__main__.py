"""`python -m lmforge` runs the same command as `lmforge`."""

from .cli import entry

entry()
