"""Parallel tokenization: chunks of documents go to a process pool and come back in order.

The main process reads documents and cuts the stream into chunks whose boundaries depend
only on the documents, never on the worker count; workers encode chunks; results are
written in submission order. So the shards are byte-identical for any ``--workers``, and
at most ``2 x workers`` chunks are in memory at a time, whatever the size of the corpus.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from lmforge.data.pretoken_cache import CachedEncoder
from lmforge.data.tokenizer import Tokenizer
from lmforge.data.tokenizer_kinds import fast_encoder

# Long documents are cut into pieces of about this many characters before encoding, so a
# single huge .txt file is still spread over the batch and never held as one giant list.
_PIECE_CHARS = 100_000
# Text per task: large enough that pickling and scheduling cost little next to encoding,
# small enough that 2 x workers chunks in flight stay at tens of MB.
CHUNK_CHARS = 500_000
CHUNK_DOCS = 2048
# Chunks in flight per worker: one being encoded, one queued so no worker waits.
_IN_FLIGHT_PER_WORKER = 2
T = TypeVar("T")
# A pool's own work on a chunk instead of encoding it (rendering conversations, say): a module-level
# function, so that a spawned worker can find it, of (tokenizer, texts) -> arrays.
Task = Callable[[Tokenizer, list[str]], tuple[np.ndarray, ...]]

_worker_tok: Tokenizer | None = None
_worker_fast: CachedEncoder | None = None  # tiktoken with the same ids, when it exists


def _cut_point(text: str, start: int, end: int) -> int:
    """Where to end the piece text[start:...], at most at ``end``."""
    # Best: just before a newline that follows a non-space character. The byte-level
    # pre-tokenizer (GPT-2 regex) always has a pre-token boundary there and matches on
    # either side never look across it, and BPE merges never cross pre-tokens, so the
    # pieces encode to exactly the ids of the whole document.
    low = start + (end - start) // 2
    pos = end
    while (i := text.rfind("\n", low, pos)) > start:
        if not text[i - 1].isspace():
            return i
        pos = i
    i = text.rfind("\n", low, end)
    return i + 1 if i >= 0 else end


def pieces(text: str) -> list[str]:
    """Cut text into pieces of at most _PIECE_CHARS characters, at token-preserving points if possible."""
    out = []
    start = 0
    while len(text) - start > _PIECE_CHARS:
        end = _cut_point(text, start, start + _PIECE_CHARS)
        out.append(text[start:end])
        start = end
    out.append(text[start:])
    return out


def _cached_encoder(spec: str | None) -> CachedEncoder | None:
    encoding = None if spec is None else fast_encoder(spec)
    return None if encoding is None else CachedEncoder(encoding)


def encode_texts(
    tok: Tokenizer | None, texts: list[str], fast: CachedEncoder | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens per text, all ids concatenated as uint32) for a chunk of documents."""
    all_pieces: list[str] = []
    counts = []
    for text in texts:
        parts = pieces(text)
        counts.append(len(parts))
        all_pieces.extend(parts)
    if fast is not None:
        # No special tokens allowed or disallowed: a literal "<|endoftext|>" in a document is
        # plain text, exactly as with tok.
        piece_lengths, flat = fast.encode_batch(all_pieces)
    else:
        assert tok is not None, "encode_texts needs a tokenizer or a tiktoken encoding"
        arrays = [np.asarray(ids, dtype=np.uint32) for ids in tok.encode_batch(all_pieces)]
        piece_lengths = np.array([a.size for a in arrays], dtype=np.int64)
        flat = np.concatenate(arrays) if arrays else np.empty(0, dtype=np.uint32)
    piece_ends = np.concatenate([[0], np.cumsum(piece_lengths)])
    # Tokens per document: the end of its last piece minus the end of the previous document's.
    lengths = np.diff(piece_ends[np.concatenate([[0], np.cumsum(counts)])])
    return lengths, flat


def _exit_with_parent(parent: int, interval_s: float = 0.5) -> None:
    """End this worker soon after the process that started the pool dies.

    A pool worker waits on its task queue for ever; if prepare is killed (SIGKILL, the OOM killer),
    nothing closes that queue, and the orphaned workers would keep their memory until reboot.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        os._exit(1)

    threading.Thread(target=watch, name="lmforge-parent-watch", daemon=True).start()


def _init_worker(forked: bool, tok_json: str | None, fast_spec: str | None, parent: int) -> None:
    global _worker_tok, _worker_fast
    _exit_with_parent(parent)
    # Ctrl-C reaches the whole process group; the parent handles it and stops the pool, so a
    # worker should not die mid-chunk with a traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if forked:
        return  # inherited from the parent, nothing to rebuild
    _worker_tok = None if tok_json is None else Tokenizer(HFTokenizer.from_str(tok_json))
    _worker_fast = _cached_encoder(fast_spec)


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    assert _worker_tok is not None or _worker_fast is not None, "worker not initialised"
    return encode_texts(_worker_tok, texts, _worker_fast)


def _task_in_worker(task: Task, texts: list[str]) -> tuple[np.ndarray, ...]:
    assert _worker_tok is not None, "worker not initialised"
    return task(_worker_tok, texts)


@contextmanager
def serial_tokenizers() -> Iterator[None]:
    """Keep the Rust tokenizer single-threaded: the pool is the parallelism, and forked workers
    must not inherit a thread pool (tokenizers would warn and disable it anyway)."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def default_workers() -> int:
    """All cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _fork_workers_frozen(pool: ProcessPoolExecutor) -> None:
    """Fork the pool's workers now, with every existing object kept away from their garbage collector.

    A forked worker holds copies of all the parent's objects but none of its other threads. If the
    worker's collector freed one whose destructor needs those threads (a torch.distributed process
    group left in a reference cycle by an earlier training run in the same process, for one), the
    worker would hang or die. Collecting first frees such cycles in the parent, where destructors
    work; freezing keeps the workers' collectors off whatever the parent still holds.
    """
    gc.collect()
    frozen_before = gc.get_freeze_count() > 0  # a caller's own freeze (for its forks) is left alone
    gc.freeze()
    try:
        pool.submit(int).result()  # with fork, the pool starts all its workers at the first task
    finally:
        if not frozen_before:
            gc.unfreeze()


class EncodePool:
    """Ordered map of chunks -> (lengths, ids) over ``workers`` processes (1: in this process); with a
    ``task``, chunks -> whatever ``task(tokenizer, texts)`` returns."""

    def __init__(
        self, tok: Tokenizer | None, workers: int, fast_spec: str | None = None, task: Task | None = None
    ) -> None:
        self.tok = tok
        self.workers = workers
        self.task = task
        if task is not None and tok is None:
            raise ValueError("EncodePool needs a tokenizer for its task")
        # Built here once: forked workers inherit it; spawned ones rebuild it from the spec.
        self.fast = _cached_encoder(fast_spec)
        fast_spec = fast_spec if self.fast is not None else None
        if tok is None and self.fast is None:
            raise ValueError(f"EncodePool needs a tokenizer: {fast_spec!r} has no tiktoken encoding")
        self._pool: ProcessPoolExecutor | None = None
        self._pending: deque[tuple[object, Future | tuple[np.ndarray, ...]]] = deque()
        if workers > 1:
            # fork: workers start in milliseconds and inherit the loaded tokenizers through
            # these globals; spawn would start new interpreters that re-read the vocabulary.
            # Elsewhere the platform default is used and workers rebuild them.
            global _worker_tok, _worker_fast
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
            if method == "fork":
                _worker_tok, _worker_fast = tok, self.fast
            self._pool = ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context(method),
                initializer=_init_worker,
                # Forked workers inherit the tokenizers; only spawned ones need the JSON.
                initargs=(
                    method == "fork",
                    None if method == "fork" or tok is None else tok.hf.to_str(),
                    fast_spec,
                    os.getpid(),
                ),
            )
            if method == "fork":
                try:
                    _fork_workers_frozen(self._pool)
                except BaseException:
                    self.close()
                    raise

    def fast_vocab(self) -> tuple[int, int]:
        """(vocabulary size, EOS id) of the tiktoken encoding."""
        assert self.fast is not None, "no tiktoken encoding"
        return self.fast.encoding.n_vocab, self.fast.encoding.eot_token

    def call(self, fn: Callable[..., T], *args: object) -> Future[T]:
        """Run ``fn(*args)`` in a worker (here, with one worker) and return its future; it runs before
        the chunks submitted after it."""
        if self._pool is not None:
            return self._pool.submit(fn, *args)
        future: Future[T] = Future()
        try:
            future.set_result(fn(*args))
        except Exception as exc:
            future.set_exception(exc)
        return future

    def submit(self, texts: list[str], tag: object) -> list[tuple]:
        """Queue a chunk; return the finished chunks (oldest first) that no longer fit in flight, each
        (tag, lengths, ids), or (tag, *what the task returned)."""
        if self._pool is None:
            local = (
                encode_texts(self.tok, texts, self.fast) if self.task is None else self.task(self.tok, texts)
            )
            self._pending.append((tag, local))
        elif self.task is None:
            self._pending.append((tag, self._pool.submit(_encode_in_worker, texts)))
        else:
            self._pending.append((tag, self._pool.submit(_task_in_worker, self.task, texts)))
        done = []
        while len(self._pending) > _IN_FLIGHT_PER_WORKER * self.workers - 1:
            done.append(self._pop())
        return done

    def drain(self) -> Iterator[tuple]:
        """Yield every chunk still in flight, in order."""
        while self._pending:
            yield self._pop()

    def _pop(self) -> tuple:
        tag, result = self._pending.popleft()
        return (tag, *(result.result() if isinstance(result, Future) else result))

    def close(self) -> None:
        """Stop the workers; pending chunks are dropped."""
        global _worker_tok, _worker_fast
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        _worker_tok = _worker_fast = None


class ProgressBar:
    """A live line on the console: documents, documents/s, MB, MB/s and tokens."""

    def __init__(self, console) -> None:
        self._start = time.perf_counter()
        self._progress = None
        if console is not None:
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            )
            self._task = self._progress.add_task("tokenizing", total=None)
            self._progress.start()

    def update(self, documents: int, nbytes: int, tokens: int) -> None:
        """Show the totals so far and their rates."""
        if self._progress is None:
            return
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        self._progress.update(
            self._task,
            description=(
                f"{documents:,} docs ({documents / elapsed:,.0f}/s)  {nbytes / 1e6:,.1f} MB "
                f"({nbytes / 1e6 / elapsed:,.1f} MB/s)  {tokens:,} tokens"
            ),
        )

    def close(self) -> None:
        """Remove the bar."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
