"""Data preparation and loading: sources -> tokenizer -> token shards -> training batches.

Importing the package loads only DataError and the data folder's format (folder.py). The rest is imported
on first use of its name: the preparation pipeline, the sources, the tokenizers and numpy, and torch for
the loader, so a command that only reads a data folder's meta.json (or `lmforge --help`) pays for none.
"""

import importlib
import sys
import types
from typing import TYPE_CHECKING

from lmforge.data.errors import DataError
from lmforge.data.folder import FORMAT_VERSION, load_meta

if TYPE_CHECKING:  # imported on first use at run time (see __getattr__)
    from lmforge.data.chat_prepare import prepare_chat
    from lmforge.data.files import Document
    from lmforge.data.loader import TokenLoader, iter_eval_batches
    from lmforge.data.prepare import prepare
    from lmforge.data.shards import ShardWriter, TokenShards, dtype_for_vocab
    from lmforge.data.sources import iter_documents
    from lmforge.data.tokenizer import EOS_TOKEN, Tokenizer, train_tokenizer

_LAZY = {
    "lmforge.data.chat_prepare": ("prepare_chat",),
    "lmforge.data.loader": ("TokenLoader", "iter_eval_batches"),
    "lmforge.data.prepare": ("prepare",),
    "lmforge.data.shards": ("ShardWriter", "TokenShards", "dtype_for_vocab"),
    "lmforge.data.files": ("Document",),
    "lmforge.data.sources": ("iter_documents",),
    "lmforge.data.tokenizer": ("EOS_TOKEN", "Tokenizer", "train_tokenizer"),
}
_HOME = {name: module for module, names in _LAZY.items() for name in names}

__all__ = [
    "EOS_TOKEN",
    "FORMAT_VERSION",
    "DataError",
    "Document",
    "ShardWriter",
    "TokenLoader",
    "TokenShards",
    "Tokenizer",
    "dtype_for_vocab",
    "iter_documents",
    "iter_eval_batches",
    "load_meta",
    "prepare",
    "prepare_chat",
    "train_tokenizer",
]


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # Importing the submodule lmforge.data.prepare makes Python set this package's attribute `prepare`
        # to that module, which would hide the function of the same name the package exports.
        if name == "prepare" and isinstance(value, types.ModuleType):
            value = value.prepare
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
