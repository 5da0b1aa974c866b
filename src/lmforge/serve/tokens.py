"""The served model's tokenizer over HTTP, as vLLM's server offers it: POST /tokenize, POST /detokenize and
GET /tokenizer_info. Tools that score or format prompts themselves use them instead of a tokenizer of their
own: lm-evaluation-harness's `local-completions` model finds them and needs no tokenizer files.

/tokenize reads text as a tokenizer loaded by those tools would: a special token's text (such as
"<|endoftext|>" or a chat template's role tokens) becomes that token. The completions endpoints never do
that with a text prompt (text from a user stays text); a caller that wants control tokens in a prompt
sends token ids, which is what such tools do with what /tokenize gave them.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field
from tokenizers import Tokenizer as HFTokenizer

from ..data.chat_template import JINJA
from ..data.tokenizer_kinds import EOS_TOKEN
from ..generate.continuous import check_token_ids
from .protocol import RequestError

PATHS = ("/tokenize", "/detokenize", "/tokenizer_info")  # outside /v1, as vLLM has them; the key guards them


class TokenizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str
    add_special_tokens: bool = True  # accepted, and none are added: lmforge's models read text without them


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tokens: list[int] = Field(max_length=1_000_000)


def add_tokenizer_routes(app: FastAPI, server) -> None:
    """POST /tokenize, POST /detokenize and GET /tokenizer_info over server.llm's tokenizer."""
    llm = server.llm
    tokenizer = llm.tokenizer
    # A copy that reads special tokens' text as those tokens (the shared one never does: see above).
    reading = HFTokenizer.from_str(tokenizer.hf.to_str())
    reading.encode_special_tokens = False
    vocab = tokenizer.vocab_size

    async def tokenize(request: Request) -> dict:
        body = await server.read_json(request, TokenizeBody)
        ids = reading.encode(body.prompt, add_special_tokens=False).ids
        return {"count": len(ids), "max_model_len": server.context, "tokens": ids, "token_strs": None}

    async def detokenize(request: Request) -> dict:
        body = await server.read_json(request, DetokenizeBody)
        try:
            check_token_ids(body.tokens, vocab, "tokens")
        except ValueError as e:
            raise RequestError(400, str(e)) from None
        return {"prompt": tokenizer.decode(body.tokens)}

    def tokenizer_info() -> dict:
        return {
            "tokenizer_class": "lmforge",
            "eos_token": EOS_TOKEN,
            "bos_token": None,
            "pad_token": None,
            "model_max_length": server.context,
            "vocab_size": vocab,
            "chat_template": JINJA if llm.template is not None else None,
        }

    app.post("/tokenize")(tokenize)
    app.post("/detokenize")(detokenize)
    app.get("/tokenizer_info")(tokenizer_info)
