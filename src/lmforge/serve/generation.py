"""The server's side of continuous batching: one HTTP request's generations, as events on the event loop.

Every generation goes to the LLM's `Scheduler`, whose thread calls back with text pieces and a last
Completion; the callback hands them to this request's asyncio queue (thread-safe, no worker thread held
while waiting), tagged with the choice they belong to. A step of many rows delivers many pieces at once:
they reach the event loop in one wake-up (`_Mailbox`), not one each, and a request's events of one step
come out together (a stream sends them in one write). Leaving the iterator early (a client that left, an
error) cancels every generation of the request, which frees its rows at the scheduler's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from collections.abc import AsyncIterator

from ..api import LLM
from ..generate.chat import TrimmedReply
from ..generate.continuous import PREFILL_TOKENS, QueueFull, Request, check_token_ids
from ..generate.engine import Completion, Piece
from ..generate.logprobs import PromptScorer
from .protocol import RequestError

# Seconds a refused client is told to wait before trying again (429 Retry-After): about one short reply.
RETRY_AFTER = 2


class Generations:
    """Submits a request's generations to the scheduler and streams their events back."""

    def __init__(self, llm: LLM, max_rows: int, max_queue: int, timeout: float | None) -> None:
        self.llm = llm
        self.scheduler = llm.scheduler(max_rows, max_queue)
        self.timeout = timeout
        self.mailbox: _Mailbox | None = None

    async def run(self, jobs: list[tuple[dict, bool]]) -> AsyncIterator[list[tuple[int, str | Completion]]]:
        """(choice, text piece) as they come, and (choice, Completion) when a choice ends, in lists of
        those that arrived together; jobs are (`LLM.request_fields`, trim) pairs. QueueFull is a 429, a
        prompt that does not fit a 400."""
        loop = asyncio.get_running_loop()
        if self.mailbox is None or self.mailbox.loop is not loop:
            self.mailbox = _Mailbox(loop)
        events: asyncio.Queue = asyncio.Queue()
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        room = self.scheduler.max_rows + self.scheduler.max_queue
        if len(jobs) > room:  # could never all be in: no retry would help
            raise RequestError(
                400,
                f"{len(jobs)} generations in one request (n or best_of, times the prompts): this server "
                f"holds at most {room} at once (--max-rows {self.scheduler.max_rows} + --max-queue "
                f"{self.scheduler.max_queue}); ask for fewer",
            )
        reqs: list[Request] = []
        try:
            for i, (fields, _) in enumerate(jobs):
                deliver = _deliverer(self.mailbox, events, i)
                reqs.append(self.scheduler.submit(Request(deliver=deliver, deadline=deadline, **fields)))
        except QueueFull as e:
            _cancel(reqs)
            raise _busy(e, self.scheduler.closed or self.scheduler.refusing) from None
        except ValueError as e:
            _cancel(reqs)
            raise RequestError(400, str(e)) from None
        return self._events(reqs, jobs, events)

    async def score(self, ids: list[int], top: int) -> list[dict]:
        """The logprobs entries of a prompt's own tokens (`PromptScorer`), computed on the scheduler's
        thread between its steps, PREFILL_TOKENS at a time as prompts are prefilled; 400 for ids outside
        the vocabulary."""
        try:
            check_token_ids(ids, self.llm.model.cfg.vocab_size, "prompt")
        except ValueError as e:
            raise RequestError(400, str(e)) from None
        scorer = PromptScorer(self.llm.model, ids, top, self.llm.tokenizer, PREFILL_TOKENS)
        while not scorer.finished:  # a chunk per call: the running rows decode between them
            try:
                future = self.scheduler.call(scorer.step)
            except QueueFull as e:
                raise _busy(e, self.scheduler.closed or self.scheduler.refusing) from None
            await asyncio.wrap_future(future)
        return scorer.entries

    async def _events(
        self, reqs, jobs, events: asyncio.Queue
    ) -> AsyncIterator[list[tuple[int, str | Completion]]]:
        """The events as they come, in batches: those that arrived together (a step delivers a piece of
        each of the request's choices, a choice's last piece and its Completion at once) are one list,
        so that a stream can send them in one write. With logprobs asked for, a piece is a `Piece` with
        the entries of its tokens; those of text trimmed away are only in the Completion."""
        trims = [TrimmedReply() if trim else None for _, trim in jobs]
        pieces: list[list[str]] = [[] for _ in jobs]
        # logprobs entries of tokens whose text the trim holds back: they go with the next piece out
        pending: list[list[dict]] = [[] for _ in jobs]
        left = len(jobs)
        try:
            while left:
                arrived = [await events.get()]
                while not events.empty():
                    arrived.append(events.get_nowait())
                batch: list[tuple[int, str | Completion]] = []
                for i, event in arrived:
                    if isinstance(event, QueueFull):  # the server is stopping: try again (elsewhere)
                        raise _busy(event, True)
                    if isinstance(event, BaseException):
                        raise RequestError(503, f"generation failed: {event}")
                    if isinstance(event, str):
                        entries = getattr(event, "logprobs", None)
                        pending[i] += entries or []
                        piece = trims[i].push(event) if trims[i] is not None else str(event)
                        if piece:
                            pieces[i].append(piece)
                            batch.append((i, piece if entries is None else Piece(piece, pending[i])))
                            pending[i] = []
                    else:
                        left -= 1  # its text is what was streamed: streaming or not gives one text
                        batch.append((i, dataclasses.replace(event, text="".join(pieces[i]))))
                if batch:
                    yield batch
        finally:
            _cancel(reqs)


class _Mailbox:
    """Events from the scheduler's thread for queues on one event loop, handed over in batches: the
    first event of a batch schedules one drain on the loop, the ones that follow before it runs join it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: list[tuple[asyncio.Queue, object]] = []
        self.lock = threading.Lock()

    def put(self, queue: asyncio.Queue, item: object) -> None:
        with self.lock:
            first = not self.items
            self.items.append((queue, item))
        if first:
            # RuntimeError: the event loop is gone (the server is stopping), and nobody is listening.
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self.lock:
            items, self.items = self.items, []
        for queue, item in items:
            queue.put_nowait(item)


def _deliverer(mailbox: _Mailbox, events: asyncio.Queue, choice: int):
    """A callback for the scheduler's thread that puts (choice, event) on this request's queue."""

    def deliver(event: object) -> None:
        mailbox.put(events, (choice, event))

    return deliver


def _busy(e: QueueFull, closing: bool) -> RequestError:
    """429 with Retry-After when the queue is full (503 when the server is shutting down)."""
    return RequestError(
        503 if closing else 429, f"server busy: {e}; retry shortly", {"Retry-After": str(RETRY_AFTER)}
    )


def _cancel(reqs: list[Request]) -> None:
    for req in reqs:
        req.cancel()
