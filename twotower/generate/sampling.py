"""Sampling primitives shared by every generation mode.

Written as plain tensor functions (no Python loops over rows) so they can be compiled.
"""

from __future__ import annotations

import torch


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches top_p; -inf elsewhere. The
    likeliest token is always kept (a top_p that rounds to 0 in the logits' dtype keeps it alone)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p  # mass before this token already enough
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float, generator=None):
    """Pick a token at every position. logits: (..., V) float.

    Greedy at temperature 0, otherwise Gumbel-max on top-p-filtered logits / temperature.
    Returns (tokens (...,) long, confidence (...,) float): confidence is the unscaled
    probability of the picked token, which the diffusion commit rule compares with gamma.
    """
    probs = logits.softmax(-1)
    if temperature == 0.0:
        tokens = logits.argmax(-1)
    else:
        scaled = top_p_filter(logits / temperature, top_p)
        uniform = torch.rand(scaled.shape, generator=generator, device=scaled.device).clamp_(1e-20, 1.0)
        tokens = (scaled - torch.log(-torch.log(uniform))).argmax(-1)
    return tokens, probs.gather(-1, tokens[..., None])[..., 0]
