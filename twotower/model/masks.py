"""Boolean attention masks, (B, 1, queries, keys), True = may attend.

Keys are always laid out as [cached context slots ; this call's own slots].
"""

from __future__ import annotations

import torch


def prefill_mask(valid: torch.Tensor) -> torch.Tensor:
    """Causal mask over a left-padded prompt. valid: (B, T) -> (B, 1, T, T).

    A padded query sees itself only, so no row of the softmax is empty (its output is unused).
    """
    t = valid.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=valid.device).tril()
    mask = causal[None] & valid[:, None, :]
    mask |= torch.eye(t, dtype=torch.bool, device=valid.device)[None]
    return mask[:, None]


def extend_mask(ctx_valid: torch.Tensor, new_valid: torch.Tensor) -> torch.Tensor:
    """Context tower reading S new slots: all valid cached slots, causal among the new ones.
    ctx_valid: (B, P), new_valid: (B, S) -> (B, 1, S, P + S)."""
    s = new_valid.shape[1]
    ctx = ctx_valid[:, None, :].expand(-1, s, -1)
    own = torch.ones(s, s, dtype=torch.bool, device=ctx_valid.device).tril()[None] & new_valid[:, None, :]
    own |= torch.eye(s, dtype=torch.bool, device=ctx_valid.device)[None]
    return torch.cat([ctx, own], dim=2)[:, None]


def block_mask(ctx_valid: torch.Tensor, block_size: int, layout: str) -> torch.Tensor:
    """Denoiser over one block: all valid context slots, bidirectional inside the block.

    In the shifted layout block slot 0 holds the last committed token (the anchor); its
    query sees only itself inside the block, so its prediction of the first new token is the
    AR one (an untrained denoiser reproduces AR exactly there). The masked slots see the
    whole block. ctx_valid: (B, P) -> (B, 1, S, P + S).
    """
    s = block_size
    ctx = ctx_valid[:, None, :].expand(-1, s, -1)
    own = torch.ones(s, s, dtype=torch.bool, device=ctx_valid.device)
    if layout == "shifted":
        own[0, 1:] = False
    own = own[None].expand(ctx_valid.shape[0], -1, -1)
    return torch.cat([ctx, own], dim=2)[:, None]
