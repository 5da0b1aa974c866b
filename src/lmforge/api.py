"""The Python API: `from lmforge import LLM; llm = LLM.load("runs/quickstart"); llm.generate("def ")`.

`LLM` is the one door to a loaded model: `lmforge generate` and `chat`, the HTTP server and Python code
all go through its methods, which hold its lock while they generate. A run whose tokenizer holds the chat
template's tokens (a fine-tuned run) chats through the template; a base run through a plain transcript
(generate/chat.py).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from .checkpoint import load_model, tokenizer_path
from .data import Tokenizer
from .data.chat_template import ChatTemplate
from .device import one_intra_op_thread, pick_device
from .errors import LmforgeError
from .generate.batch import check_output_path, generate_batches, records, write_results
from .generate.chat import ChatPrompt, ChatSession, TrimmedReply, chat_prompt, repl
from .generate.continuous import Scheduler
from .generate.engine import (
    NO_CONTROL,
    Completion,
    ControlIds,
    Prompt,
    generate_texts,
    prompt_ids,
    stream_texts,
)
from .generate.layout import use_inference_layout
from .generate.sampling import SamplingParams
from .model import GPT


class GenerationError(LmforgeError, ValueError):
    """Sampling settings or inputs that cannot be used."""


# The one set of sampling defaults (generate/params.py): every method below takes its defaults from it.
DEFAULT = SamplingParams()


def sampling_params(**settings) -> SamplingParams:
    """SamplingParams of the given settings (the rest default), a bad value raised as a GenerationError."""
    try:
        return SamplingParams(**settings)
    except (TypeError, ValueError) as e:
        raise GenerationError(str(e)) from e


class LLM:
    """A trained run ready to generate: a model in eval mode, its tokenizer, its chat template (None for a
    base run), and a lock for threads."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, name: str = "lmforge") -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.template = ChatTemplate.of(tokenizer)
        self.checkpoint: Path | None = None  # the checkpoint directory LLM.load read (its meta.json: tokens)
        # One generation at a time: the server's worker threads share this object.
        self.lock = threading.Lock()
        self._scheduler: Scheduler | None = None

    @classmethod
    def load(cls, run: str | Path, device: str = "auto", quantize: str | None = None) -> LLM:
        """Load RUN_DIR (its latest checkpoint) or a checkpoint directory.

        quantize="int8" swaps linear layers for int8 weight-only ones (needs lmforge.generate.quant).
        """
        try:
            dev = pick_device(device)
        except ValueError as e:
            raise GenerationError(
                str(e).replace("--train.device", "--device").replace("train.device", "--device")
            ) from e
        if quantize is not None and quantize != "int8":
            raise GenerationError(f"quantize={quantize!r}: the only choice is int8")
        with one_intra_op_thread():  # the caller's thread may hand the model to the batcher's
            model, _, ckpt = load_model(run, device=dev)
            # The decoding layout is this object's own: load_model gives every other reader (eval's
            # scoring, export) the plain model. Before int8, so int8 weights keep the memory order they
            # have always had (one-row products round differently in the other; `lmforge eval
            # --quantize int8` does the same).
            use_inference_layout(model)
            if quantize is not None:
                try:
                    from .generate.quant import quantize_int8
                except ImportError as e:
                    raise GenerationError("int8 quantization is not available in this build") from e
                model = quantize_int8(model)
        llm = cls(model, Tokenizer.load(tokenizer_path(Path(run))), name=Path(run).resolve().name)
        llm.checkpoint = ckpt
        return llm

    @property
    def context_len(self) -> int:
        """Tokens the model sees at once (prompt plus reply)."""
        return self.model.cfg.context_len

    def generate(
        self,
        prompt: str | Sequence[str],
        max_new_tokens: int = DEFAULT.max_new_tokens,
        temperature: float = DEFAULT.temperature,
        top_k: int | None = DEFAULT.top_k,
        top_p: float | None = DEFAULT.top_p,
        min_p: float | None = DEFAULT.min_p,
        repetition_penalty: float = DEFAULT.repetition_penalty,
        frequency_penalty: float = DEFAULT.frequency_penalty,
        presence_penalty: float = DEFAULT.presence_penalty,
        stop: Sequence[str] | str | None = None,
        seed: int | None = None,
    ) -> str | list[str]:
        """The continuation of a prompt (a str), or of each prompt of a list (a list, decoded as a batch)."""
        params = sampling_params(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
            max_new_tokens=max_new_tokens,
            stop=_stops(stop),
            seed=seed,
        )
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        done = self.complete(prompts, max_new_tokens, params, seed, stop)
        texts = [c.text for c in done]
        return texts[0] if isinstance(prompt, str) else texts

    def complete(
        self,
        prompts: Sequence[Prompt],
        max_new_tokens: int,
        params: SamplingParams,
        seed: int | None = None,
        stop: Sequence[str] | str | None = None,
    ) -> list[Completion]:
        """Completions (text, tokens, finish reason) of a batch of prompts, each a text or its token ids;
        seed and stop: params' if None."""
        seed, stop = _given_or(params, seed, stop)
        with self.lock:
            return generate_texts(
                self.model, self.tokenizer, prompts, max_new_tokens, params, seed, _stops(stop)
            )

    def loglikelihoods(
        self,
        pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
        batch_size: int = 8,
        window: int | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> list[tuple[float, bool]]:
        """(log-probability, is greedy) of each continuation after its context, for (context ids,
        continuation ids) pairs, scored batch_size at a time over at most `window` tokens (default: the
        context); what multiple-choice and perplexity evaluations (lm-evaluation-harness) ask of a model."""
        from .eval.metrics import continuation_logprobs

        with self.lock:
            return continuation_logprobs(self.model, pairs, batch_size, window, on_batch)

    def stream(
        self,
        prompt: str,
        max_new_tokens: int = DEFAULT.max_new_tokens,
        temperature: float = DEFAULT.temperature,
        top_k: int | None = DEFAULT.top_k,
        top_p: float | None = DEFAULT.top_p,
        min_p: float | None = DEFAULT.min_p,
        repetition_penalty: float = DEFAULT.repetition_penalty,
        frequency_penalty: float = DEFAULT.frequency_penalty,
        presence_penalty: float = DEFAULT.presence_penalty,
        stop: Sequence[str] | str | None = None,
        seed: int | None = None,
    ) -> Iterator[str]:
        """Yield the continuation of prompt as text pieces, as they are generated."""
        params = sampling_params(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
            max_new_tokens=max_new_tokens,
            stop=_stops(stop),
            seed=seed,
        )
        return self.stream_params(prompt, max_new_tokens, params, seed, stop)

    def stream_params(
        self,
        prompt: str,
        max_new_tokens: int,
        params: SamplingParams,
        seed: int | None = None,
        stop: Sequence[str] | str | None = None,
    ) -> Iterator[str]:
        """stream() with ready SamplingParams; holds the lock until the stream ends or is closed."""
        events = self.stream_events(prompt, max_new_tokens, params, seed, stop)
        try:
            for event in events:
                if isinstance(event, str):
                    yield event
        finally:
            events.close()

    def stream_events(
        self,
        prompt: str | Sequence[dict],
        max_new_tokens: int,
        params: SamplingParams,
        seed: int | None = None,
        stop: Sequence[str] | str | None = None,
    ) -> Iterator[str | Completion]:
        """Text pieces as they are generated, then the Completion (finish reason, token counts); its text is
        the pieces joined.

        prompt: a text to continue, or OpenAI-style messages [{"role", "content"}] to reply to, fitted to
        the context (`chat_prompt`): with the run's chat template, the reply ends at the end-of-turn token;
        without one, at the transcript's next user turn, the whitespace around it left out. Bad messages
        raise GenerationError at the call, before anything runs; the lock is held from the first piece
        until the stream ends or is closed. seed and stop: params' if None.
        """
        seed, stop = _given_or(params, seed, stop)
        if isinstance(prompt, str):
            return self._events(prompt, max_new_tokens, params, seed, _stops(stop), NO_CONTROL, False)
        chat = self.chat_prompt(prompt, max_new_tokens)
        stops = [*chat.stop, *_stops(stop)]
        return self._events(chat.prompt, max_new_tokens, params, seed, stops, chat.control, chat.trim)

    def _events(
        self,
        prompt: Prompt,
        max_new_tokens: int,
        params: SamplingParams,
        seed: int | None,
        stop: list[str],
        control: ControlIds,
        trim: bool,
    ) -> Iterator[str | Completion]:
        pieces: list[str] = []
        reply = TrimmedReply() if trim else None
        with self.lock:
            for event in stream_texts(
                self.model, self.tokenizer, [prompt], max_new_tokens, params, seed, stop, control
            ):
                if isinstance(event, list):  # the last event: the Completions of the batch of one
                    done = event[0]
                    break
                piece = reply.push(event[1]) if reply is not None else event[1]
                if piece:
                    pieces.append(piece)
                    yield piece
        # After the lock is released: a caller that stops at the Completion does not keep others waiting.
        # Its text is what was streamed, so streaming or not gives one text.
        yield dataclasses.replace(done, text="".join(pieces))

    def request_fields(
        self,
        prompt: str | Sequence[int] | Sequence[dict],
        max_new_tokens: int,
        params: SamplingParams,
        seed: int | None = None,
        stop: Sequence[str] | str | None = None,
    ) -> tuple[dict, bool]:
        """One generation as the continuous batcher (`scheduler()`) takes it: the fields of its
        `Request` (prompt ids, stops, end and banned ids), and whether the reply is a transcript reply
        whose surrounding whitespace is trimmed (`TrimmedReply`). prompt: a text, token ids, or
        messages, as `stream_events` takes them."""
        seed, stop = _given_or(params, seed, stop)
        if isinstance(prompt, str) or (prompt and not isinstance(prompt[0], dict)):
            ids, stops, control, trim = prompt_ids(self.tokenizer, prompt), _stops(stop), NO_CONTROL, False
        else:
            chat = self.chat_prompt(prompt, max_new_tokens)
            ids = prompt_ids(self.tokenizer, chat.prompt)
            stops, control, trim = [*chat.stop, *_stops(stop)], chat.control, chat.trim
        fields = dict(
            prompt_ids=ids,
            max_new_tokens=max_new_tokens,
            params=params,
            seed=seed,
            stop=stops,
            stop_ids=sorted(control.stop | {self.tokenizer.eos_id}),
            banned_ids=sorted(control.banned),
        )
        return fields, trim

    def scheduler(
        self, max_rows: int = 8, max_queue: int = 64, threads: int | None = None, hold: float | None = None
    ) -> Scheduler:
        """The continuous batcher over this model (made on first call, and again after it was closed;
        other calls return it as it is): requests submitted to it decode together, sharing the model's
        lock with this object's other methods. threads: the decode thread's intra-op threads (see
        `lmforge.serve.serve` for why a server sets them there). hold: the longest wait, in seconds, for
        requests to take rows a step freed (None: one step's time; 0: never wait; see continuous.py)."""
        if self._scheduler is None or self._scheduler.closed:
            self._scheduler = Scheduler(
                self.model, self.tokenizer, max_rows, max_queue, lock=self.lock, threads=threads, hold=hold
            )
        return self._scheduler

    def batch_generate(
        self,
        prompts: Sequence[str],
        output_file: str | Path | None = None,
        max_new_tokens: int = DEFAULT.max_new_tokens,
        temperature: float = DEFAULT.temperature,
        top_k: int | None = DEFAULT.top_k,
        top_p: float | None = DEFAULT.top_p,
        min_p: float | None = DEFAULT.min_p,
        repetition_penalty: float = DEFAULT.repetition_penalty,
        frequency_penalty: float = DEFAULT.frequency_penalty,
        presence_penalty: float = DEFAULT.presence_penalty,
        stop: Sequence[str] | str | None = None,
        seed: int | None = None,
        batch_size: int = 8,
        on_batch: Callable[[int], None] | None = None,
        chat: bool = False,
    ) -> list[dict]:
        """Generate for many prompts, batch_size at a time; rows of prompt, completion, finish_reason and
        token counts, also written to output_file (.json, .jsonl, .csv or .txt) when given. chat: each
        prompt is a user message, and its completion the reply (as `chat` gives it)."""
        params = sampling_params(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
            max_new_tokens=max_new_tokens,
            stop=_stops(stop),
            seed=seed,
        )
        if output_file is not None:
            check_output_path(output_file)  # fail before the work, not after
        user = [[{"role": "user", "content": p}] for p in prompts] if chat else []
        chats = [self.chat_prompt(messages, max_new_tokens) for messages in user]
        # Every chat prompt of one run ends its reply alike: one set of stops and controls for the batch.
        how = chats[0] if chats else ChatPrompt("")
        inputs = [c.prompt for c in chats] if chat else list(prompts)
        with self.lock:
            done = generate_batches(
                self.model,
                self.tokenizer,
                inputs,
                max_new_tokens,
                params,
                seed,
                [*how.stop, *_stops(stop)],
                batch_size,
                on_batch,
                how.control,
            )
        if how.trim:
            done = [dataclasses.replace(c, text=c.text.strip()) for c in done]
        rows = records(prompts, done)
        if output_file is not None:
            write_results(output_file, rows)
        return rows

    def chat_prompt(self, messages: Sequence[dict], max_new_tokens: int) -> ChatPrompt:
        """The prompt for a reply to OpenAI-style messages [{"role", "content"}], fitted to the context
        with room for max_new_tokens (at most half the context): the chat template's ids (a fine-tuned
        run), or a base run's "User:/Assistant:" transcript."""
        turns = []
        for m in messages:
            role, content = m.get("role"), m.get("content")
            if role not in ("system", "user", "assistant") or not isinstance(content, str):
                raise GenerationError(
                    "each message needs a role (system, user or assistant) and a string content"
                )
            turns.append((role, content))
        budget = self.context_len - min(max_new_tokens, self.context_len // 2)
        return chat_prompt(self.tokenizer, self.template, turns, budget)

    def chat(
        self,
        messages: Sequence[dict] | None = None,
        max_new_tokens: int = DEFAULT.max_new_tokens,
        temperature: float = DEFAULT.temperature,
        top_k: int | None = DEFAULT.top_k,
        top_p: float | None = DEFAULT.top_p,
        seed: int | None = None,
    ) -> str | None:
        """With messages (OpenAI style), return the assistant's reply; without, run the interactive chat."""
        params = sampling_params(
            temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed
        )
        if messages is None:
            repl(self.session(max_new_tokens, params, seed))
            return None
        *_, done = self.stream_events(messages, max_new_tokens, params, seed)
        return done.text

    def session(
        self,
        max_new_tokens: int = DEFAULT.max_new_tokens,
        params: SamplingParams | None = None,
        seed: int | None = None,
    ) -> ChatSession:
        """A ChatSession over this model (history within the context window, streaming replies)."""
        return ChatSession(self, params or DEFAULT, max_new_tokens, seed)


def _stops(stop: Sequence[str] | str | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def _given_or(params: SamplingParams, seed: int | None, stop: Sequence[str] | str | None) -> tuple:
    """(seed, stop) as given, or the params' own where not given."""
    return (params.seed if seed is None else seed), (params.stop if stop is None else stop)
