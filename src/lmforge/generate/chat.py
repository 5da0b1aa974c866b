"""Chat on a base model: turns become a plain "User:/Assistant:" transcript that fits the context."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field, replace
from typing import Protocol

from .engine import Completion
from .sampling import SamplingParams

ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
# A reply ends where the model starts writing the next user turn.
STOP = ("\nUser:",)


def format_turns(turns: Sequence[tuple[str, str]]) -> str:
    """The transcript the model continues: one "Role: text" line per turn, then "Assistant:"."""
    lines = [f"{ROLES[role]}: {text.strip()}" for role, text in turns]
    return "\n".join([*lines, "Assistant:"])


def fit_turns(
    turns: Sequence[tuple[str, str]], count: Callable[[str], int], budget: int
) -> list[tuple[str, str]]:
    """Drop the oldest turns (a system turn first is kept) until the transcript takes <= budget tokens.

    The newest turn is always kept; if it alone is too long the engine cuts it from the left.
    """
    turns = list(turns)
    system = turns[:1] if turns and turns[0][0] == "system" else []
    rest = turns[len(system) :]
    while len(rest) > 1 and count(format_turns(system + rest)) > budget:
        rest = rest[1:]
    if system and count(format_turns(system + rest)) > budget:
        system = []
    return system + rest


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

    Replies come from `llm.stream_events`, which fits the transcript to the context, stops at the next
    user turn and holds the model's lock while it replies (a server may share the same LLM).
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
            self.history += [("user", message), ("assistant", "".join(pieces).strip())]


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
