"""Generation quality from the generated texts alone: diversity, repetition and length.

Words are whitespace-separated pieces, so the numbers do not depend on the tokenizer.
distinct-n (Li et al., 2016): distinct n-grams / all n-grams, pooled over every generation.
repetition rate (seq-rep-4 of Welleck et al., 2019): within each generation, the share of its 4-grams
that repeat an earlier one, averaged over generations.
"""

from __future__ import annotations

from collections.abc import Sequence

# A small default prompt set: prose and code openings, since lmforge's built-in corpus is Python source.
DEFAULT_PROMPTS = (
    "The",
    "Once upon a time",
    "In this paper we",
    "def ",
    "import ",
    "class ",
    "# ",
    'if __name__ == "__main__":',
)


def ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """All n-grams of a word list, in order."""
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams across texts (0 when there are none)."""
    grams = [g for t in texts for g in ngrams(t.split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(texts: Sequence[str], n: int = 4) -> float:
    """Mean over texts of 1 - distinct/total n-grams within the text (texts with no n-gram are left out)."""
    rates = []
    for t in texts:
        grams = ngrams(t.split(), n)
        if grams:
            rates.append(1.0 - len(set(grams)) / len(grams))
    return sum(rates) / len(rates) if rates else 0.0


def generation_quality(texts: Sequence[str], token_counts: Sequence[int]) -> dict[str, float]:
    """distinct-1, distinct-2, repetition rate (4-grams), mean length in tokens and in words."""
    if not texts:
        raise ValueError("no generations to measure")
    return {
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "repetition_rate": repetition_rate(texts, 4),
        "mean_tokens": sum(token_counts) / len(token_counts),
        "mean_words": sum(len(t.split()) for t in texts) / len(texts),
        "samples": len(texts),
    }
