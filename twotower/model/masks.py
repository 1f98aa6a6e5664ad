"""Every boolean attention mask of the two towers, (B, 1, queries, keys) or (queries, keys),
True = may attend.

Keys are always laid out as [cached context slots ; this call's own slots]. The anchor rule
of the shifted layout lives in one place (`within_block`): the anchor query (slot 0, the
last committed token) sees only itself inside its block, so its prediction of the first new
token is the AR one (an untrained denoiser reproduces AR exactly there).
"""

from __future__ import annotations

import torch

from twotower.config import SHIFTED


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


def tree_mask(ctx_valid: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
    """Context tower reading a token tree of N nodes: all valid cached slots, and among the
    nodes each one's ancestors and itself. parents: (B, N) long, each node's parent (an earlier
    node; -1: the tree's root, which follows the cache). ctx_valid: (B, P) -> (B, 1, N, P + N).
    A chain (parent i - 1) gives `extend_mask`."""
    n = parents.shape[1]
    own = torch.eye(n, dtype=torch.bool, device=parents.device)[None].repeat(parents.shape[0], 1, 1)
    for i in range(n):  # parents come first, so row i is its parent's row and itself
        parent = parents[:, i]
        has = parent >= 0
        own[has, i] |= own[has, parent[has]]
    ctx = ctx_valid[:, None, :].expand(-1, n, -1)
    return torch.cat([ctx, own], dim=2)[:, None]


def within_block(size: int, layout: str, device=None) -> torch.Tensor:
    """(S, S): who sees whom inside one denoiser block. Bidirectional; in the shifted layout
    the anchor query (slot 0) sees only itself, while the masked slots see the whole block."""
    own = torch.ones(size, size, dtype=torch.bool, device=device)
    if layout == SHIFTED:
        own[0, 1:] = False
    return own


def block_mask(ctx_valid: torch.Tensor, block_size: int, layout: str, slots: torch.Tensor | None = None) -> torch.Tensor:
    """Denoiser over one block: all valid context slots, then `within_block`; with slots (B, S)
    bool, a row's slots outside its own (shorter) block are not attended to (each query still
    sees itself). ctx_valid: (B, P) -> (B, 1, S, P + S)."""
    ctx = ctx_valid[:, None, :].expand(-1, block_size, -1)
    own = within_block(block_size, layout, ctx_valid.device)[None].expand(ctx_valid.shape[0], -1, -1)
    if slots is not None:
        own = own & (slots[:, None, :] | torch.eye(block_size, dtype=torch.bool, device=own.device)[None])
    return torch.cat([ctx, own], dim=2)[:, None]


def training_mask(n_blocks: int, block_size: int, layout: str, device=None) -> torch.Tensor:
    """The training pass over n blocks at once: (n*S, n*S + n*S). Keys: [context x_0 .. x_{nS-1} ;
    denoiser slots]. Block b's queries see the clean context tokens before the block, and
    their own block as `within_block` says (an L x 2L block-causal mask)."""
    s, length = block_size, n_blocks * block_size
    slots = torch.arange(length, device=device)
    block_of, slot_of = slots // s, slots % s
    ctx = slots[None, :] < (block_of[:, None] * s)  # clean tokens before the block
    own = (block_of[:, None] == block_of[None, :]) & within_block(s, layout, device)[slot_of[:, None], slot_of[None, :]]
    return torch.cat([ctx, own], dim=1)
