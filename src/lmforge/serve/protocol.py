"""The OpenAI wire format the server speaks: request bodies, errors, responses and stream chunks.

Honoured request fields: model (must name the served model), prompt (text, list of texts, token ids, or
lists of token ids), messages (content as text or a list of text parts), max_tokens /
max_completion_tokens, temperature, top_p, top_k, min_p, repetition_penalty, frequency_penalty,
presence_penalty, logit_bias (token ids to biases in [-100, 100], at most 300), stop, seed, n, stream,
stream_options.include_usage, logprobs (completions: an int, the top alternatives; chat: a bool, with
top_logprobs), echo (completions; max_tokens 0 with it scores the prompt and draws nothing), best_of
(completions: the n of best_of with the highest log-probability per token). Refused with a 400: content
parts other than text, token ids outside the vocabulary, a prompt plus max_tokens longer than the context,
a suffix, best_of below n or with stream, a response_format other than text, a tool_choice that
requires a tool call. Accepted and ignored: every other field (user, tools, ...).
docs/using.md lists them.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..generate.engine import Completion
from ..generate.params import SamplingParams

DEFAULT = SamplingParams()  # the one set of sampling defaults; `lmforge serve`'s flags may change them
# Request fields that are sampling settings of the same name; max_tokens is max_new_tokens.
SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "stop",
    "seed",
)
# Generations one request may ask for (prompts x n): more would hold every row of the batch.
MAX_CHOICES = 16
# Tokens one request's logit_bias may name (OpenAI's limit).
MAX_LOGIT_BIAS = 300


class Sampling(BaseModel):
    """Fields shared by both endpoints; fields this server does not know are ignored.

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
    frequency_penalty: float = Field(default=DEFAULT.frequency_penalty, ge=-2.0, le=2.0)
    presence_penalty: float = Field(default=DEFAULT.presence_penalty, ge=-2.0, le=2.0)
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stream_options: dict | None = None  # {"include_usage": true}: a last chunk with the token counts
    # {"token id": bias}: added to those tokens' logits before each draw (-100 bans, 100 all but forces)
    logit_bias: dict[str, float] | None = Field(default=None, max_length=MAX_LOGIT_BIAS)

    def token_bias(self) -> dict[int, float] | None:
        """logit_bias with its keys as token ids; a 400 for a key that is not one or a bias past +-100."""
        if not self.logit_bias:
            return None
        bias = {}
        for key, value in self.logit_bias.items():
            try:
                token = int(key)
            except ValueError:
                raise RequestError(400, f"logit_bias: '{key}' is not a token id (a whole number)") from None
            if not -100 <= value <= 100:  # NaN fails too
                raise RequestError(400, f"logit_bias: {value} for token {key} is outside [-100, 100]")
            bias[token] = value
        return bias


class CompletionBody(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)  # the top alternatives per token
    echo: bool = False  # the prompt in front of the text (and its tokens' logprobs in front of the rest)
    max_tokens: int | None = Field(default=None, ge=0)  # 0 only with echo: score the prompt, draw nothing
    best_of: int | None = Field(default=None, ge=1, le=MAX_CHOICES)  # drawn per prompt; the best n returned
    suffix: str | None = None  # text after an insertion: refused (these models only continue a prompt)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str = Field(pattern="^(system|developer|user|assistant)$")  # developer: OpenAI's newer system
    content: str | list[TextPart]

    def turn(self) -> dict:
        """The message as a chat turn: its role (a developer message is a system one) and its text."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}

    def text(self) -> str:
        """The content as one text: a list of text parts joined by newlines."""
        if isinstance(self.content, str):
            return self.content
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise RequestError(400, f"messages: content part of type '{part.type}': only text is served")
        return "\n".join(part.text for part in self.content)


class ChatBody(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: dict | None = None  # {"type": "text"} only: replies are not constrained
    tools: list | None = None  # accepted: the model may always answer in text instead of calling one
    tool_choice: str | dict | None = None

    def check_unserved(self) -> None:
        """400 for what the server cannot do: JSON-constrained replies, or a tool call it must make."""
        kind = (self.response_format or {}).get("type", "text")
        if kind != "text":
            raise RequestError(
                400,
                f"response_format type '{kind}': this server does not constrain replies to JSON; leave "
                "response_format out and ask for JSON in the messages",
            )
        if self.tools and self.tool_choice not in (None, "auto", "none"):
            raise RequestError(
                400, "tool_choice: this server does not call tools; give 'auto' or 'none' (replies are text)"
            )


class RequestError(Exception):
    """A request the server refuses: HTTP status, a message for the client, and extra headers."""

    def __init__(self, status: int, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """OpenAI's error shape."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


def validation_message(err: ValidationError | RequestValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
    return "invalid request: " + "; ".join(parts)


def prompts_of(body: CompletionBody) -> list[str | list[int]]:
    """The prompts of a completions request: texts or token-id lists."""
    prompt = body.prompt
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], int):
        return [list(prompt)]
    if not prompt:
        raise RequestError(400, "prompt: give a string, a list of strings, or token ids")
    return list(prompt)


def usage(done: Sequence[Completion], per_prompt: int = 1) -> dict:
    """Token counts of choices in order, per_prompt of them to each prompt: a prompt counts once (as
    OpenAI counts it), however many choices it has."""
    p = sum(c.prompt_tokens for c in done[::per_prompt])
    c = sum(len(x.token_ids) for x in done)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def chat_logprobs(done: Completion, skip: int = 0) -> dict | None:
    """A chat choice's logprobs: {"content": [{token, logprob, bytes, top_logprobs}]}, the content's tokens
    only (not the end of the turn), after the first `skip` (those a stream's pieces carried)."""
    if done.logprobs is None:
        return None
    return {"content": done.logprobs[skip : len(done.token_ids)], "refusal": None}


def completion_logprobs(entries: list[dict] | None, at: int = 0) -> dict | None:
    """logprobs entries in the completions' legacy layout (tokens, token_logprobs, top_logprobs as
    {token: logprob}, text_offset counted from `at`); an echoed prompt's first token has None for both."""
    if entries is None:
        return None
    offsets = []
    for entry in entries:
        offsets.append(at)
        at += len(entry["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [
            None if e["top_logprobs"] is None else {t["token"]: t["logprob"] for t in e["top_logprobs"]}
            for e in entries
        ],
        "text_offset": offsets,
    }
