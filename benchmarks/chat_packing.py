"""How full the packed windows of `prepare --chat` are on builtin:stdlib-chat: the share of window tokens
that are conversation tokens (the rest is padding), next to packing the conversations in stream order.

    PYTHONPATH=src python benchmarks/chat_packing.py --tokenizer DIR/tokenizer.json [--seq-len 256]

The tokenizer is the base model's: a byte-level BPE of 8,192 ids trained on builtin:stdlib (`lmforge prepare
--source builtin:stdlib --out DIR --vocab-size 8192`; `make quickstart`'s has 4,096). Without --tokenizer
one is trained first (--vocab-size, default 8192), in a temporary folder (a minute or two). The fill is
`prepare --chat`'s own, end to end; "in order" packs the same conversations one after another, opening a
new window whenever the next one does not fit. Prints a Markdown row for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import tokenizers

from lmforge.data import prepare, prepare_chat
from lmforge.data.chat_template import ChatTemplate, with_chat_tokens
from lmforge.data.stdlib_chat import iter_stdlib_chat
from lmforge.data.tokenizer import Tokenizer


def in_order_fill(lengths: list[int], width: int) -> float:
    """Fill of windows packed in stream order (next fit); a conversation longer than a window fills one."""
    windows, room = 0, 0
    for length in lengths:
        need = min(length, width)
        if need > room:
            windows, room = windows + 1, width
        room -= need
    return sum(min(n, width) for n in lengths) / (windows * width)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", help="the base tokenizer.json (default: train one on builtin:stdlib)")
    parser.add_argument(
        "--vocab-size", type=int, default=8192, help="of the tokenizer trained without --tokenizer"
    )
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = args.tokenizer
        if tokenizer is None:
            prepare(["builtin:stdlib"], Path(tmp) / "base", vocab_size=args.vocab_size, progress=print)
            tokenizer = str(Path(tmp) / "base" / "tokenizer.json")
        start = time.perf_counter()
        meta = prepare_chat(
            ["builtin:stdlib-chat"], Path(tmp) / "sft", tokenizer, seq_len=args.seq_len, workers=args.workers
        )
        seconds = time.perf_counter() - start
        template = ChatTemplate(with_chat_tokens(Tokenizer.load(tokenizer)))
    lengths = [len(template.render(messages)[0]) for _, messages in iter_stdlib_chat(None)]
    width = args.seq_len + 1
    packed, train, val = meta["packing"], meta["splits"]["train"], meta["splits"]["val"]
    fits = sum(n <= width for n in lengths) / len(lengths)
    print(
        f"{packed['conversations']:,} conversations ({fits:.1%} fit a window of {width} tokens, "
        f"{packed['cut']} cut) in {packed['windows']:,} windows: fill {packed['fill']:.2%} "
        f"(train {train['fill']:.2%}, val {val['fill']:.2%}); in stream order {in_order_fill(lengths, width):.2%}; "
        f"prepare --chat {seconds:.1f} s"
    )
    print(
        f"| {platform.processor() or platform.machine()} | Python {platform.python_version()}, tokenizers "
        f"{tokenizers.__version__} | {width} | {packed['conversations']:,} | {fits:.1%} | {packed['windows']:,} | "
        f"{packed['fill']:.2%} | {in_order_fill(lengths, width):.2%} |"
    )


if __name__ == "__main__":
    main()
