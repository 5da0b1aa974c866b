"""Prepare throughput on builtin:stdlib: MB/s and tokens/s for 1 worker and all cores, next to a
plain single-process encode loop of the same tokenizer.

    PYTHONPATH=src python benchmarks/prepare.py [--workers N] [--repeat 2]

Reported for the pretrained GPT-2 tokenizer and for a byte-level BPE trained on the corpus.
`prepare` numbers are end to end (read, dedup, split, encode, write shards, hashes); the loops
only encode, and so do the "encoding only" rows: prepare's own process pool and chunks without
any reading or writing, the most prepare could reach on this machine. GPT-2's built tokenizer.json is
cached between runs (in a temporary folder, never the user's cache); its rows are also timed with an
empty cache. Print a Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the loops are single-threaded by definition

from lmforge.data import Tokenizer, prepare, train_tokenizer  # noqa: E402
from lmforge.data.encode import CHUNK_CHARS, EncodePool, default_workers  # noqa: E402
from lmforge.data.sources import iter_documents  # noqa: E402
from lmforge.data.tokenizer_kinds import fast_encoder, gpt2_hf  # noqa: E402


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def pool_encode(tok: Tokenizer, spec: str, docs: list[str], workers: int) -> None:
    """prepare's encoding step alone (its pool, its chunks), without reading, splitting or writing:
    what the encoding costs on this machine with ``workers`` processes, the ceiling for prepare."""
    pool = EncodePool(tok, workers, spec)
    try:
        chunk: list[str] = []
        size = 0
        for text in docs:
            chunk.append(text)
            size += len(text)
            if size >= CHUNK_CHARS:
                pool.submit(chunk, None)
                chunk, size = [], 0
        if chunk:
            pool.submit(chunk, None)
        for _ in pool.drain():
            pass
    finally:
        pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=default_workers(), help="the 'all cores' worker count")
    parser.add_argument("--repeat", type=int, default=2, help="best of this many runs")
    parser.add_argument(
        "--copies",
        type=int,
        default=4,
        help="also time GPT-2 prepare on a folder of this many marked copies of the corpus (0: skip)",
    )
    args = parser.parse_args()

    docs = [d.text for d in iter_documents("builtin:stdlib")]
    mb = sum(len(t.encode("utf-8")) for t in docs) / 1e6
    work = Path(tempfile.mkdtemp(prefix="lmforge-bench-"))
    os.environ["LMFORGE_CACHE"] = str(work / "cache")  # never the user's own cache
    bpe = train_tokenizer(docs[:200], kind="bpe", vocab_size=8192)
    bpe_path = bpe.save(work / "bpe")
    gpt2 = Tokenizer(gpt2_hf())
    print(
        f"corpus: builtin:stdlib, {len(docs):,} documents, {mb:.1f} MB; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores"
    )
    print()
    print("| tokenizer | what | seconds | MB/s | tokens/s | vs encode loop |")
    print("|---|---|---|---|---|---|")
    for name, tok, spec in (("gpt2", gpt2, "gpt2"), ("bpe 8192 (trained)", bpe, str(bpe_path))):
        loops = [("`Tokenizer.encode` loop (HF tokenizers)", lambda tok=tok: [tok.encode(t) for t in docs])]
        fast = fast_encoder(spec)
        if fast is not None:
            loops.append(
                (
                    "`encode_ordinary` loop (tiktoken)",
                    lambda fast=fast: [fast.encode_ordinary(t) for t in docs],
                )
            )
        loop_times = {}
        for label, fn in loops:
            seconds = _best(fn, args.repeat)
            loop_times[label] = seconds
        tokens = sum(len(ids) for ids in loops[-1][1]()) + len(docs)
        baseline = min(loop_times.values())  # compare against the faster loop
        for label, seconds in loop_times.items():
            print(
                f"| {name} | {label} | {seconds:.2f} | {mb / seconds:.2f} | {tokens / seconds:,.0f} | "
                f"{baseline / seconds:.2f}x |"
            )
        for workers in sorted({1, args.workers}):
            seconds = _best(
                lambda workers=workers, tok=tok, spec=spec: pool_encode(tok, spec, docs, workers), args.repeat
            )
            print(
                f"| {name} | encoding only, prepare's pool, {workers} process(es) | {seconds:.2f} | {mb / seconds:.2f} | "
                f"{tokens / seconds:,.0f} | {baseline / seconds:.2f}x |"
            )
        # GPT-2's built tokenizer.json is cached between runs (the first run of a best-of-N fills
        # the cache): also timed with an empty cache, as on a machine's very first prepare.
        colds = (False, True) if spec == "gpt2" else (False,)
        for workers, cold in [(w, c) for w in sorted({1, args.workers}) for c in colds]:
            out = work / f"out-{workers}"

            def run(out=out, workers=workers, spec=spec, cold=cold) -> None:
                if cold:  # an empty cache every time
                    shutil.rmtree(work / "cache", ignore_errors=True)
                shutil.rmtree(out, ignore_errors=True)
                prepare(["builtin:stdlib"], out, tokenizer=spec, workers=workers, val_fraction=0.01)

            seconds = _best(run, args.repeat)
            note = ", empty tokenizer cache" if cold else ""
            print(
                f"| {name} | `prepare --workers {workers}` (end to end{note}) | {seconds:.2f} | "
                f"{mb / seconds:.2f} | {tokens / seconds:,.0f} | {baseline / seconds:.2f}x |"
            )
    if args.copies:
        # A larger corpus, where prepare's fixed costs (tokenizer files, digest, start of the pool)
        # weigh less: every copy's documents start with a line naming the copy, so none is a duplicate.
        big = work / "copies"
        for k in range(args.copies):
            for i, text in enumerate(docs):
                path = big / f"copy{k}" / f"doc{i:04d}.txt"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(f"# copy {k}\n{text}", encoding="utf-8")
        big_mb = sum(p.stat().st_size for p in big.rglob("*.txt")) / 1e6

        def run_big() -> None:
            shutil.rmtree(work / "out-big", ignore_errors=True)
            prepare([str(big)], work / "out-big", tokenizer="gpt2", workers=args.workers, val_fraction=0.01)

        seconds = _best(run_big, args.repeat)
        print(
            f"| gpt2 | `prepare --workers {args.workers}` on {args.copies} copies ({big_mb:.1f} MB, end to end) | "
            f"{seconds:.2f} | {big_mb / seconds:.2f} | - | - |"
        )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
