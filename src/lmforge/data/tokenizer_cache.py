"""A cache of GPT-2's built tokenizer.json and its digest, so prepare does not rebuild them every run.

Building GPT-2 as a `tokenizers` object, saving it and taking the canonical digest costs ~0.5 s of
CPU per `prepare`, a quarter of preparing the 12 MB builtin corpus. The result depends only on the
vocabulary files, the `tokenizers` version and lmforge's own building and hashing code, so it is
kept under a key made of all of them, in ``tokenizers/`` of lmforge's cache folder (``$LMFORGE_CACHE``,
else ``~/.cache/lmforge``, as for Kaggle downloads). An entry is used only when the file's sha256
still matches; a cache that cannot be written is skipped without a word.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import tokenizers

from lmforge.data import tokenizer, tokenizer_kinds
from lmforge.data.folder import TOKENIZER_FILE
from lmforge.data.hub import cache_root

_RECORD = "record.json"


def _key(name: str, inputs: list[Path]) -> str:
    h = hashlib.sha256(f"{name}\0{tokenizers.__version__}\0".encode())
    for path in [Path(tokenizer.__file__), Path(tokenizer_kinds.__file__), *inputs]:  # code, then data
        h.update(path.read_bytes())
    return f"{name}-{h.hexdigest()[:24]}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cached_tokenizer(
    name: str, inputs: list[Path], folder: Path, build: Callable[[Path], tuple[int, int, str]]
) -> tuple[int, int, str]:
    """Put ``name``'s tokenizer.json in ``folder``: (vocabulary size, EOS id, digest).

    ``build(folder)`` writes it and returns those three; its result is kept under a key of ``name``,
    the ``inputs`` files and the code that builds and hashes it, and copied from there next time.
    """
    entry = cache_root() / "tokenizers" / _key(name, inputs)
    try:
        record = json.loads((entry / _RECORD).read_text(encoding="utf-8"))
        if _sha256(entry / TOKENIZER_FILE) == record["file_sha256"]:
            shutil.copyfile(entry / TOKENIZER_FILE, folder / TOKENIZER_FILE)
            return int(record["vocab_size"]), int(record["eos_id"]), str(record["digest"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent or damaged: build it again
    vocab, eos, digest = build(folder)
    _store(entry, folder / TOKENIZER_FILE, vocab, eos, digest)
    return vocab, eos, digest


def _store(entry: Path, source: Path, vocab: int, eos: int, digest: str) -> None:
    """Write the entry into a temporary folder beside it, then rename it into place (best effort)."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
        try:
            shutil.copyfile(source, tmp / TOKENIZER_FILE)
            record = {"file_sha256": _sha256(tmp / TOKENIZER_FILE), "vocab_size": vocab, "eos_id": eos}
            (tmp / _RECORD).write_text(json.dumps({**record, "digest": digest}), encoding="utf-8")
            shutil.rmtree(entry, ignore_errors=True)  # a damaged entry of the same key
            os.rename(tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # left only when the rename did not happen
    except OSError:
        pass  # a read-only or full disk: prepare works the same without the cache
