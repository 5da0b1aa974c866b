"""An OpenAI-compatible HTTP API over one LLM: completions, chat completions (SSE streaming), models, health.

Requests are served one generation at a time (the LLM's lock is the queue); FastAPI runs each request in
a worker thread, so /health and /v1/models answer while a generation runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import time
import uuid
from collections.abc import Generator, Iterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..api import LLM, GenerationError
from ..generate.engine import Completion
from ..generate.params import SamplingParams

DEFAULT = SamplingParams()  # the one set of sampling defaults; `lmforge serve`'s flags may change them
# Request fields that are sampling settings of the same name; max_tokens is max_new_tokens.
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "stop", "seed")


class _Sampling(BaseModel):
    """Fields shared by both endpoints; unknown OpenAI fields (user, logprobs, ...) are ignored.

    A sampling field the request leaves out takes the server's default (create_app's `sampling`), not
    the default written here, which only documents the schema.
    """

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=DEFAULT.temperature, ge=0.0)
    top_p: float | None = Field(default=DEFAULT.top_p, gt=0.0, le=1.0)
    top_k: int | None = Field(default=DEFAULT.top_k, ge=1)  # not in OpenAI's API; vLLM and others accept it
    min_p: float | None = Field(default=DEFAULT.min_p, ge=0.0, lt=1.0)
    repetition_penalty: float = Field(default=DEFAULT.repetition_penalty, gt=0.0)
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1)  # one choice per request
    stream_options: dict | None = None  # {"include_usage": true}: a last chunk with the token counts


class CompletionBody(_Sampling):
    prompt: str | list[str]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str = Field(pattern="^(system|user|assistant)$")
    content: str


class ChatBody(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # OpenAI's newer name for max_tokens


class RequestError(Exception):
    """A request the server refuses: HTTP status and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _error(status: int, message: str) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": None, "code": None}}, status_code=status
    )


def _validation_message(err: ValidationError | RequestValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
    return "invalid request: " + "; ".join(parts)


def _last(events: Iterator[str | Completion]) -> Completion:
    """The Completion at the end of a stream of events (the pieces are already in it)."""
    *_, done = events
    return done


def create_app(
    llm: LLM,
    max_tokens: int = 512,
    max_body: int = 1_000_000,
    model_name: str | None = None,
    sampling: SamplingParams = DEFAULT,
    api_key: str | None = None,
):
    """The FastAPI application serving llm; max_tokens caps a request's max_tokens, max_body its size,
    sampling gives what a request leaves out (its max_new_tokens up to max_tokens); with api_key, every
    /v1 request must carry `Authorization: Bearer API_KEY` (/health stays open)."""
    server = _Server(llm, max_tokens, max_body, model_name or llm.name, sampling)
    app = FastAPI(title="lmforge", version="0.1.0")
    if api_key:
        app.middleware("http")(_key_check(api_key))
    app.add_exception_handler(RequestError, _request_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.get("/health")(server.health)
    app.get("/v1/models")(server.models)
    app.post("/v1/completions")(server.completions)
    app.post("/v1/chat/completions")(server.chat_completions)
    return app


def _key_check(api_key: str):
    """Middleware: /v1 answers 401 (OpenAI's error shape) unless the request carries the key."""
    expected = f"Bearer {api_key}".encode()

    async def check(request: Request, call_next):
        if request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):  # constant time: the key does not leak by timing
                return _error(401, "a valid API key is required: send 'Authorization: Bearer API_KEY'")
        return await call_next(request)

    return check


async def _request_error(request: Request, exc: RequestError):
    return _error(exc.status, exc.message)


async def _invalid(request: Request, exc: RequestValidationError):
    return _error(400, _validation_message(exc))


async def _http(request: Request, exc: StarletteHTTPException):
    return _error(exc.status_code, str(exc.detail))


class _Server:
    """The state the routes share (the LLM, the limits, the sampling defaults) and the routes themselves.

    health and models are plain functions, so FastAPI runs them in a worker thread and they answer while
    a generation holds the LLM's lock.
    """

    def __init__(self, llm: LLM, max_tokens: int, max_body: int, name: str, sampling: SamplingParams):
        self.llm, self.max_tokens, self.max_body, self.name = llm, max_tokens, max_body, name
        # Generation takes turns here, on the event loop, before it takes a worker thread: a request that
        # waited on the LLM's lock inside a thread held that thread, and with anyio's 40 threads all
        # waiting, the stream holding the lock found none for its next piece and the server hung.
        self.turn = asyncio.Lock()
        self.created = int(time.time())
        self.defaults = dataclasses.replace(sampling, max_new_tokens=min(sampling.max_new_tokens, max_tokens))

    def health(self):
        return {"status": "ok", "model": self.name}

    def models(self):
        return {
            "object": "list",
            "data": [{"id": self.name, "object": "model", "created": self.created, "owned_by": "lmforge"}],
        }

    async def completions(self, request: Request):
        body = await self.read_json(request, CompletionBody)
        params = self.settings(body)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise RequestError(400, "prompt: give a string or a non-empty list of strings")
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": now, "model": self.name}
        if body.stream:
            if len(prompts) != 1:
                raise RequestError(400, "stream=true takes a single prompt")
            usage = _wants_usage(body)
            return self.sse(_completion_chunks(head, self.events(prompts[0], params), usage))
        async with self.turn:
            done = await run_in_threadpool(self.llm.complete, prompts, params.max_new_tokens, params)
        choices = [
            {"text": c.text, "index": i, "logprobs": None, "finish_reason": c.finish_reason}
            for i, c in enumerate(done)
        ]
        return {**head, "choices": choices, "usage": _usage(done)}

    async def chat_completions(self, request: Request):
        body = await self.read_json(request, ChatBody)
        stream = self.events([m.model_dump() for m in body.messages], self.settings(body))
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion", "created": now, "model": self.name}
        if body.stream:
            return self.sse(
                _chat_chunks({**head, "object": "chat.completion.chunk"}, stream, _wants_usage(body))
            )
        async with self.turn:
            c = await run_in_threadpool(_last, stream)
        message = {"role": "assistant", "content": c.text}
        return {
            **head,
            "choices": [{"index": 0, "message": message, "finish_reason": c.finish_reason}],
            "usage": _usage([c]),
        }

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
            raise RequestError(400, _validation_message(e)) from e

    def settings(self, body: _Sampling) -> SamplingParams:
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
            given["max_new_tokens"] = body.max_tokens
        try:
            return dataclasses.replace(self.defaults, **given)
        except ValueError as e:
            raise RequestError(400, str(e)) from e

    def sse(self, chunks: Generator[dict, None, None]) -> StreamingResponse:
        """Server-sent events of the chunks, generated in this request's turn; a client that leaves ends
        the generation at the next piece (the stream is closed, which releases the LLM's lock)."""

        async def lines():
            async with self.turn:
                try:
                    while (chunk := await run_in_threadpool(next, chunks, None)) is not None:
                        yield f"data: {json.dumps(chunk)}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    chunks.close()

        return StreamingResponse(lines(), media_type="text/event-stream")

    def events(self, prompt: str | list[dict], params: SamplingParams) -> Iterator:
        """llm.stream_events (text pieces, then the Completion), with bad messages refused with 400."""
        try:
            return self.llm.stream_events(prompt, params.max_new_tokens, params, params.seed, params.stop)
        except GenerationError as e:
            raise RequestError(400, str(e)) from e


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


def _usage(done: list[Completion]) -> dict:
    p = sum(c.prompt_tokens for c in done)
    c = sum(len(x.token_ids) for x in done)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _wants_usage(body: _Sampling) -> bool:
    return bool((body.stream_options or {}).get("include_usage"))


def _completion_chunks(head: dict, stream: Iterator, usage: bool = False) -> Generator[dict, None, None]:
    """/v1/completions' stream: one chunk per text piece, the last one with the finish reason; with
    `usage`, then a chunk with no choices and the token counts (stream_options.include_usage)."""
    with contextlib.closing(stream):  # closed early too, when the client leaves
        for ev in stream:
            text, reason = (ev, None) if isinstance(ev, str) else ("", ev.finish_reason)
            yield {**head, "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": reason}]}
            if usage and not isinstance(ev, str):
                yield {**head, "choices": [], "usage": _usage([ev])}


def _chat_chunks(head: dict, stream: Iterator, usage: bool = False) -> Generator[dict, None, None]:
    """/v1/chat/completions' stream: the assistant role, one delta per text piece, then the finish reason
    (and, with `usage`, a chunk with no choices and the token counts)."""
    with contextlib.closing(stream):  # closed early too, when the client leaves
        yield {
            **head,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
        }
        for ev in stream:
            if isinstance(ev, str):
                yield {**head, "choices": [{"index": 0, "delta": {"content": ev}, "finish_reason": None}]}
            else:
                yield {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": ev.finish_reason}]}
                if usage:
                    yield {**head, "choices": [], "usage": _usage([ev])}
