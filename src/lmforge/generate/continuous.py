"""Continuous batching: requests that arrive while others generate join the running batch at the next
step and leave it when they finish, each with its own sampling settings, stops and length.

One thread owns the model and loops: admit waiting requests into free rows (each prompt is prefilled
alone into its row of the cache), decode one token for every active row together (`step.decode_rows`:
every row keeps its own positions in its own cache row, so rows never wait for each other), sample each
row with its own settings and generator, hand each request its new text, and drop finished or cancelled
rows. Active rows are kept in rows 0..n-1 (a finished row is replaced by the last one), so a step costs
what a batch of n costs, and one request alone decodes as fast as it would without the scheduler.

Requests talk to the loop through `Request.deliver` (called on the loop's thread with a text piece, then
the final `Completion`, or an exception) and `Request.cancel()` (the row is dropped at the next step).
The server wraps deliver to hand events to its event loop; `Scheduler.run_sync` collects them for
callers on plain threads. A bounded wait queue refuses work it could not start soon (`QueueFull`).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..model import GPT
from .engine import Completion, TextStream, _packing_budget
from .layout import pack_for_batches
from .sampling import SamplingParams, sample_rows
from .step import decode_rows


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
        self.pos = len(req.prompt_ids)  # the position of the next token fed in
        self.generator = None
        if req.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(req.seed)
        self.seen = None
        if req.params.repetition_penalty != 1.0:
            self.seen = torch.zeros((1, vocab), dtype=torch.bool, device=device)
            self.seen[0, req.prompt_ids] = True
        self.banned_key = tuple(sorted(set(req.banned_ids)))
        self.banned = torch.tensor(self.banned_key, dtype=torch.long, device=device)
        self.stop_ids = set(req.stop_ids)


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
    ) -> None:
        if max_rows < 1 or max_queue < 0:
            raise ValueError(f"max_rows={max_rows} must be >= 1 and max_queue={max_queue} >= 0")
        self.model, self.tokenizer = model, tokenizer
        self.max_rows, self.max_queue = max_rows, max_queue
        self.lock = lock or threading.Lock()  # held while the model computes (other users may share it)
        cfg, p = model.cfg, model.wte.weight
        self.context = cfg.context_len
        # Zeroed: attention reads whole rows under a mask, and 0 * NaN from never-written memory is NaN.
        shape = (cfg.n_layer, max_rows, cfg.n_kv_head, self.context, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.v = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.rows: list[_Row] = []
        self.waiting: deque[Request] = deque()
        self.wake = threading.Condition()
        self.closed = False
        self.steps = 0  # decode steps taken (tests and the server's stats read it)
        self.admitting = 0  # requests taken from the queue whose prefill has not finished
        self.threads = threads  # the decode thread's torch.set_num_threads; None: as torch defaults
        if max_rows > 1:
            pack_for_batches(model, _packing_budget())
        self.thread = threading.Thread(target=self._loop, name="lmforge-decode", daemon=True)
        self.thread.start()

    # ---- the callers' side -------------------------------------------------------------------------
    def submit(self, req: Request) -> Request:
        """Queue a request; QueueFull when every row is busy and max_queue requests already wait."""
        if not req.prompt_ids or len(req.prompt_ids) >= self.context:
            raise ValueError(
                f"prompt of {len(req.prompt_ids)} tokens: give 1 to {self.context - 1} (the context is "
                f"{self.context})"
            )
        with self.wake:
            if self.closed:
                raise QueueFull("the server is shutting down")
            # Rows free up only between steps: count what is admitted or waiting, not the rows alone.
            if len(self.rows) + self.admitting + len(self.waiting) >= self.max_rows + self.max_queue:
                raise QueueFull(f"{self.max_rows} requests are generating and {len(self.waiting)} wait")
            self.waiting.append(req)
            self.wake.notify()
        return req

    @property
    def load(self) -> tuple[int, int]:
        """(requests generating, requests waiting)."""
        with self.wake:
            return len(self.rows) + self.admitting, len(self.waiting)

    def close(self) -> None:
        """Stop the loop after its current step; waiting and active requests get a RuntimeError."""
        with self.wake:
            self.closed = True
            self.wake.notify()
        self.thread.join(timeout=10)

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
                while not self.closed and not self.rows and not self.waiting:
                    self.wake.wait()
                if self.closed:
                    break
                admitted = self._take_waiting()
                self.admitting = len(admitted)
            try:
                with self.lock:
                    new = self._admit(admitted)
                n_old = len(self.rows) - len(new)  # rows 0..n_old-1; the new ones follow
                if new:  # their first tokens go out now, not after the others' step
                    self._emit(torch.cat(new), n_old)
                if n_old:  # the others' step; the new rows join it from the next one
                    with self.lock:
                        logits = self._decode(n_old)
                    self._emit(logits, 0, n_old)
            except Exception as exc:  # noqa: BLE001 - a failed step fails its requests, not the server
                in_rows = {id(row.req) for row in self.rows}
                for req in [row.req for row in self.rows] + [r for r in admitted if id(r) not in in_rows]:
                    req.deliver(exc)
                self.rows, self.admitting = [], 0
        error = QueueFull("the server is shutting down")
        for row in self.rows:
            row.req.deliver(error)
        for req in self.waiting:
            req.deliver(error)

    def _take_waiting(self) -> list[Request]:
        taken = []
        while self.waiting and len(self.rows) + len(taken) < self.max_rows:
            req = self.waiting.popleft()
            if not req._cancelled:
                taken.append(req)
        return taken

    @torch.no_grad()
    def _admit(self, reqs: list[Request]) -> list[torch.Tensor]:
        """Prefill the new requests into the next free rows; the logits (1, vocab) of each one's last
        prompt token, in the order the rows were added."""
        out = []
        for group in _prefill_groups(reqs):
            out += self._prefill(group)
        return out

    def _prefill(self, reqs: list[Request]) -> list[torch.Tensor]:
        """One forward for several prompts, left-padded to the longest (requests that arrive together,
        as a burst does, start together rather than one prefill after another); each prompt's keys and
        values then move to the start of its own row."""
        device = self.k.device
        B, P = len(reqs), max(len(r.prompt_ids) for r in reqs)
        ids = torch.zeros((B, P), dtype=torch.long, device=device)
        key_mask = torch.zeros((B, P), dtype=torch.bool, device=device)
        for j, req in enumerate(reqs):
            ids[j, P - len(req.prompt_ids) :] = torch.tensor(req.prompt_ids, dtype=torch.long, device=device)
            key_mask[j, P - len(req.prompt_ids) :] = True
        padded = not bool(key_mask.all())
        positions = (key_mask.long().cumsum(1) - 1).clamp(min=0) if padded else None
        cache = self.model.new_cache(B, max_len=P)
        mask = key_mask if padded else None
        logits = self.model(ids, cache=cache, positions=positions, key_mask=mask, last_only=True)[:, -1]
        for j, req in enumerate(reqs):
            i, n = len(self.rows), len(req.prompt_ids)
            self.k[:, i, :, :n] = cache.k[:, j, :, P - n :]
            self.v[:, i, :, :n] = cache.v[:, j, :, P - n :]
            row = _Row(req, self.tokenizer.decode, self.model.cfg.vocab_size, device)
            with self.wake:  # a request counts once, as admitting or as a row (submit's bound)
                self.rows.append(row)
                self.admitting -= 1
        return list(logits.split(1))

    @torch.no_grad()
    def _decode(self, n: int) -> torch.Tensor:
        """Logits (n, vocab) for rows 0..n-1 after one decode step, each row feeding in the token it
        sampled last."""
        rows = self.rows[:n]
        idx = torch.tensor([row.generated[-1] for row in rows], dtype=torch.long, device=self.k.device)
        positions = torch.tensor([row.pos for row in rows], device=self.k.device)
        length = int(positions.max()) + 1
        k_layers = tuple(self.k[:, :n, :, :length].unbind(0))
        v_layers = tuple(self.v[:, :n, :, :length].unbind(0))
        logits = decode_rows(self.model, idx, positions, k_layers, v_layers)
        for row in rows:
            row.pos += 1
        self.steps += 1
        return logits

    def _emit(self, logits: torch.Tensor, first: int, end: int | None = None) -> None:
        """Sample the next token of rows first..end-1 (logits: one row each), hand out its text, and
        retire finished rows (a retired row's place goes to the last row, which is never one before it)."""
        finished, live = [], []
        now = time.monotonic()
        for i, row in enumerate(self.rows[first:end], first):
            deadline = row.req.deadline
            if row.req._cancelled:
                finished.append((i, "cancelled"))
            elif deadline is not None and now > deadline:
                finished.append((i, "length"))
            else:
                live.append(i)
        tokens = self._draw(logits, live, first)
        for i in live:
            reason = self._take(self.rows[i], tokens[i], logits[i - first])
            if reason:
                finished.append((i, reason))
        for i, reason in sorted(finished, reverse=True):
            self._retire(i, reason)

    def _draw(self, logits: torch.Tensor, live: list[int], first: int) -> dict[int, int]:
        """The next token of each live row. Rows with the same settings are drawn in one call (each from
        its own generator, so a row draws the same alone or with others)."""
        groups: dict[tuple, list[int]] = {}
        for i in live:
            p = self.rows[i].req.params
            key = (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty, self.rows[i].banned_key)
            groups.setdefault(key, []).append(i)
        tokens: dict[int, int] = {}
        for idx in groups.values():
            rows = [self.rows[i] for i in idx]
            lg = logits[[i - first for i in idx]]  # (g, vocab)
            if rows[0].banned.numel():
                lg = lg.index_fill(1, rows[0].banned, float("-inf"))
            seen = torch.cat([r.seen for r in rows]) if rows[0].seen is not None else None
            generators = [r.generator for r in rows]
            drawn = sample_rows(lg, rows[0].req.params, seen, None if not any(generators) else generators)
            tokens.update(zip(idx, drawn.tolist(), strict=True))
        return tokens

    def _take(self, row: _Row, token: int, logits: torch.Tensor) -> str | None:
        """Add a drawn token to its row and hand out its text; the finish reason when the row is done."""
        req = row.req
        row.generated.append(token)
        if row.seen is not None:
            row.seen[0, token] = True
        if token in row.stop_ids:
            return "stop"
        if req.logprobs is not None:  # the reply's tokens only: an end token is not part of it
            row.logprobs.append(token_logprobs(logits, token, req.logprobs, self.tokenizer))
        piece = row.stream.push(token)
        if piece:
            req.deliver(piece)
        if row.stream.stopped:
            return "stop"
        if len(row.generated) >= req.max_new_tokens or row.pos + 1 >= self.context:
            return "length"
        return None

    def _retire(self, i: int, reason: str) -> None:
        """Finish row i's request and move the last row into its place (rows stay 0..n-1)."""
        row = self.rows[i]
        last = len(self.rows) - 1
        if i != last:
            moved = self.rows[last]
            self.k[:, i, :, : moved.pos] = self.k[:, last, :, : moved.pos]
            self.v[:, i, :, : moved.pos] = self.v[:, last, :, : moved.pos]
            self.rows[i] = moved
        self.rows.pop()
        if reason == "cancelled":
            return
        tail = row.stream.flush() if not row.stream.stopped else ""
        if tail:
            row.req.deliver(tail)
        tokens = [t for t in row.generated if t not in row.stop_ids]
        logprobs = row.logprobs if row.req.logprobs is not None else None
        row.req.deliver(Completion(row.stream.text, tokens, reason, len(row.req.prompt_ids), logprobs))


def _prefill_groups(reqs: list[Request], waste: float = 0.5) -> list[list[Request]]:
    """The requests in groups prefilled together: by prompt length, a group growing while its padding
    stays under `waste` of its real tokens (a long prompt is not padded onto many short ones)."""
    groups: list[list[Request]] = []
    real = 0
    for req in sorted(reqs, key=lambda r: len(r.prompt_ids)):
        n = len(req.prompt_ids)
        if groups and (len(groups[-1]) + 1) * n <= (1 + waste) * (real + n):
            groups[-1].append(req)
            real += n
        else:
            groups.append([req])
            real = n
    return groups


def token_logprobs(logits: torch.Tensor, token: int, top: int, tokenizer) -> dict:
    """The chosen token's log-probability under the model (log-softmax of its logits, before any sampling
    setting) and the `top` most likely tokens', as OpenAI's logprobs entries hold them: the token's text
    (U+FFFD where it holds part of a character) and its exact bytes."""
    logp = torch.log_softmax(logits.float(), dim=-1)

    def entry(t: int, lp: float) -> dict:
        return {"token": tokenizer.decode([t]), "logprob": lp, "bytes": list(tokenizer.token_bytes(t))}

    out = entry(token, float(logp[token]))
    values, ids = torch.topk(logp, min(top, logp.numel())) if top else (torch.empty(0), torch.empty(0))
    out["top_logprobs"] = [entry(int(t), float(v)) for v, t in zip(values, ids, strict=True)]
    return out
