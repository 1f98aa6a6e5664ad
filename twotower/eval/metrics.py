"""Figures computed from replies: agreement with AR, repetition, quality retention."""

from __future__ import annotations

import math


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def agreement(replies: list[list[int]], reference: list[list[int]]) -> dict:
    """Exact-match rate and mean common-prefix length (tokens) against the AR greedy replies."""
    if len(replies) != len(reference) or not replies:
        raise ValueError("agreement needs two equally long, non-empty lists of replies")
    exact = sum(r == a for r, a in zip(replies, reference)) / len(replies)
    prefix = sum(common_prefix(r, a) for r, a in zip(replies, reference)) / len(replies)
    return {"exact_match": exact, "mean_common_prefix": prefix}


def distinct_n(text: str, n: int = 2) -> float:
    """Unique word n-grams / all word n-grams (1.0 = no repetition; 0 for fewer than n words)."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def accuracy_by_category(categories: list[str], passed: list[bool | None]) -> dict[str, float]:
    """Fraction passed per category; unscored tasks (None) are left out."""
    totals: dict[str, list[int]] = {}
    for cat, ok in zip(categories, passed):
        if ok is None:
            continue
        totals.setdefault(cat, [0, 0])
        totals[cat][0] += int(ok)
        totals[cat][1] += 1
    return {cat: hits / count for cat, (hits, count) in totals.items()}


def quality_retention(mode_acc: dict[str, float], ar_acc: dict[str, float]) -> float | None:
    """Mean over categories of mode accuracy / AR accuracy, over categories where AR scores > 0.
    None when AR scores zero everywhere (nothing to retain)."""
    ratios = [mode_acc.get(cat, 0.0) / acc for cat, acc in ar_acc.items() if acc > 0]
    return sum(ratios) / len(ratios) if ratios else None


def mean_perplexity(nll_per_token: list[float]) -> float | None:
    """exp of the mean per-reply negative log-likelihood per token (a geometric mean of
    per-reply perplexities)."""
    values = [v for v in nll_per_token if v is not None and math.isfinite(v)]
    return math.exp(sum(values) / len(values)) if values else None
