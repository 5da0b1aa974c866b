"""The built-in corpus: this interpreter's standard library, as Python code rather than data tables."""

from __future__ import annotations

import os
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from lmforge.data.errors import DataError
from lmforge.data.files import Document, count_skip, make_doc, read_text_file
from lmforge.data.safe_read import display_name, walk_sorted

# Directory names that hold the stdlib's own test suites (test/, tests/, idlelib/idle_test,
# lib2to3/tests, ctypes/test, ...) or installed third-party code; the built-in corpus
# should be real library code that does not depend on what the user has pip-installed.
_STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)
# builtin:stdlib leaves out modules that are mostly literal tables (codec maps in encodings/,
# html.entities, generated data such as pydoc_data/topics.py): they teach a model hex escapes,
# not Python. Measured on CPython 3.11: the tables sit at 70-100% literal lines, real modules
# under 50% (opcode.py 49%, mimetypes.py 34%), and locale.py, real code with a big alias
# table, at 61%; two thirds keeps locale.py and drops stringprep.py's tables (70%).
MOSTLY_DATA_SHARE = 2 / 3
# A string (with optional b/r/u prefix) or a number: what a table row is made of.
_LITERAL_RE = re.compile(
    r"""[bBrRuU]{0,2}(?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")"""
    r"|\b(?:0[xXoObB][0-9a-fA-F_]+|\d[\d_]*\.?\d*(?:[eE][+-]?\d+)?[jJ]?)\b"
)
# What may sit between the literals of a table row.
_TABLE_PUNCTUATION = frozenset(" \t,:()[]{}+-")
# A line that starts with a name or keyword (not a b'' or r'' string) is code.
_CODE_LINE_RE = re.compile(r"(?![bBrRuU]{1,2}['\"])[^\W\d]")


def stdlib_root() -> Path:
    """The folder holding this interpreter's Python standard library sources."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not (root / "os.py").is_file():
        raise DataError(
            f"builtin:stdlib: no Python standard library sources at '{root}': "
            "give a file or folder as --source instead"
        )
    return root


def _is_data_line(line: str) -> bool | None:
    """True for a line of only literals and punctuation, False for code, None for neither.

    Blank, comment-only and bracket-only lines are neither; a docstring line counts as code
    (it is prose about the code, not a table).
    """
    s = line.strip()
    if not s or s[0] == "#":
        return None
    if _CODE_LINE_RE.match(s) or '"""' in s or "'''" in s:
        return False
    rest, literals = _LITERAL_RE.subn("", s)
    if not _TABLE_PUNCTUATION.issuperset(rest.partition("#")[0]):
        return False
    return True if literals else None


def mostly_data(text: str) -> bool:
    """Whether more than MOSTLY_DATA_SHARE of the code lines of a Python file are literal tables."""
    lines = text.splitlines()
    # data + code <= len(lines): once this many lines are code, the share cannot be reached,
    # which settles most real modules a third of the way in.
    enough_code = (1 - MOSTLY_DATA_SHARE) * len(lines)
    data = code = 0
    for line in lines:
        kind = _is_data_line(line)
        if kind is not None:
            data += kind
            code += not kind
            if code >= enough_code:
                return False
    return data > MOSTLY_DATA_SHARE * (data + code)


def iter_stdlib(skipped: dict[str, int] | None) -> Iterator[Document]:
    """The .py files of the standard library, in sorted order, less its tests and its data tables."""
    for rel, path, reason in walk_sorted(stdlib_root(), _STDLIB_EXCLUDED_DIRS):
        name = display_name(rel)
        if reason is not None:
            count_skip(skipped, reason, name)
            continue
        if not rel.endswith(".py"):
            continue
        if os.path.getsize(path) == 0:  # a package's empty __init__.py: nothing to learn, nothing wrong
            count_skip(skipped, "empty_module", name)
            continue
        text = read_text_file(path, name, skipped)
        if text is not None and mostly_data(text):
            count_skip(skipped, "mostly_data", name)
        elif text is not None:
            doc = make_doc(name, text, skipped)
            if doc is not None:
                yield doc
