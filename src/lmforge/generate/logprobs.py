"""Log-probabilities as OpenAI's logprobs entries hold them: a generated token's (`token_logprobs`, from
the logits it was drawn from) and a prompt's own tokens' (`prompt_logprobs`, one forward over the prompt:
what `echo` with `logprobs` asks for, and how lm-evaluation-harness scores through an OpenAI-style API).
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


@torch.no_grad()
def prompt_logprobs(model: GPT, ids: Sequence[int], top: int, tokenizer) -> list[dict]:
    """An entry for each prompt token: the first has no log-probability (nothing comes before it: None,
    as OpenAI gives it), every other token's is its log-probability after the tokens before it, with the
    `top` most likely tokens at that place. ids must fit the model's context."""
    first = {
        "token": tokenizer.decode([ids[0]]),
        "logprob": None,
        "bytes": list(tokenizer.token_bytes(ids[0])),
    }
    if len(ids) == 1:
        return [{**first, "top_logprobs": None}]
    device = model.wte.weight.device
    logits = model(torch.tensor([list(ids[:-1])], device=device))[0]  # (T - 1, vocab): each next token's
    return [{**first, "top_logprobs": None}] + [
        token_logprobs(row, token, top, tokenizer) for row, token in zip(logits, ids[1:], strict=True)
    ]
