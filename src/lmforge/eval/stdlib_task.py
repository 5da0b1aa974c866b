"""`builtin:stdlib-next-line`: a multiple-choice task made from this interpreter's standard library.

Each item gives the first lines of a function (its `def` line through the line before the target) and
four candidate next lines: the real one and three copies in which a name the line shares with the context
is swapped for another name of the same context. Every candidate reads like code and repeats a name seen
above, so neither looks nor a reflex to copy what came before tells them apart (an untrained model with
tied embeddings already favours tokens of its context): the model must know which of the function's
names goes there. A first version drew three whole lines from other modules instead; the quickstart model
stayed at chance on it at every evaluation (0.233 after 342 steps), since telling real code from real
code takes far more than 700k tokens of training.

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
import builtins
import functools
import keyword
import random
import re
import warnings

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
# A swapped-in name is within a factor of two of the swapped one's length, so length alone does not tell.
LENGTH_RATIO = 2.0
_COMPOUND = (ast.If, ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith)
_NAME_RE = re.compile(r"[A-Za-z_]\w{2,}")
# Names every module uses (keywords, builtins, self): knowing them needs no context, so the swapped names
# are always ones the function itself has used.
_COMMON_NAMES = frozenset(keyword.kwlist) | frozenset(dir(builtins)) | {"self", "cls"}


def builtin_task(spec: str) -> list[Choice]:
    """The items of a builtin task by its name; TaskError naming the known ones otherwise."""
    if spec != NAME:
        raise TaskError(f"unknown builtin task '{spec}': the builtin task is {NAME}")
    return list(stdlib_next_line())


@functools.lru_cache(maxsize=1)
def stdlib_next_line() -> tuple[Choice, ...]:
    """Every item of the task (one per function that has a usable line), in a fixed order."""
    held, seen_elsewhere = [], set()
    for doc in iter_stdlib(None):
        if val_score(doc.name) < HELD_OUT_FRACTION:
            held.append(doc)
        else:
            seen_elsewhere.update(line.strip() for line in doc.text.splitlines())
    rng = random.Random(SEED)
    items = []
    for doc in held:
        lines = doc.text.splitlines()
        for start, candidates in _functions(doc.text):
            usable = [t for t in candidates if lines[t].strip() not in seen_elsewhere]
            rng.shuffle(usable)
            made = (_item("\n".join(lines[start:t]), lines[t], rng) for t in usable)
            item = next((i for i in made if i is not None), None)  # the first line that makes an item
            if item is not None:
                items.append(item)
    return tuple(items)


def _names(text: str) -> set[str]:
    return set(_NAME_RE.findall(text)) - _COMMON_NAMES


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
    return bool(_names(line) & _names("\n".join(lines[start:t])))


def _item(context: str, line: str, rng: random.Random) -> Choice | None:
    """The real line and three copies in which the longest name it shares with the context is swapped for
    another name of the context, of similar length; None when the context has too few such names."""
    swapped = max(sorted(_names(line) & _names(context)), key=len)
    n = len(swapped)
    others = sorted(
        name for name in _names(context) - _names(line) if 1 / LENGTH_RATIO <= len(name) / n <= LENGTH_RATIO
    )
    if len(others) < N_CHOICES - 1:
        return None
    pattern = re.compile(rf"\b{re.escape(swapped)}\b")
    endings = [pattern.sub(name, line) for name in rng.sample(others, N_CHOICES - 1)]
    label = rng.randrange(N_CHOICES)
    endings.insert(label, line)
    # Each ending brings its own newline: the context ends where a line of code ends, as in the corpus.
    return Choice(context, tuple("\n" + e for e in endings), label, separator="")
