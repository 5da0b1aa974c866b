"""Data preparation and loading: sources -> tokenizer -> token shards -> training batches.

The loader (which needs torch) is imported on first use, so `lmforge prepare` starts without torch.
"""

from typing import TYPE_CHECKING

from lmforge.data.errors import DataError
from lmforge.data.prepare import FORMAT_VERSION, load_meta, prepare
from lmforge.data.shards import ShardWriter, TokenShards, dtype_for_vocab
from lmforge.data.sources import Document, iter_documents
from lmforge.data.tokenizer import EOS_TOKEN, Tokenizer, train_tokenizer

if TYPE_CHECKING:  # imported on first use at run time (see __getattr__)
    from lmforge.data.loader import TokenLoader, iter_eval_batches

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
    "train_tokenizer",
]


def __getattr__(name: str):
    if name in ("TokenLoader", "iter_eval_batches"):
        from lmforge.data import loader

        value = getattr(loader, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
