"""The one set of sampling settings and defaults, for every way a run generates text.

`lmforge generate`, `chat` and `serve` (a request's defaults) show these fields as flags, eval's
generation check and `lmforge.LLM`'s methods take their defaults from them: a default changed here
changes everywhere. Plain Python, so the command line can show it without importing torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Below this temperature, logits a typical 1e-4 apart are 10+ apart after the division: the draw is the
# argmax, and greedy decoding gives it without dividing by a number that can overflow fp32.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """Sampling: how each next token is chosen, and how many come.

    Temperature 0.8 over the 50 most likely tokens (what `lmforge generate` and the training samples have
    always drawn with) keeps text varied without the long tail of unlikely tokens; 128 new tokens is a
    chat reply's and a server request's length. Top-p, min-p and the penalties start off.

    Args:
        temperature: divides the logits before the draw; 0 is greedy (argmax)
        top_k: draw from the k most likely tokens only (null: all)
        top_p: nucleus: the smallest set of tokens whose probability reaches p (null: off)
        repetition_penalty: CTRL's penalty on tokens already in the text (1.0: off)
        frequency_penalty: subtracted from a token's logit once for each time it was generated (0: off)
        presence_penalty: subtracted from the logit of every token generated at least once (0: off)
        min_p: drop tokens less likely than min_p x the top token (null: off)
        max_new_tokens: the most new tokens per completion
        stop: stop where this text appears; it is left out (repeatable)
        seed: same seed, same output (null: a fresh draw each time)
    """

    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    min_p: float | None = None
    max_new_tokens: int = 128
    stop: list[str] | None = None
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        """Argmax decoding: temperature 0, or one so small that dividing fp32 logits by it overflows
        (1e-300 did) while the draw it stands for is the argmax anyway."""
        return self.temperature < GREEDY_BELOW

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature={self.temperature}: must be a number >= 0 (0 is greedy)")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed={self.seed}: must be in [0, 2^63)")  # what torch's generators take
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k}: must be >= 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty}: must be > 0 (1 disables it)")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not -2 <= value <= 2:  # NaN fails too
                raise ValueError(
                    f"{name}={value}: must be in [-2, 2] (0 disables it), as OpenAI's API has it"
                )
        if self.min_p is not None and not 0 <= self.min_p < 1:
            raise ValueError(f"min_p={self.min_p}: must be in [0, 1)")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")

    @property
    def counts_tokens(self) -> bool:
        """The frequency or presence penalty is on: sampling needs each row's counts of its generated
        tokens."""
        return self.frequency_penalty != 0 or self.presence_penalty != 0
