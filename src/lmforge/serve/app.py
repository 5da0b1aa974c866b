"""An OpenAI-compatible HTTP API over one LLM: completions, chat completions (SSE streaming), models, health.

Generations decode together: every request's generations go to the LLM's continuous batcher
(`generate/continuous.py`) through `generation.Generations`, and the event loop waits for their pieces
without holding a worker thread, so /health and new requests answer while any number of streams run. A
request beyond the batch's rows waits in a bounded queue; past it the answer is 429 with Retry-After.
The wire format, and which OpenAI fields are honoured: protocol.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..api import LLM, GenerationError
from ..generate.engine import Completion, Piece
from ..generate.params import SamplingParams
from .generation import Generations
from .page import add_page
from .protocol import (
    DEFAULT,
    MAX_CHOICES,
    SAMPLING_FIELDS,
    ChatBody,
    CompletionBody,
    RequestError,
    Sampling,
    chat_logprobs,
    completion_logprobs,
    error,
    prompts_of,
    usage,
    validation_message,
)
from .tokens import PATHS as TOKENIZER_PATHS
from .tokens import add_tokenizer_routes


def create_app(
    llm: LLM,
    max_tokens: int = 512,
    max_body: int = 1_000_000,
    model_name: str | None = None,
    sampling: SamplingParams = DEFAULT,
    api_key: str | None = None,
    max_rows: int = 8,
    max_queue: int = 64,
    timeout: float | None = 600.0,
):
    """The FastAPI application serving llm; max_tokens caps a request's max_tokens (and the context caps
    it), max_body its size, sampling gives what a request leaves out (its max_new_tokens up to the cap);
    max_rows generations decode together, max_queue more may wait (then 429), and a generation runs at
    most timeout seconds (then ends with finish_reason "length"); with api_key, every /v1 request must
    carry `Authorization: Bearer API_KEY` (/health stays open)."""
    server = _Server(llm, max_tokens, max_body, model_name or llm.name, sampling)
    server.generations = Generations(llm, max_rows, max_queue, timeout)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        server.generations.scheduler.close()  # streams still open end now, not after their last token

    app = FastAPI(title="lmforge", version="0.1.0", lifespan=lifespan)
    if api_key:
        app.middleware("http")(_key_check(api_key))
    app.add_exception_handler(RequestError, _request_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.get("/health")(server.health)
    app.get("/v1/models")(server.models)
    app.get("/v1/models/{model_id}")(server.model)
    app.post("/v1/completions")(server.completions)
    app.post("/v1/chat/completions")(server.chat_completions)
    add_page(app, server, key_required=bool(api_key))  # the web chat at /, and /v1/lmforge/info
    add_tokenizer_routes(app, server)  # /tokenize, /detokenize, /tokenizer_info
    return app


def _key_check(api_key: str):
    """Middleware: /v1 and the tokenizer's routes answer 401 (OpenAI's error shape) unless the request
    carries the key."""
    expected = f"Bearer {api_key}".encode()

    async def check(request: Request, call_next):
        path = request.url.path
        if path.startswith("/v1") or path in TOKENIZER_PATHS:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):  # constant time: the key does not leak by timing
                return error(401, "a valid API key is required: send 'Authorization: Bearer API_KEY'")
        return await call_next(request)

    return check


async def _request_error(request: Request, exc: RequestError):
    return error(exc.status, exc.message, exc.headers)


async def _invalid(request: Request, exc: RequestValidationError):
    return error(400, validation_message(exc))


async def _http(request: Request, exc: StarletteHTTPException):
    return error(exc.status_code, str(exc.detail))


class _Server:
    """The state the routes share (the LLM, the limits, the sampling defaults) and the routes themselves."""

    generations: Generations

    def __init__(self, llm: LLM, max_tokens: int, max_body: int, name: str, sampling: SamplingParams):
        self.llm, self.max_body, self.name = llm, max_body, name
        self.context = llm.context_len
        self.max_tokens = min(max_tokens, self.context - 1)  # a reply longer than the context cannot be
        self.created = int(time.time())
        self.defaults = dataclasses.replace(
            sampling, max_new_tokens=min(sampling.max_new_tokens, self.max_tokens)
        )

    def health(self):
        generating, waiting = self.generations.scheduler.load
        return {"status": "ok", "model": self.name, "generating": generating, "waiting": waiting}

    def models(self):
        return {"object": "list", "data": [self.model()]}

    def model(self, model_id: str | None = None) -> dict:
        """GET /v1/models/{model_id}: the served model (404 for any other name)."""
        if model_id is not None and model_id != self.name:
            raise RequestError(404, f"model '{model_id}' does not exist: this server serves '{self.name}'")
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "lmforge"}

    async def completions(self, request: Request):
        body = await self.read_json(request, CompletionBody)
        if body.max_tokens == 0 and not body.echo:
            raise RequestError(
                400, "max_tokens=0 draws nothing: give 1 or more (0 is for echo, to score a prompt)"
            )
        if body.suffix:
            raise RequestError(
                400, "suffix: inserting text before a suffix is not served; give a prompt only"
            )
        drawn = body.best_of or body.n
        if drawn < body.n or (body.stream and drawn > body.n):
            raise RequestError(
                400, f"best_of={drawn} must be at least n={body.n}, and equal to it with stream"
            )
        params = self.settings(body)
        prompts = prompts_of(body)
        # best_of: every choice drawn with its logprobs, to rank them (kept in the reply only if asked for)
        logprobs = body.logprobs if drawn == body.n or body.logprobs is not None else 0
        jobs = [job for p in prompts for job in self.jobs(p, params, body, logprobs, drawn)]
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time())}
        head["model"] = self.name
        echoes = await self.echoes(prompts, jobs, body) if body.echo else None
        events = _drawn_nothing(jobs) if body.max_tokens == 0 else await self.generations.run(jobs)
        if echoes is not None:
            events = _echoed(events, echoes)
        if body.stream:
            return _sse(_chunks(head, events, len(jobs), _usage_of(body), _completion_choice))
        done = await _finished(events, len(jobs))
        spent = usage(done, drawn)
        if drawn > body.n:
            done = _best(done, drawn, body.n, [len(e[1] or []) for e in echoes] if echoes else None)
            if body.logprobs is None:
                done = [dataclasses.replace(c, logprobs=None) for c in done]
        choices = [
            {
                "text": c.text,
                "index": i,
                "logprobs": completion_logprobs(c.logprobs),
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(done)
        ]
        return {**head, "choices": choices, "usage": spent}

    async def chat_completions(self, request: Request):
        body = await self.read_json(request, ChatBody)
        body.check_unserved()
        params = self.settings(body)
        messages = [m.turn() for m in body.messages]
        top = (body.top_logprobs or 0) if body.logprobs else None
        jobs = self.jobs(messages, params, body, top)
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
        }
        head["model"] = self.name
        events = await self.generations.run(jobs)
        if body.stream:
            chunk_head = {**head, "object": "chat.completion.chunk"}
            n, per_prompt = len(jobs), _usage_of(body)
            return _sse(_chunks(chunk_head, events, n, per_prompt, _chat_choice, _roles(chunk_head, n)))
        done = await _finished(events, len(jobs))
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": chat_logprobs(c),
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(done)
        ]
        return {**head, "choices": choices, "usage": usage(done, body.n)}

    async def echoes(self, prompts: list, jobs: list[tuple], body: CompletionBody) -> list[tuple]:
        """For each job (as many per prompt), its prompt's text and, when logprobs are asked for, the
        prompt's own tokens' logprobs entries (scored once per prompt)."""
        n, out = len(jobs) // len(prompts), []
        for k, prompt in enumerate(prompts):
            ids = jobs[k * n][0]["prompt_ids"]
            text = prompt if isinstance(prompt, str) else self.llm.tokenizer.decode(ids)
            scored = None if body.logprobs is None else await self.generations.score(ids, body.logprobs)
            out += [(text, scored)] * n
        return out

    def jobs(
        self, prompt, params: SamplingParams, body: Sampling, logprobs: int | None, n: int | None = None
    ) -> list[tuple]:
        """The request's n generations of one prompt (body.n unless given), checked against the context
        (400 past it)."""
        n = n or body.n
        if n * (len(body.prompt) if isinstance(getattr(body, "prompt", None), list) else 1) > MAX_CHOICES:
            raise RequestError(
                400, f"n (or best_of) x prompts is over this server's {MAX_CHOICES} generations per request"
            )
        try:
            fields, trim = self.llm.request_fields(prompt, params.max_new_tokens, params)
        except GenerationError as e:
            raise RequestError(400, str(e)) from e
        n_prompt = len(fields["prompt_ids"])  # token ids out of the vocabulary: the scheduler's 400
        room = self.context - n_prompt
        if room < 1 or (body.max_tokens is not None and body.max_tokens > room):
            asked = f" and max_tokens asks for {body.max_tokens}" if body.max_tokens is not None else ""
            raise RequestError(
                400,
                f"this model's context is {self.context} tokens; the prompt takes {n_prompt}{asked}: "
                "shorten the prompt or lower max_tokens",
            )
        fields["max_new_tokens"] = min(fields["max_new_tokens"], room)
        fields["logprobs"] = logprobs
        fields["logit_bias"] = body.token_bias()
        seed = fields["seed"]
        # n choices of one request differ: each draws from its own seed (seed + i when one is given).
        return [({**fields, "seed": None if seed is None else seed + i}, trim) for i in range(n)]

    async def read_json(self, request: Request, model: type[BaseModel]):
        """The body, refused with 413 past max_body (checked before and while reading) and 400 if invalid."""
        max_body = self.max_body
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body:
            raise RequestError(413, f"request body of {declared} bytes is over this server's {max_body}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body:
                raise RequestError(413, f"request body is over this server's limit of {max_body} bytes")
        try:
            data = json.loads(body)
        except ValueError as e:
            raise RequestError(400, f"the body is not valid JSON: {e}") from e
        except RecursionError:
            raise RequestError(400, "the body is nested too deeply to be a request") from None
        if _has_lone_surrogate(data):
            raise RequestError(400, "the body holds text with an unpaired UTF-16 surrogate (\\ud800-\\udfff)")
        if not isinstance(data, dict):
            raise RequestError(400, "the body must be a JSON object")
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise RequestError(400, validation_message(e)) from e

    def settings(self, body: Sampling) -> SamplingParams:
        """The request's sampling: the fields it gives, the server's defaults for the others."""
        if body.model is not None and body.model != self.name:
            raise RequestError(404, f"model '{body.model}' does not exist: this server serves '{self.name}'")
        if getattr(body, "max_completion_tokens", None) is not None:
            body.max_tokens = body.max_completion_tokens
        given = {k: getattr(body, k) for k in SAMPLING_FIELDS if k in body.model_fields_set}
        if isinstance(given.get("stop"), str):
            given["stop"] = [given["stop"]]
        if body.max_tokens is not None:
            if body.max_tokens > self.max_tokens:
                raise RequestError(
                    400, f"max_tokens={body.max_tokens} is over this server's cap of {self.max_tokens}"
                )
            given["max_new_tokens"] = max(1, body.max_tokens)  # 0 (echo only) draws nothing at all
        try:
            return dataclasses.replace(self.defaults, **given)
        except ValueError as e:
            raise RequestError(400, str(e)) from e


async def _finished(events: AsyncIterator, n: int) -> list[Completion]:
    """The Completions of every choice, in order (the pieces are already in them)."""
    done: list[Completion | None] = [None] * n
    async with contextlib.aclosing(events):
        async for batch in events:
            for i, event in batch:
                if isinstance(event, Completion):
                    done[i] = event
    return done  # type: ignore[return-value]


def _best(done: list[Completion], drawn: int, n: int, echoed: list[int] | None) -> list[Completion]:
    """Of each prompt's `drawn` choices (consecutive), the n with the highest mean log-probability of the
    tokens drawn (an echoed prompt's entries, echoed[i] of them, left out), best first."""
    best = []
    for start in range(0, len(done), drawn):
        group = range(start, start + drawn)

        def score(i: int) -> float:
            entries = done[i].logprobs[echoed[i] if echoed else 0 :]
            return sum(e["logprob"] for e in entries) / max(1, len(entries))

        best += [done[i] for i in sorted(group, key=score, reverse=True)[:n]]
    return best


async def _drawn_nothing(jobs: list[tuple]) -> AsyncIterator[list[tuple[int, Completion]]]:
    """The events of max_tokens=0 (echo only): every choice ends at once with no new token."""
    yield [
        (i, Completion("", [], "length", len(f["prompt_ids"]), None if f["logprobs"] is None else []))
        for i, (f, _) in enumerate(jobs)
    ]


async def _echoed(events: AsyncIterator, echoes: list[tuple]) -> AsyncIterator[list]:
    """events after each choice's prompt as a piece of its own (with the prompt's logprobs entries when
    scored), with the prompt in front of each Completion's text and its entries in front of its
    logprobs."""
    yield [(i, text if scored is None else Piece(text, scored)) for i, (text, scored) in enumerate(echoes)]
    async with contextlib.aclosing(events):
        async for batch in events:
            out = []
            for i, ev in batch:
                if isinstance(ev, Completion):
                    text, scored = echoes[i]
                    logprobs = None if ev.logprobs is None else [*(scored or []), *ev.logprobs]
                    ev = dataclasses.replace(ev, text=text + ev.text, logprobs=logprobs)
                out.append((i, ev))
            yield out


DONE = "[DONE]"  # the data of a stream's last event


def _sse(chunks: AsyncIterator[list]) -> StreamingResponse:
    """Server-sent events of the chunks, each list of them in one write (chunks are JSON, DONE as it is);
    a client that leaves closes them, which cancels its generations."""

    async def lines():
        async with contextlib.aclosing(chunks):
            try:
                async for batch in chunks:
                    yield "".join(f"data: {c if c is DONE else json.dumps(c)}\n\n" for c in batch)
            except RequestError as e:  # the generation failed after the stream began: say so in-stream
                error = {"error": {"message": e.message, "type": "server_error"}}
                yield f"data: {json.dumps(error)}\n\ndata: {DONE}\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream")


def _has_lone_surrogate(value) -> bool:
    """Whether JSON text decoded into `value` holds an unpaired surrogate (no text can be encoded from it)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _usage_of(body: Sampling) -> int | None:
    """With stream_options.include_usage, how many choices each prompt has (the usage chunk counts a
    prompt once); else None: no usage chunk."""
    return body.n if (body.stream_options or {}).get("include_usage") else None


async def _chunks(
    head: dict, events: AsyncIterator, n: int, per_prompt: int | None, choice, opening: list | None = None
) -> AsyncIterator[list]:
    """A stream's chunks, those of events that arrived together as one list (`opening` in front of the
    first): one chunk per event, its choice made by choice(i, text piece or Completion, sent) where
    sent is (the logprobs entries the choice's pieces carried so far, their tokens' characters); after
    the n choices' last Completions, with per_prompt (choices to a prompt) a chunk with no choices and
    the token counts (stream_options.include_usage), then DONE."""
    done: dict[int, Completion] = {}
    out = list(opening or [])
    sent = [(0, 0)] * n
    async with contextlib.aclosing(events):
        async for batch in events:
            for i, ev in batch:
                if isinstance(ev, Completion):
                    done[i] = ev
                out.append({**head, "choices": [choice(i, ev, sent[i])]})
                if isinstance(ev, Piece) and ev.logprobs:
                    count, chars = sent[i]
                    sent[i] = (count + len(ev.logprobs), chars + sum(len(e["token"]) for e in ev.logprobs))
            if len(done) == n:
                counts = [] if per_prompt is None else [usage([done[i] for i in range(n)], per_prompt)]
                out += [{**head, "choices": [], "usage": c} for c in counts] + [DONE]
            yield out
            out = []


def _completion_choice(i: int, ev: str | Completion, sent: tuple[int, int]) -> dict:
    """/v1/completions' choice: a text piece with its tokens' logprobs, or a choice's end with its finish
    reason and the logprobs entries its pieces did not carry; sent: (entries, characters) they did."""
    count, chars = sent
    if isinstance(ev, str):
        logprobs = completion_logprobs(getattr(ev, "logprobs", None), chars)
        return {"text": ev, "index": i, "logprobs": logprobs, "finish_reason": None}
    rest = completion_logprobs(None if ev.logprobs is None else ev.logprobs[count:], chars)
    return {"text": "", "index": i, "logprobs": rest, "finish_reason": ev.finish_reason}


def _chat_choice(i: int, ev: str | Completion, sent: tuple[int, int]) -> dict:
    """/v1/chat/completions' choice: a delta of text with its tokens' logprobs, or a choice's end with its
    finish reason and the content's logprobs entries its pieces did not carry."""
    if isinstance(ev, str):
        entries = getattr(ev, "logprobs", None)
        logprobs = None if entries is None else {"content": entries, "refusal": None}
        return {"index": i, "delta": {"content": ev}, "logprobs": logprobs, "finish_reason": None}
    return {
        "index": i,
        "delta": {},
        "logprobs": chat_logprobs(ev, sent[0]),
        "finish_reason": ev.finish_reason,
    }


def _roles(head: dict, n: int) -> list[dict]:
    """A chat stream's first chunks: each choice's assistant role (sent with the first events)."""
    role = {"role": "assistant", "content": ""}
    return [
        {**head, "choices": [{"index": i, "delta": role, "logprobs": None, "finish_reason": None}]}
        for i in range(n)
    ]
