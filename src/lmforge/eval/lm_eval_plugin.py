"""How `lm_eval --model lmforge` finds lmforge: the name in lm-eval's model registry, in any process.

lm-eval 0.4.13 resolves --model only against its own registry, which it fills from a fixed table when
`lm_eval.models` is first imported; it reads no entry points and imports no user module before it looks
(releases after it read the `lm_eval.models` entry-point group, which pyproject.toml declares as well).
So an installed lmforge also ships a one-line `lmforge-lm-eval.pth` (setup.py) that Python runs at start:
install() puts a finder on sys.meta_path and imports nothing else. When a program imports `lm_eval.models`
the finder lets the normal import run and then registers "lmforge" as a lazy "module:Class" string, so
the model code (and torch) load only when `--model lmforge` is asked for. This module is imported by every
Python of an environment lmforge is installed in: it stays a few lines of the standard library.
"""

from __future__ import annotations

import sys

MODEL_NAME = "lmforge"
TARGET = "lmforge.eval.harness:LmforgeLM"
WATCHED = "lm_eval.models"  # importing it fills lm-eval's model registry


def _add() -> None:
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:  # a later lm-eval may have found it through the entry point
        model_registry.register(MODEL_NAME, target=TARGET)


def register() -> None:
    """Put the lmforge model type in lm-eval's registry now (lm_eval must be importable)."""
    import lm_eval.models  # noqa: F401  # first: lm-eval fills an empty registry itself, a non-empty one never

    _add()


class _RegisteringLoader:
    """The loader of `lm_eval.models`, which registers lmforge right after the module has run."""

    def __init__(self, loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _add()

    def __getattr__(self, name: str):  # everything else (resources, source) is the real loader's
        return getattr(self._loader, name)


class _Finder:
    """Finds nothing itself: wraps the loader the other finders give `lm_eval.models`, once."""

    def find_spec(self, name, path, target=None):
        if name != WATCHED:
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


def install() -> None:
    """What the .pth line runs: register when lm_eval.models is imported (now, if it already was)."""
    if WATCHED in sys.modules:
        _add()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
