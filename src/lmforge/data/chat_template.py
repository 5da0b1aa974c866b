"""The one chat template: conversations as token ids, with the loss mask instruction tuning trains on.

A conversation is rendered as

    <|endoftext|> <|system|> text <|end|> <|user|> text <|end|> <|assistant|> text <|end|> ...

The leading end-of-text token is the document boundary the base model learned in pretraining (prepared
token streams separate documents with it), so a conversation starts where a document would. Every turn
is its role's token, its text, and the end-of-turn token; a reply is finished when the model writes
`<|end|>`. The role and end tokens are special tokens that only this module emits: text from a message
is encoded as text, so a user who types "<|assistant|>" gets those characters, never the control token.

`render()` returns the ids and a loss mask aligned with them: 1 where the token is one the model learns
to write (an assistant turn's text and its `<|end|>`), 0 elsewhere. The Jinja version of the template
(`JINJA`) is what the Hugging Face export writes, and gives the same ids through
`tokenizer.apply_chat_template`; `tests/test_chat_template.py` holds the two to each other.

Training data, fine-tuning, generation, the server and the exports all come here; this module imports
only the tokenizer wrapper.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from lmforge.data.errors import DataError
from lmforge.data.tokenizer import Tokenizer
from lmforge.data.tokenizer_kinds import EOS_TOKEN

TEMPLATE_NAME = "lmforge-chat-v1"
ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {role: f"<|{role}|>" for role in ROLES}
END_TOKEN = "<|end|>"
SPECIAL_TOKENS = (*ROLE_TOKENS.values(), END_TOKEN)

# The same template for transformers' apply_chat_template (Jinja, rendered to text, then tokenized with the
# special tokens recognised). An empty system message is left out, as render() leaves it out.
JINJA = (
    "{{ '" + EOS_TOKEN + "' }}"
    "{% for message in messages %}"
    "{% if message['role'] != 'system' or message['content'] %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '" + END_TOKEN + "' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + ROLE_TOKENS["assistant"] + "' }}{% endif %}"
)

Message = Mapping[str, str]


def has_chat_tokens(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer holds every special token of the template."""
    return all(tokenizer.hf.token_to_id(token) is not None for token in SPECIAL_TOKENS)


def with_chat_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer with the template's special tokens; a new one with them added after the existing
    ids when it lacks any (the ids of everything it had stay the same)."""
    if has_chat_tokens(tokenizer):
        return tokenizer
    grown = HFTokenizer.from_str(tokenizer.hf.to_str())
    missing = [t for t in SPECIAL_TOKENS if grown.token_to_id(t) is None]
    grown.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    return Tokenizer(grown)


def message_problem(messages: object) -> str | None:
    """Why a conversation cannot be trained on ("unknown role", "empty content", "no assistant turn",
    "wrong order", "not a conversation"), or None when it can.

    A trainable conversation is an optional system message, then user and assistant turns taking turns,
    starting with the user and ending with the assistant.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        return "not a conversation"
    for message in messages:
        if not isinstance(message, Mapping) or not isinstance(message.get("content"), str):
            return "not a conversation"
        if message.get("role") not in ROLES:
            return "unknown role"
        if not message["content"].strip() and message["role"] != "system":
            return "empty content"
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        return "no assistant turn"
    turns = roles[1:] if roles[0] == "system" else roles
    expected = ["user", "assistant"] * (len(turns) // 2 + 1)
    if len(turns) % 2 or turns != expected[: len(turns)]:
        return "wrong order"
    return None


class ChatTemplate:
    """Renders conversations for one tokenizer that holds the template's special tokens."""

    name = TEMPLATE_NAME

    def __init__(self, tokenizer: Tokenizer) -> None:
        if not has_chat_tokens(tokenizer):
            raise DataError(
                "this tokenizer has no chat tokens (" + ", ".join(SPECIAL_TOKENS) + "): fine-tune the run "
                "on conversations (`lmforge prepare --chat`, then `lmforge finetune`) to give it a template"
            )
        self.tokenizer = tokenizer
        self.role_ids = {role: int(tokenizer.hf.token_to_id(tok)) for role, tok in ROLE_TOKENS.items()}
        self.end_id = int(tokenizer.hf.token_to_id(END_TOKEN))
        self.start_id = tokenizer.eos_id

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> ChatTemplate | None:
        """The template for this tokenizer, or None when it has no chat tokens (a base model)."""
        return cls(tokenizer) if has_chat_tokens(tokenizer) else None

    @property
    def special_ids(self) -> set[int]:
        """Ids of the template's control tokens (roles and end of turn)."""
        return {*self.role_ids.values(), self.end_id}

    def render(
        self, messages: Sequence[Message], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """(ids, loss_mask) of a conversation; with ``add_generation_prompt`` the ids end with the
        assistant's role token, ready for the model to write the reply."""
        ids, mask = [self.start_id], [0]
        for message in messages:
            role, content = message["role"], message["content"]
            if role not in self.role_ids:
                raise DataError(f"unknown chat role {role!r}: use one of {', '.join(ROLES)}")
            if role == "system" and not content:
                continue
            text = self.tokenizer.encode(content) if content else []
            learn = 1 if role == "assistant" else 0
            ids += [self.role_ids[role], *text, self.end_id]
            mask += [0, *[learn] * len(text), learn]
        if add_generation_prompt:
            ids.append(self.role_ids["assistant"])
            mask.append(0)
        return ids, mask

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        """The ids a reply to ``messages`` is generated after."""
        return self.render(messages, add_generation_prompt=True)[0]
