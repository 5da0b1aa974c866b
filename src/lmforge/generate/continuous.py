"""Continuous batching: requests that arrive while others generate join the running batch at the next
step and leave it when they finish, each with its own sampling settings, stops and length.

One thread owns the model and loops: take waiting requests into free rows, run one forward in which
every running row decodes a token and every new row prefills its prompt (`step.step_rows`: every
row keeps its own positions in its own cache row, so rows never wait for each other, and a prompt that
joins rides on the running rows' pass over the weights instead of a forward of its own; one whose start
some row's cache already holds prefills only the rest, `_held_start`; a step prefills at most
PREFILL_TOKENS prompt tokens, so a long prompt goes in a part per step while the running rows keep
decoding), sample each row with its own settings and generator, hand each request its new text, and drop
finished or cancelled rows; after a step that freed rows, wait up to one step's time for requests to
take them before the next (`_hold`). Active rows are kept in rows 0..n-1 (a finished row is replaced by the last
one; a prompt still part-way is always the last), so a step costs what a batch of n costs, and one
request alone decodes as fast as it would without the scheduler.

Requests talk to the loop through `Request.deliver` (called on the loop's thread with text pieces, then
the final `Completion`, or an exception; with logprobs asked for, a piece is a `Piece` carrying the
entries of the tokens drawn since the one before, and the Completion has them all) and
`Request.cancel()` (the row is dropped at the next step). The server wraps deliver to hand events to its event loop; `Scheduler.run_sync` collects them for
callers on plain threads. A bounded wait queue refuses work it could not start soon (`QueueFull`).
Other work on the model (scoring a prompt) goes through `Scheduler.call`, which runs it on the loop's
thread between two steps.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..device import one_intra_op_thread
from ..model import GPT
from .engine import Completion, Piece, TextStream
from .layout import pack_for_decoding
from .logprobs import token_logprobs
from .sampling import SamplingParams, sample_rows
from .step import step_rows

# The most prompt tokens one step prefills beside its running rows: a burst of short prompts joins in
# one forward, and a long prompt is prefilled a part per step (chunked prefill), so the running rows
# get a token in every one of those steps instead of waiting for the whole prompt. Measured on 2 CPU
# cores (gpt2-124m, 4 rows decoding, a 1,000-token prompt joins; benchmarks/long_prompt.py): the
# running rows' longest wait for a token 1.4 s whole, 0.65 s at 512, 0.36 s at 256, 0.2 s at 128; the
# long prompt's first token as soon at 256 as whole, 6-10% later at 128.
PREFILL_TOKENS = 256

# After a step that frees rows, the loop waits up to one step's time (or `Scheduler(hold=...)` seconds)
# for requests to take them, then starts the next step: a client that sends its next request as soon
# as its reply ends (an evaluation harness, a batch job, an agent) reaches the server a millisecond or
# two after the step that ended the reply, and without the wait it would find the next step under way
# and wait out all of it before its prompt could join. The wait ends as soon as every freed row has a
# request, or once HOLD_GAP of the wait has passed since the last request came (clients that ended in the
# same step come back a fraction of a millisecond apart, as the event loop reads them one by one; a
# request should not wait out the whole limit for rows nobody is coming back to). It costs the rows
# still decoding that wait, so it is kept up only while it pays: once fewer than HOLD_MET of the recent
# waits (an average over about the last five) saw a request arrive, the loop waits only at every
# HOLD_PROBE-th freeing, to notice when clients start coming straight back again.
# Measured on 2 CPU cores (benchmarks/serve.py, 8 back-to-back clients, the median over runs): time to
# first token under load 1.7x the idle value instead of 2.2x (2.0x instead of 2.8x with distinct prompts);
# see benchmarks/RESULTS.md.
HOLD_MET = 0.5
HOLD_PROBE = 8
HOLD_GAP = 0.25


# Schedulers whose thread may still run, stopped at exit (`_close_all`).
_open: weakref.WeakSet[Scheduler] = weakref.WeakSet()


class QueueFull(RuntimeError):
    """Every row is busy and the wait queue is full: try again later."""


@dataclass(eq=False)
class Request:
    """One generation: prompt ids in, text pieces and a Completion out through deliver()."""

    prompt_ids: list[int]
    max_new_tokens: int
    params: SamplingParams
    deliver: Callable[[object], None]
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_ids: Sequence[int] = ()  # tokens that end the generation and are not part of its text
    banned_ids: Sequence[int] = ()  # tokens never sampled (a chat template's role tokens)
    logit_bias: dict[int, float] | None = None  # added to these tokens' logits before every draw
    logprobs: int | None = None  # None: none; k >= 0: each token's log-probability and the top k
    deadline: float | None = None  # time.monotonic() past which the generation ends ("length")
    _cancelled: bool = field(default=False, repr=False)

    def cancel(self) -> None:
        """Stop generating (a client that left); the loop drops the row at its next step."""
        self._cancelled = True


class _Row:
    """A request's state while it occupies a row of the batch."""

    def __init__(self, req: Request, decode: Callable[[list[int]], str], vocab: int, device) -> None:
        self.req = req
        self.stream = TextStream(decode, req.stop)
        self.generated: list[int] = []
        self.logprobs: list[dict] = []
        self.handed = 0  # logprobs entries handed out with pieces
        self.pos = len(req.prompt_ids)  # the position of the next token fed in
        self.generator = None
        if req.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(req.seed)
        self.seen = None
        if req.params.repetition_penalty != 1.0:
            self.seen = torch.zeros((1, vocab), dtype=torch.bool, device=device)
            self.seen[0, req.prompt_ids] = True
        self.counts = None  # how many times the row generated each token (frequency/presence penalty)
        if req.params.counts_tokens:
            self.counts = torch.zeros((1, vocab), dtype=torch.float32, device=device)
        self.banned_key = tuple(sorted(set(req.banned_ids)))
        self.banned = torch.tensor(self.banned_key, dtype=torch.long, device=device)
        self.bias = None  # (ids, values): the request's logit bias
        if req.logit_bias:
            ids, values = zip(*sorted(req.logit_bias.items()), strict=True)
            self.bias = (torch.tensor(ids, device=device), torch.tensor(values, device=device))
        self.stop_ids = set(req.stop_ids)
        # Prompt tokens whose keys and values the row's cache holds: the start some row held when it
        # started (`_held_start`), then what each step prefilled; chunk: what this step prefills.
        self.start = 0
        self.chunk = 0

    def piece(self, text: str) -> str:
        """A text piece to hand out: with logprobs asked for, a Piece with the entries not yet handed out."""
        if self.req.logprobs is None:
            return text
        entries, self.handed = self.logprobs[self.handed :], len(self.logprobs)
        return Piece(text, entries)

    @property
    def prefilling(self) -> bool:
        """Part of the prompt is still to prefill (the row draws no token yet)."""
        return self.start < len(self.req.prompt_ids)

    def cached(self) -> list[int]:
        """The tokens whose keys and values are in this row's cache slots 0, 1, ...."""
        if self.prefilling:
            return self.req.prompt_ids[: self.start]
        return self.req.prompt_ids + self.generated[: self.pos - len(self.req.prompt_ids)]


class Scheduler:
    """Decodes up to max_rows requests together on one thread; see the module docstring."""

    def __init__(
        self,
        model: GPT,
        tokenizer,
        max_rows: int = 8,
        max_queue: int = 64,
        lock: threading.Lock | None = None,
        threads: int | None = None,
        hold: float | None = None,
    ) -> None:
        if max_rows < 1 or max_queue < 0:
            raise ValueError(f"max_rows={max_rows} must be >= 1 and max_queue={max_queue} >= 0")
        if hold is not None and not 0 <= hold <= 60:
            raise ValueError(f"hold={hold}: give seconds from 0 to 60, or None (one step's time)")
        self.model, self.tokenizer = model, tokenizer
        self.max_rows, self.max_queue = max_rows, max_queue
        self.lock = lock or threading.Lock()  # held while the model computes (other users may share it)
        cfg, p = model.cfg, model.wte.weight
        self.context = cfg.context_len
        # Zeroed: attention reads whole rows under a mask, and 0 * NaN from never-written memory is NaN.
        shape = (cfg.n_layer, max_rows, cfg.n_kv_head, self.context, cfg.head_dim)
        with one_intra_op_thread():  # set-up on the caller's thread starts no OpenMP team there
            self.k = torch.zeros(shape, dtype=p.dtype, device=p.device)
            self.v = torch.zeros(shape, dtype=p.dtype, device=p.device)
            pack_for_decoding(model, max_rows)
        self.rows: list[_Row] = []
        # What each free row's cache still holds (the tokens of its last occupant's keys and values): a
        # new prompt that starts the same way takes the row and prefills only the rest.
        self.held: list[list[int]] = [[] for _ in range(max_rows)]
        self.waiting: deque[Request] = deque()
        self.calls: list[tuple[Callable[[], object], concurrent.futures.Future]] = []  # see call()
        self.wake = threading.Condition()
        self.closed = False
        self.refusing = False  # refuse_waiting() was called: the server is stopping
        self.steps = 0  # steps taken (tests read it)
        # The wait for requests after a step that freed rows (see HOLD_MET): its longest (None: the
        # recent steps' mean time), how many freeings there were, how many waits, and how often recent
        # waits saw a request arrive.
        self.hold = hold
        self.step_s = 0.0
        self.freeings = self.holds = 0
        self.holds_met = 1.0
        self.threads = threads  # the decode thread's torch.set_num_threads; None: as torch defaults
        self.thread = threading.Thread(target=self._loop, name="lmforge-decode", daemon=True)
        self.thread.start()
        _open.add(self)

    # ---- the callers' side -------------------------------------------------------------------------
    def submit(self, req: Request) -> Request:
        """Queue a request; QueueFull when every row is busy and max_queue requests already wait."""
        if not req.prompt_ids or len(req.prompt_ids) >= self.context:
            raise ValueError(
                f"prompt of {len(req.prompt_ids)} tokens: give 1 to {self.context - 1} (the context is "
                f"{self.context})"
            )
        vocab = self.model.cfg.vocab_size
        check_token_ids(req.prompt_ids, vocab, "prompt")
        check_token_ids(req.logit_bias or (), vocab, "logit_bias")
        with self.wake:
            if self.closed or self.refusing:
                raise QueueFull("the server is shutting down")
            if len(self.rows) + len(self.waiting) >= self.max_rows + self.max_queue:
                self._forget_cancelled()  # a request its client gave up frees its place at once
            if len(self.rows) + len(self.waiting) >= self.max_rows + self.max_queue:
                raise QueueFull(f"{len(self.rows)} requests are generating and {len(self.waiting)} wait")
            self.waiting.append(req)
            self.wake.notify()
        return req

    @property
    def load(self) -> tuple[int, int]:
        """(requests generating, requests waiting)."""
        with self.wake:
            self._forget_cancelled()
            return len(self.rows), len(self.waiting)

    def _forget_cancelled(self) -> None:
        """Drop the waiting requests that were cancelled (holding self.wake)."""
        if any(req._cancelled for req in self.waiting):
            live = [req for req in self.waiting if not req._cancelled]
            self.waiting.clear()
            self.waiting.extend(live)

    def refuse_waiting(self) -> None:
        """Take no more requests (QueueFull) and fail those still waiting for a row with QueueFull; the
        running rows go on until close()."""
        with self.wake:
            self.refusing = True
            waiting, self.waiting = list(self.waiting), deque()
        error = QueueFull("the server is shutting down")
        for req in waiting:
            if not req._cancelled:
                req.deliver(error)

    def close(self) -> None:
        """Stop the loop after its current step; waiting and active requests get a RuntimeError."""
        with self.wake:
            self.closed = True
            self.wake.notify()
        self.thread.join(timeout=10)
        _open.discard(self)

    def call(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run fn() on the loop's thread between two steps, holding the lock, and return a future of its
        result: other work on the model (scoring a prompt) runs where the model's intra-op threads are
        set up, instead of starting a second team of them on another thread. QueueFull when as many calls
        wait as requests may (max_rows + max_queue)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.wake:
            if self.closed:
                raise QueueFull("the server is shutting down")
            if len(self.calls) >= self.max_rows + self.max_queue:
                raise QueueFull(f"{len(self.calls)} prompts wait to be scored")
            self.calls.append((fn, future))
            self.wake.notify()
        return future

    def run_sync(self, req_fields: dict) -> Iterator[str | Completion]:
        """Submit a request and yield its pieces, then its Completion, on the caller's thread; closing
        the iterator early cancels the request."""
        events: queue.Queue = queue.Queue()
        req = self.submit(Request(deliver=events.put, **req_fields))
        try:
            while True:
                event = events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, Completion):
                    return
        finally:
            req.cancel()

    # ---- the loop ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        while True:
            with self.wake:
                while not self.closed and not self.rows and not self.waiting and not self.calls:
                    self.wake.wait()
                if self.closed:
                    break
                calls, self.calls = self.calls, []
                # Rows 0..running-1 decode; the others prefill (a prompt not done in the last step
                # first, then new ones): only the last row is ever left part-way through its prompt.
                running = sum(not row.prefilling for row in self.rows)
                self._take_waiting(running)
            for fn, future in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        with self.lock:
                            future.set_result(fn())
                    except Exception as exc:  # noqa: BLE001 - the caller gets it
                        future.set_exception(exc)
            if not self.rows:  # only calls, or every waiting request was cancelled
                continue
            before = len(self.rows)
            try:
                with self.lock:
                    began = time.perf_counter()  # a wait for the lock (other users of the model) is no step
                    logits = self._step(running)
                self._emit(logits)
            except Exception as exc:  # noqa: BLE001 - a failed step fails its requests, not the server
                for row in self.rows:
                    row.req.deliver(exc)
                self.rows = []
                self.held = [[] for _ in range(self.max_rows)]  # a step cut short leaves any cache
            if self.steps > 1:  # the first step warms up (allocations, kernels) and says little
                took = time.perf_counter() - began
                self.step_s = took if not self.step_s else 0.9 * self.step_s + 0.1 * took
            if len(self.rows) < before:
                self._hold(before)
        error = QueueFull("the server is shutting down")
        for row in self.rows:
            row.req.deliver(error)
        for req in self.waiting:
            req.deliver(error)
        for _, future in self.calls:
            if future.set_running_or_notify_cancel():
                future.set_exception(error)

    def _hold(self, before: int) -> None:
        """After a step that left fewer than `before` rows, wait until requests (waiting or arriving) fill
        them again, for at most one step's time; only while recent waits paid (see HOLD_MET)."""
        self.freeings += 1
        if self.holds_met < HOLD_MET and self.freeings % HOLD_PROBE:
            return
        limit = self.step_s if self.hold is None else self.hold
        end = time.monotonic() + limit
        with self.wake:
            waited = seen = len(self.waiting)
            if self.closed or self.calls or len(self.rows) + waited >= before:
                return
            while not self.closed and not self.calls and len(self.rows) + len(self.waiting) < before:
                now = time.monotonic()
                if len(self.waiting) > seen:  # one came: the others of its wave come close behind it
                    seen, end = len(self.waiting), min(end, now + limit * HOLD_GAP)
                if now >= end:
                    break
                self.wake.wait(end - now)
            met = len(self.waiting) > waited
        self.holds += 1
        self.holds_met = 0.8 * self.holds_met + 0.2 * met

    def _take_waiting(self, running: int) -> None:
        """Share this step's PREFILL_TOKENS among the prompts to prefill, in order: a prompt the last step
        left part-way, then waiting requests, taken into free rows (after the running ones) while
        tokens are left, each with the start of its prompt some row holds (`_held_start`). The last
        prompt gets what is left, which may be part of it."""
        budget = PREFILL_TOKENS
        for row in self.rows[running:]:
            row.chunk = min(len(row.req.prompt_ids) - row.start, budget)
            budget -= row.chunk
        device, vocab = self.k.device, self.model.cfg.vocab_size
        while self.waiting and len(self.rows) < self.max_rows and (budget or self.waiting[0]._cancelled):
            req, i = self.waiting[0], len(self.rows)
            self.waiting.popleft()
            if req._cancelled:
                continue
            try:
                row = _Row(req, self.tokenizer.decode, vocab, device)
            except Exception as exc:  # noqa: BLE001 - a request the loop cannot start fails alone
                req.deliver(exc)
                continue
            start, source = self._held_start(req.prompt_ids, i)
            self.rows.append(row)
            if start and source != i:
                self.k[:, i, :, :start] = self.k[:, source, :, :start]
                self.v[:, i, :, :start] = self.v[:, source, :, :start]
            row.start, row.chunk = start, min(len(req.prompt_ids) - start, budget)
            budget -= row.chunk
            self.held[i] = []  # in use: what it holds is the row's own

    @torch.no_grad()
    def _step(self, running: int) -> torch.Tensor:
        """Logits (rows, vocab): rows 0..running-1 after feeding in the token each sampled last, the
        others after this step's part of their prompt (the first new token's once the prompt is in)."""
        device = self.k.device
        old, new = self.rows[:running], self.rows[running:]
        idx = torch.tensor([row.generated[-1] for row in old], dtype=torch.long, device=device)
        positions = torch.tensor([row.pos for row in old], dtype=torch.long, device=device)
        prompts = [
            torch.tensor(
                row.req.prompt_ids[row.start : row.start + row.chunk], dtype=torch.long, device=device
            )
            for row in new
        ]
        length = max([row.pos + 1 for row in old] + [row.start + row.chunk for row in new])  # slots to attend
        n = len(self.rows)
        k_layers = tuple(self.k[:, :n, :, :length].unbind(0))
        v_layers = tuple(self.v[:, :n, :, :length].unbind(0))
        logits = step_rows(
            self.model, idx, positions, prompts, k_layers, v_layers, [row.start for row in new]
        )
        for row in old:
            row.pos += 1
        for row in new:
            row.start += row.chunk
        self.steps += 1
        return logits

    def _held_start(self, prompt: list[int], i: int) -> tuple[int, int]:
        """(n, row): the longest start of a prompt about to take free row i (rows 0..i-1 are in use)
        whose keys and values a row holds (a row in use: the tokens in its cache before this step, a
        prompt still prefilling included, so that one of two alike copies what the other has done so
        far; a free row: what its last occupant left), and that row (i itself when it holds as much).
        At least the prompt's last token is left to prefill (its logits are the first new token's).
        Copied slots hold the keys and values a prefill computes, up to float rounding."""
        best, source = 0, i
        for j in range(self.max_rows):
            held = self.rows[j].cached() if j < i else self.held[j]
            n = _common_start(prompt, held, len(prompt) - 1)
            if n > best or (n == best and j == i):
                best, source = n, j
        return best, source

    def _emit(self, logits: torch.Tensor) -> None:
        """Sample the next token of every row (logits: one row each), hand out its text, and retire
        finished rows (a retired row's place goes to the last row, which is never one before it)."""
        finished, live = [], []
        now = time.monotonic()
        for i, row in enumerate(self.rows):
            deadline = row.req.deadline
            if row.req._cancelled:
                finished.append((i, "cancelled"))
            elif deadline is not None and now > deadline:
                finished.append((i, "length"))
            elif not row.prefilling:
                live.append(i)
        tokens = self._draw(logits, live)
        for i in live:
            reason = self._take(self.rows[i], tokens[i], logits[i])
            if reason:
                finished.append((i, reason))
        for i, reason in sorted(finished, reverse=True):
            self._retire(i, reason)

    def _draw(self, logits: torch.Tensor, live: list[int]) -> dict[int, int]:
        """The next token of each live row. Rows with the same settings are drawn in one call (each from
        its own generator, so a row draws the same alone or with others)."""
        groups: dict[tuple, list[int]] = {}
        for i in live:
            p = self.rows[i].req.params
            penalties = (p.repetition_penalty, p.frequency_penalty, p.presence_penalty)
            key = (p.temperature, p.top_k, p.top_p, p.min_p, penalties, self.rows[i].banned_key)
            groups.setdefault(key, []).append(i)
        tokens: dict[int, int] = {}
        for idx in groups.values():
            rows = [self.rows[i] for i in idx]
            lg = logits[idx]  # (g, vocab)
            for j, row in enumerate(rows):  # lg is a copy (indexed rows)
                if row.bias is not None:
                    lg[j].index_add_(0, row.bias[0], row.bias[1].to(lg.dtype))
            if rows[0].banned.numel():
                lg = lg.index_fill(1, rows[0].banned, float("-inf"))
            seen = torch.cat([r.seen for r in rows]) if rows[0].seen is not None else None
            counts = torch.cat([r.counts for r in rows]) if rows[0].counts is not None else None
            generators = [r.generator for r in rows]
            generators = None if not any(generators) else generators
            drawn = sample_rows(lg, rows[0].req.params, seen, generators, counts)
            tokens.update(zip(idx, drawn.tolist(), strict=True))
        return tokens

    def _take(self, row: _Row, token: int, logits: torch.Tensor) -> str | None:
        """Add a drawn token to its row and hand out its text; the finish reason when the row is done."""
        req = row.req
        row.generated.append(token)
        if row.seen is not None:
            row.seen[0, token] = True
        if row.counts is not None:
            row.counts[0, token] += 1
        if req.logprobs is not None:  # an end token too (last): it was drawn, though its text is not kept
            row.logprobs.append(token_logprobs(logits, token, req.logprobs, self.tokenizer))
        if token in row.stop_ids:
            return "stop"
        piece = row.stream.push(token)
        if piece:
            req.deliver(row.piece(piece))
        if row.stream.stopped:
            return "stop"
        if len(row.generated) >= req.max_new_tokens or row.pos + 1 >= self.context:
            return "length"
        return None

    def _retire(self, i: int, reason: str) -> None:
        """Finish row i's request and move the last row into its place (rows stay 0..n-1); a row still
        prefilling stays last: the last decoding row takes the place, and it the one that row left."""
        row = self.rows[i]
        last = len(self.rows) - 1
        if i == last:
            self.held[i] = row.cached()
        elif self.rows[last].prefilling:
            self._move(last - 1, i)
            self._move(last, last - 1)
        else:
            self._move(last, i)
        self.rows.pop()
        if reason == "cancelled":
            return
        tail = row.stream.flush() if not row.stream.stopped else ""
        if tail:
            row.req.deliver(row.piece(tail))
        tokens = [t for t in row.generated if t not in row.stop_ids]
        logprobs = row.logprobs if row.req.logprobs is not None else None
        row.req.deliver(Completion(row.stream.text, tokens, reason, len(row.req.prompt_ids), logprobs))

    def _move(self, src: int, dst: int) -> None:
        """Row src's request and the keys and values it holds into row dst (src then holds a copy)."""
        if src == dst:
            return
        moved = self.rows[src]
        held = moved.cached()
        n = len(held)
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.rows[dst] = moved
        self.held[src] = held


@atexit.register
def _close_all() -> None:
    """Stop every scheduler's thread when the interpreter exits: a program may end while requests still
    generate (or right after its last reply, as the thread tidies up), and a thread still inside a torch
    op as the process tears down aborts it ("terminate called without an active exception")."""
    for scheduler in list(_open):
        scheduler.close()


def check_token_ids(ids: Iterable[int], vocab: int, what: str) -> None:
    """ValueError naming `what` unless every id is in [0, vocab)."""
    if not all(0 <= t < vocab for t in ids):
        raise ValueError(f"{what}: token ids must be in [0, {vocab})")


def _common_start(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """How many leading tokens a and b share, at most limit."""
    n = 0
    for x, y in zip(a[:limit], b, strict=False):
        if x != y:
            break
        n += 1
    return n
