"""Log-probabilities as OpenAI's logprobs entries hold them: a generated token's (`token_logprobs`, from
the logits it was drawn from) and a prompt's own tokens' (`PromptScorer`, forwards over the prompt: what
`echo` with `logprobs` asks for, and how lm-evaluation-harness scores through an OpenAI-style API).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..model import GPT


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


class PromptScorer:
    """The logprobs entries of a prompt's own tokens, a chunk of tokens at a time: the first token has
    none (nothing comes before it: None, as OpenAI gives it), every other token its log-probability after
    the tokens before it, with the `top` most likely tokens at that place. Each `step()` runs one forward
    of at most `chunk` tokens through a KV cache, so a caller between decode steps (the batcher's `call`)
    holds the running rows for a chunk's forward, not the whole prompt's (as chunked prefill does).
    ids must fit the model's context."""

    def __init__(self, model: GPT, ids: Sequence[int], top: int, tokenizer, chunk: int) -> None:
        self.model, self.ids, self.top, self.tokenizer, self.chunk = model, list(ids), top, tokenizer, chunk
        first = ids[0]
        self.entries = [
            {
                "token": tokenizer.decode([first]),
                "logprob": None,
                "bytes": list(tokenizer.token_bytes(first)),
                "top_logprobs": None,
            }
        ]
        self.done = 1  # tokens whose entries are made
        self.cache = None

    @property
    def finished(self) -> bool:
        return self.done == len(self.ids)

    @torch.no_grad()
    def step(self) -> None:
        """The entries of the next chunk of tokens (fed in: the tokens before them)."""
        if self.cache is None:
            self.cache = self.model.new_cache(1, max_len=len(self.ids) - 1)
        fed = self.ids[self.done - 1 : min(self.done - 1 + self.chunk, len(self.ids) - 1)]
        device = self.model.wte.weight.device
        logits = self.model(torch.tensor([fed], device=device), cache=self.cache)[0]  # (len(fed), vocab)
        targets = self.ids[self.done : self.done + len(fed)]
        self.entries += [
            token_logprobs(row, token, self.top, self.tokenizer)
            for row, token in zip(logits, targets, strict=True)
        ]
        self.done += len(fed)
        if self.finished:
            self.cache = None  # its memory goes now, not when the caller drops the scorer
