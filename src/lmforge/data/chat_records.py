"""Conversations in the record formats instruction-tuning data comes in, read as one list of messages.

Told apart record by record:

    OpenAI    {"messages": [{"role": "user", "content": "..."}, ...]}      content may be a list of text parts
    ShareGPT  {"conversations": [{"from": "human", "value": "..."}, ...]}  from: system, human/user, gpt/assistant
    Alpaca    {"instruction": "...", "input": "...", "output": "..."}      instruction and input are the user turn

A record that is none of these (`unknown_format`), or whose conversation the chat template cannot train on
(`unknown_role`, `empty_content`, `no_assistant_turn`, `wrong_order`), is skipped and counted under that
reason, as prepare counts every input it cannot use. A conversation travels through prepare's document
stream (duplicates, mixtures, --max-docs, the split by name) as a Document whose text is its messages in
canonical JSON; `render_chunk` turns a chunk of them into token ids and loss masks in the encoding workers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from lmforge.data.chat_template import ChatTemplate, message_problem
from lmforge.data.files import JSON_EXTENSIONS, Document, RecordFormat, count_skip, make_doc
from lmforge.data.tokenizer import Tokenizer

# chat_template.message_problem's words -> the skip reasons prepare counts (one word each, like the others).
_REASONS = {
    "unknown role": "unknown_role",
    "empty content": "empty_content",
    "no assistant turn": "no_assistant_turn",
    "wrong order": "wrong_order",
    "not a conversation": "unknown_format",
}
SKIP_REASONS = ("unknown_format", "unknown_role", "empty_content", "no_assistant_turn", "wrong_order")
# ShareGPT's speakers; "user" and "assistant" are common in its exports too.
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
# The only parquet columns a conversation is read from: a table's other columns are never loaded.
_COLUMNS = ("messages", "conversations", "instruction", "input", "output", "system")


def _text(content: Any) -> str | None:
    """A message's text: a string, OpenAI's list of text parts joined, "" for none (a tool call's)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    return None


def _turns(items: Any, role_key: str, text_key: str, roles: dict[str, str] | None) -> list | str:
    """Messages from a list of {role_key, text_key} objects, or "unknown_format"."""
    if not isinstance(items, list):
        return "unknown_format"
    messages = []
    for item in items:
        if not isinstance(item, dict):
            return "unknown_format"
        role, text = item.get(role_key, item.get("role")), _text(item.get(text_key, item.get("content")))
        if not isinstance(role, str) or text is None:
            return "unknown_format"
        messages.append({"role": roles.get(role, role) if roles else role, "content": text})
    return messages


def _alpaca(record: dict) -> list | str:
    instruction, extra, output = record.get("instruction"), record.get("input"), record.get("output")
    system = record.get("system")
    if (
        not isinstance(instruction, str)
        or not isinstance(extra, str | None)
        or not isinstance(system, str | None)
    ):
        return "unknown_format"
    if output is None:
        return "no_assistant_turn"
    if not isinstance(output, str):
        return "unknown_format"
    user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": user}, {"role": "assistant", "content": output}]


def messages_of(record: Any) -> list[dict[str, str]] | str:
    """The conversation of one record in any of the formats, or the skip reason why it has none."""
    if not isinstance(record, dict):
        return "unknown_format"
    if "messages" in record:
        messages = _turns(record["messages"], "role", "content", None)
    elif "conversations" in record:
        messages = _turns(record["conversations"], "from", "value", _SHAREGPT_ROLES)
    elif "instruction" in record:
        messages = _alpaca(record)
    else:
        return "unknown_format"
    if isinstance(messages, str):
        return messages
    problem = message_problem(messages)
    return messages if problem is None else _REASONS[problem]


def conversation_text(messages: Sequence[dict[str, str]]) -> str:
    """The canonical JSON a conversation travels as (only role and content, no whitespace)."""
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    return json.dumps(plain, ensure_ascii=False, separators=(",", ":"))


def chat_document(
    name: str, messages: Sequence[dict[str, str]], skipped: dict[str, int] | None
) -> Document | None:
    """The document of a valid conversation (None, counted as too_large, past the document cap)."""
    return make_doc(name, conversation_text(messages), skipped)


class ChatRecords(RecordFormat):
    """Records read as conversations (`prepare --chat`): .json, .jsonl, .jsonl.gz and .parquet files."""

    kind = "chat"
    extensions = (*JSON_EXTENSIONS, ".parquet")
    missing = "unknown_format"

    def __init__(self) -> None:
        super().__init__(())

    def for_dataset(self, text_field: str) -> RecordFormat:
        """Conversations have no text field: the same format for every dataset."""
        return self

    def columns(self, available: list[str]) -> list[str]:
        """The columns any of the formats reads."""
        return [c for c in available if c in _COLUMNS]

    def document(self, name: str, record: Any, skipped: dict[str, int] | None) -> Document | None:
        """The conversation of one record as a document, or None (counted by reason)."""
        messages = messages_of(record)
        if isinstance(messages, str):
            count_skip(skipped, messages, name)
            return None
        return chat_document(name, messages, skipped)


def render_chunk(tok: Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens per conversation, all ids as uint32, all loss masks as uint8) of a chunk of conversation
    documents, rendered by the chat template (an encoding pool task)."""
    template = ChatTemplate(tok)
    lengths, ids, masks = [], [], []
    for text in texts:
        conv_ids, conv_mask = template.render(json.loads(text))
        lengths.append(len(conv_ids))
        ids.extend(conv_ids)
        masks.extend(conv_mask)
    return np.array(lengths, dtype=np.int64), np.array(ids, dtype=np.uint32), np.array(masks, dtype=np.uint8)
