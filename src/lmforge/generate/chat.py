"""Chat: a conversation becomes the prompt a reply is generated from, fitted to the context.

A run whose tokenizer holds the chat template's tokens (a fine-tuned run) gets the template's ids
(`lmforge.data.chat_template`): the reply is written after the assistant's role token and ends at the
end-of-turn token, and role tokens are never sampled inside it. A base run gets a plain "User:/Assistant:"
transcript, and its reply ends where the model starts a new "User:" line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from ..data.chat_template import ChatTemplate
from .engine import NO_CONTROL, Completion, ControlIds
from .sampling import SamplingParams

ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
# A reply ends where the model starts writing the next user turn.
STOP = ("\nUser:",)


def format_turns(turns: Sequence[tuple[str, str]]) -> str:
    """The transcript the model continues: one "Role: text" line per turn, then "Assistant:"."""
    lines = [f"{ROLES[role]}: {text.strip()}" for role, text in turns]
    return "\n".join([*lines, "Assistant:"])


def fit_turns(
    turns: Sequence[tuple[str, str]],
    count: Callable[[Any], int],
    budget: int,
    render: Callable[[list[tuple[str, str]]], Any] = format_turns,
) -> list[tuple[str, str]]:
    """Drop the oldest turns (a system turn first is kept) until count(render(turns)) <= budget: the
    transcript's tokens by default, or a template's ids (render) counted with len.

    The newest turn is always kept; if it alone is too long the engine cuts it from the left.
    """
    turns = list(turns)
    system = turns[:1] if turns and turns[0][0] == "system" else []
    rest = turns[len(system) :]
    while len(rest) > 1 and count(render(system + rest)) > budget:
        rest = rest[1:]
    if system and count(render(system + rest)) > budget:
        system = []
    return system + rest


@dataclass(frozen=True)
class ChatPrompt:
    """What a reply to a conversation is generated from, and how the reply ends.

    prompt: the template's ids, or a base run's transcript text; stop: stop strings (the transcript's
    next "User:" line); control: the template's end of turn (ends the reply) and role tokens (never
    sampled); trim: leave out the whitespace around the reply (the space after the transcript's
    "Assistant:"), streamed or not (`TrimmedReply`).
    """

    prompt: str | list[int]
    stop: tuple[str, ...] = ()
    control: ControlIds = NO_CONTROL
    trim: bool = False


def chat_prompt(
    tokenizer, template: ChatTemplate | None, turns: Sequence[tuple[str, str]], budget: int
) -> ChatPrompt:
    """The prompt for a reply to turns [(role, text)], keeping at most `budget` tokens of it (the oldest
    turns dropped first, the system turn kept): the template's ids, or without one the transcript."""
    if template is None:
        kept = fit_turns(turns, lambda text: len(tokenizer.encode(text)), budget)
        return ChatPrompt(format_turns(kept), STOP, trim=True)

    def ids(kept: list[tuple[str, str]]) -> list[int]:
        return template.prompt_ids([{"role": role, "content": text} for role, text in kept])

    control = ControlIds.of(stop=[template.end_id], banned=template.role_ids.values())
    return ChatPrompt(ids(fit_turns(turns, len, budget, ids)), control=control)


class TrimmedReply:
    """A transcript reply's pieces without the whitespace around the reply: leading whitespace is dropped
    and trailing whitespace is held back until text follows it, so the pieces streamed join to exactly
    the text a caller that does not stream gets (the two differed by trailing whitespace)."""

    def __init__(self) -> None:
        self.held = ""
        self.started = False

    def push(self, piece: str) -> str:
        """The part of the next piece that is sure to be inside the reply (possibly empty)."""
        text = self.held + (piece if self.started else piece.lstrip())
        self.started = self.started or bool(text)
        body = text.rstrip()
        self.held = text[len(body) :]
        return body


class Replier(Protocol):
    """What a ChatSession talks to: `lmforge.LLM`, the one door to a loaded model."""

    def stream_events(
        self,
        prompt: str | Sequence[dict],
        max_new_tokens: int,
        params: SamplingParams,
        seed: int | None = None,
        stop: Sequence[str] | str | None = None,
    ) -> Iterator[str | Completion]: ...


@dataclass
class ChatSession:
    """A conversation with history kept within the context window: send() streams the reply.

    Replies come from `llm.stream_events`, which fits the conversation to the context, stops at the end
    of the reply and holds the model's lock while it replies (a server may share the same LLM).
    """

    llm: Replier
    params: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = 128
    seed: int | None = None
    system: str | None = None
    history: list[tuple[str, str]] = field(default_factory=list)

    def reset(self) -> None:
        """Forget the conversation (the system turn stays)."""
        self.history.clear()

    def set_temperature(self, value: float) -> None:
        """Change the sampling temperature (0 is greedy)."""
        self.params = replace(self.params, temperature=value)

    def messages(self, message: str) -> list[dict]:
        """The conversation so far and the new message, as OpenAI-style messages."""
        turns = ([("system", self.system)] if self.system else []) + [*self.history, ("user", message)]
        return [{"role": role, "content": text} for role, text in turns]

    def send(self, message: str) -> Iterator[str]:
        """Stream the reply to message; the reply (what was produced, even if stopped early) joins history."""
        pieces: list[str] = []
        try:
            # closing(): a reply stopped early (Ctrl-C) ends its stream now, which releases the lock.
            with closing(
                self.llm.stream_events(self.messages(message), self.max_new_tokens, self.params, self.seed)
            ) as events:
                for event in events:
                    if isinstance(event, str):
                        pieces.append(event)
                        yield event
        finally:
            # The pieces are the reply as the model wrote it (a transcript reply already trimmed).
            self.history += [("user", message), ("assistant", "".join(pieces))]


HELP = "commands: /reset (forget the conversation), /temperature X, /quit (or Ctrl-D); Ctrl-C stops a reply"


def repl(
    session: ChatSession,
    read: Callable[[str], str] = input,
    write: Callable[[str], None] | None = None,
) -> None:
    """The interactive loop: read a line, run a command or stream a reply. Ctrl-C stops only the reply."""

    def out(text: str) -> None:
        if write is not None:
            write(text)
        else:
            print(text, end="", flush=True)

    out(f"chat with the model ({HELP})\n")
    while True:
        try:
            line = read("> ")
        except EOFError:
            out("\n")
            return
        except KeyboardInterrupt:  # at the prompt: a fresh line, still in the chat
            out("\n")
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            if cmd in ("/quit", "/exit"):
                return
            if cmd == "/reset":
                session.reset()
                out("(conversation cleared)\n")
            elif cmd == "/temperature":
                try:
                    session.set_temperature(float(arg))
                    out(f"(temperature {session.params.temperature})\n")
                except ValueError:
                    out(f"(/temperature needs a number >= 0, got '{arg}')\n")
            else:
                out(f"(unknown command {cmd}; {HELP})\n")
            continue
        reply = session.send(line)
        try:
            for piece in reply:
                out(piece)
            out("\n")
        except KeyboardInterrupt:
            reply.close()  # keeps what was said so far in the history
            out(" [stopped]\n")
