"""The one set of sampling settings and defaults, for every way a run generates text.

`lmforge generate`, `chat` and `serve` (a request's defaults) show these fields as flags, eval's
generation check and `lmforge.LLM`'s methods take their defaults from them: a default changed here
changes everywhere. Plain Python, so the command line can show it without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    """Sampling: how each next token is chosen, and how many come.

    Temperature 0.8 over the 50 most likely tokens (what `lmforge generate` and the training samples have
    always drawn with) keeps text varied without the long tail of unlikely tokens; 128 new tokens is a
    chat reply's and a server request's length. Top-p, min-p and the repetition penalty start off.

    Args:
        temperature: divides the logits before the draw; 0 is greedy (argmax)
        top_k: draw from the k most likely tokens only (null: all)
        top_p: nucleus: the smallest set of tokens whose probability reaches p (null: off)
        repetition_penalty: CTRL's penalty on tokens already in the text (1.0: off)
        min_p: drop tokens less likely than min_p x the top token (null: off)
        max_new_tokens: the most new tokens per completion
        stop: stop where this text appears; it is left out (repeatable)
        seed: same seed, same output (null: a fresh draw each time)
    """

    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float | None = None
    repetition_penalty: float = 1.0
    min_p: float | None = None
    max_new_tokens: int = 128
    stop: list[str] | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 is greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k}: must be >= 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty}: must be > 0 (1 disables it)")
        if self.min_p is not None and not 0 <= self.min_p < 1:
            raise ValueError(f"min_p={self.min_p}: must be in [0, 1)")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
