"""`builtin:stdlib-next-line`: a multiple-choice task made from this interpreter's standard library.

Each item gives the first lines of a function (its `def` line through the line before the target) and
four candidate next lines: the real one and three statements of the same indentation drawn from other
files, so indentation gives nothing away and the model must use what the function has said so far.

Leakage. The items come only from the modules `builtin:stdlib` puts in the validation split of data
prepared with a validation fraction of HELD_OUT_FRACTION or more (the split hashes each module's name:
data/passes.py's `val_score`), which includes `lmforge quickstart`'s data, so the quickstart never trains
on them. On top of that, a real line must appear, stripped, in no other module of the corpus: code
copied between modules (the codec boilerplate of encodings/, say) cannot be recalled from training.
With a smaller validation fraction some of these modules are training data, and the task measures
in-distribution learning instead.

Deterministic: files in sorted order and one seeded generator; the items depend only on the Python
version whose standard library is read.
"""

from __future__ import annotations

import ast
import functools
import keyword
import random
import re
import warnings
from collections import defaultdict

from ..data.passes import val_score
from ..data.stdlib_corpus import iter_stdlib
from .tasks import Choice, TaskError

NAME = "builtin:stdlib-next-line"
# lmforge quickstart's validation fraction: the modules it holds out are the task's modules.
HELD_OUT_FRACTION = 0.03
SEED = 20261206
N_CHOICES = 4
# A target line is a whole statement (or a compound statement's header) of 16 to 100 characters: shorter
# ones ("return x", "else:") are too alike to tell apart, longer ones are rare and mostly strings.
MIN_CHARS, MAX_CHARS = 16, 100
MAX_CONTEXT_LINES = 16  # the target is among the first lines of its function
MIN_CONTEXT_LINES = 2
# Distractors are within a factor of two of the real line's length, so length alone does not tell.
LENGTH_RATIO = 2.0
_COMPOUND = (ast.If, ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith)
_NAME_RE = re.compile(r"[A-Za-z_]\w{2,}")
_IGNORED_NAMES = frozenset(keyword.kwlist) | {"self", "cls", "None", "True", "False"}


def builtin_task(spec: str) -> list[Choice]:
    """The items of a builtin task by its name; TaskError naming the known ones otherwise."""
    if spec != NAME:
        raise TaskError(f"unknown builtin task '{spec}': the builtin task is {NAME}")
    return list(stdlib_next_line())


@functools.lru_cache(maxsize=1)
def stdlib_next_line() -> tuple[Choice, ...]:
    """Every item of the task (159 on CPython 3.11), in a fixed order."""
    held, seen_elsewhere = [], set()
    for doc in iter_stdlib(None):
        if val_score(doc.name) < HELD_OUT_FRACTION:
            held.append(doc)
        else:
            seen_elsewhere.update(line.strip() for line in doc.text.splitlines())
    targets = []  # (file, context, target line), one per function
    pool: dict[str, list[tuple[str, str]]] = defaultdict(list)  # indentation -> (file, line)
    rng = random.Random(SEED)
    for doc in held:
        lines = doc.text.splitlines()
        for start, candidates in _functions(doc.text):
            usable = [t for t in candidates if lines[t].strip() not in seen_elsewhere]
            for t in candidates:
                pool[_indent(lines[t])].append((doc.name, lines[t]))
            if usable:
                t = rng.choice(usable)
                targets.append((doc.name, "\n".join(lines[start:t]), lines[t]))
    items = [_item(name, context, line, pool[_indent(line)], rng) for name, context, line in targets]
    return tuple(item for item in items if item is not None)


def _functions(text: str) -> list[tuple[int, list[int]]]:
    """(index of the def line, indices of the lines that may be targets) of each function in `text`."""
    try:
        with warnings.catch_warnings():  # old escapes in string literals warn; they do not matter here
            warnings.simplefilter("ignore")
            tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = text.splitlines()
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        start = node.lineno - 1  # 0-based; decorators above the def are left out
        docstring = ast.get_docstring(node, clean=False) is not None
        first = node.body[1] if docstring and len(node.body) > 1 else node.body[0]
        targets = set()
        for stmt in ast.walk(node):
            if not isinstance(stmt, ast.stmt) or stmt is node or stmt.lineno < first.lineno:
                continue
            t = stmt.lineno - 1
            if MIN_CONTEXT_LINES <= t - start <= MAX_CONTEXT_LINES and _good_target(stmt, lines, start, t):
                targets.add(t)
        if targets:
            out.append((start, sorted(targets)))
    return out


def _good_target(stmt: ast.stmt, lines: list[str], start: int, t: int) -> bool:
    """A whole statement on one line (or a block's header) that reuses a name the function already used."""
    line = lines[t]
    whole = stmt.end_lineno == stmt.lineno or (isinstance(stmt, _COMPOUND) and line.rstrip().endswith(":"))
    if not whole or not MIN_CHARS <= len(line.strip()) <= MAX_CHARS:
        return False
    names = set(_NAME_RE.findall(line)) - _IGNORED_NAMES
    return bool(names & set(_NAME_RE.findall("\n".join(lines[start:t]))))


def _item(
    name: str, context: str, line: str, pool: list[tuple[str, str]], rng: random.Random
) -> Choice | None:
    """An item with three distractors of the same indentation from other files; None without enough."""
    n = len(line.strip())
    others = sorted(
        {
            other
            for file, other in pool
            if file != name
            and other.strip() != line.strip()
            and 1 / LENGTH_RATIO <= len(other.strip()) / n <= LENGTH_RATIO
        }
    )
    if len(others) < N_CHOICES - 1:
        return None
    endings = rng.sample(others, N_CHOICES - 1)
    label = rng.randrange(N_CHOICES)
    endings.insert(label, line)
    # Each ending brings its own newline: the context ends where a line of code ends, as in the corpus.
    return Choice(context, tuple("\n" + e for e in endings), label, separator="")


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]
