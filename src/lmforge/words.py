"""How a count of things reads in the lines lmforge prints: "1 doc", "2 docs", "12,345 tokens"."""

from __future__ import annotations


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """n and its noun, singular for one (plural: the noun's plural when it is not noun + "s")."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"
