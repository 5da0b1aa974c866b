"""`builtin:stdlib-chat`: short conversations about the functions of this interpreter's standard library.

Made from the same files `builtin:stdlib` reads (stdlib_corpus.py), parsed with `ast`, so nothing is
downloaded and the conversations are the same on every run with the same Python. Every documented
function or method whose code is short becomes one conversation, in one of four shapes picked by a hash
of its name:

  write      the user gives the signature and the docstring's summary, the assistant writes the function
  explain    the user shows the code without its docstring and asks what it does; the assistant answers
             with the summary, then writes the docstring when asked for it
  name       the user shows the code with the function's name hidden and asks for it, then asks what it does
  summarize  the user asks for a one-line docstring of the code; the assistant gives the summary

A quarter of them open with a system message. Each conversation is one document named after its function
(`stdlib-chat/json/__init__.py:dumps`), so the train/val split keeps a function on one side.
"""

from __future__ import annotations

import ast
import hashlib
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass

from lmforge.data.files import count_skip
from lmforge.data.stdlib_corpus import iter_stdlib

# Longest code and summary kept, in characters. With a byte-level BPE of 8,192 ids trained on the
# stdlib (about 3.5 characters per token on its code), a conversation at these limits is about 250
# tokens, so most fit a 256-token window (benchmarks/chat_packing.py measures it).
MAX_CODE_CHARS = 640
MAX_SUMMARY_CHARS = 240
MAX_DOCSTRING_CHARS = 400
SHAPES = ("write", "write", "explain", "name", "summarize")
SYSTEM_PROMPTS = (
    "You are a helpful assistant who knows the Python standard library well.",
    "You write clear, correct Python. Answer with code when asked for code.",
    "Answer briefly.",
)
_WRITE_ASKS = (
    "Write a Python function `{signature}` for the `{module}` module: {summary}",
    "Implement `{signature}`. {summary}",
    "{summary} Write it in Python as `{signature}`.",
)


@dataclass(frozen=True)
class Function:
    """A documented function of the standard library, as the conversations use it."""

    id: str  # stdlib-chat/json/__init__.py:JSONEncoder.encode
    module: str  # json
    name: str  # encode
    signature: str  # def encode(self, o)
    summary: str  # the docstring's first paragraph on one line
    docstring: str  # the cleaned docstring
    source: str  # the code as written, dedented
    body: str  # the code without its docstring


def _module_name(path: str) -> str:
    parts = path[: -len(".py")].split("/")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _functions(tree: ast.Module) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(qualified name, node) of the module's functions and its classes' methods."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node.name, node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    yield f"{node.name}.{item.name}", item


def _trivial(body: list[ast.stmt]) -> bool:
    """A body with nothing to learn after its docstring: `pass`, `...` or a lone raise."""
    rest = body[1:]
    if len(rest) != 1:
        return not rest
    only = rest[0]
    ellipsis = isinstance(only, ast.Expr) and isinstance(only.value, ast.Constant) and only.value.value is ...
    return ellipsis or isinstance(only, ast.Pass | ast.Raise)


def _function(path: str, lines: list[str], qualname: str, node) -> Function | None:
    """The Function of one node, or None when it has no docstring, is trivial or too long."""
    doc = ast.get_docstring(node, clean=True)
    if not doc or _trivial(node.body):
        return None
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    doc_node, after = node.body[0], node.body[1]
    # The docstring must have lines of its own, so the code reads the same without them.
    if doc_node.lineno == node.lineno or after.lineno <= doc_node.end_lineno:
        return None
    source = textwrap.dedent("".join(lines[first - 1 : node.end_lineno]))
    body = textwrap.dedent(
        "".join(lines[first - 1 : doc_node.lineno - 1] + lines[doc_node.end_lineno : node.end_lineno])
    )
    summary = " ".join(doc.split("\n\n")[0].split())
    if len(body) > MAX_CODE_CHARS or len(summary) > MAX_SUMMARY_CHARS or len(doc) > MAX_DOCSTRING_CHARS:
        return None
    returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
    asynchronous = "async " if isinstance(node, ast.AsyncFunctionDef) else ""
    signature = f"{asynchronous}def {node.name}({ast.unparse(node.args)}){returns}"
    return Function(
        f"stdlib-chat/{path}:{qualname}", _module_name(path), node.name, signature, summary, doc, source, body
    )


def _pick(key: str, salt: str, count: int) -> int:
    """A stable choice among ``count`` for ``key`` (the same on every run and machine)."""
    return int.from_bytes(hashlib.sha256(f"{salt}:{key}".encode()).digest()[:8], "big") % count


def _code(text: str) -> str:
    return f"```python\n{text.rstrip()}\n```"


def conversation(fn: Function) -> list[dict[str, str]]:
    """The messages of ``fn``'s conversation, in the shape its name picks."""
    shape = SHAPES[_pick(fn.id, "shape", len(SHAPES))]
    if shape == "write":
        ask = _WRITE_ASKS[_pick(fn.id, "ask", len(_WRITE_ASKS))]
        turns = [ask.format(signature=fn.signature, module=fn.module, summary=fn.summary), _code(fn.source)]
    elif shape == "explain":
        turns = [f"What does this function do?\n{_code(fn.body)}", fn.summary]
        turns += ["Write its docstring.", f'"""{fn.docstring}"""']
    elif shape == "name":
        hidden = fn.body.replace(f"def {fn.name}(", "def ___(", 1)
        turns = [
            f"This function from `{fn.module}` has its name hidden:\n{_code(hidden)}\nWhat is it called?"
        ]
        turns += [f"`{fn.name}`", "What does it do?", fn.summary]
    else:
        turns = [f"Write a one-line docstring for this function.\n{_code(fn.body)}", fn.summary]
    messages = [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(turns)]
    if _pick(fn.id, "system", 4) == 0:
        system = SYSTEM_PROMPTS[_pick(fn.id, "prompt", len(SYSTEM_PROMPTS))]
        messages.insert(0, {"role": "system", "content": system})
    return messages


def iter_functions(skipped: dict[str, int] | None) -> Iterator[Function]:
    """The standard library's short documented functions, module by module in sorted order."""
    for doc in iter_stdlib(skipped):
        try:
            tree = ast.parse(doc.text)
        except (SyntaxError, ValueError):  # a module this Python cannot parse: not one to learn from
            count_skip(skipped, "unparsable", doc.name)
            continue
        lines = doc.text.splitlines(keepends=True)
        for qualname, node in _functions(tree):
            fn = _function(doc.name, lines, qualname, node)
            if fn is not None:
                yield fn


def iter_stdlib_chat(skipped: dict[str, int] | None) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """(name, messages) of every conversation of builtin:stdlib-chat, in a fixed order."""
    for fn in iter_functions(skipped):
        yield fn.id, conversation(fn)
