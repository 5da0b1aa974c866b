"""Data preparation and loading: sources -> tokenizer -> token shards -> training batches."""

from lmforge.data.errors import DataError
from lmforge.data.loader import TokenLoader, iter_eval_batches
from lmforge.data.prepare import FORMAT_VERSION, load_meta, prepare
from lmforge.data.shards import ShardWriter, TokenShards, dtype_for_vocab
from lmforge.data.sources import Document, iter_documents
from lmforge.data.tokenizer import EOS_TOKEN, Tokenizer, train_tokenizer

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
