"""The training objective (docs/METHOD.md section 4): one pass per sequence.

A training sequence is cut into n blocks of S target tokens. The frozen context tower reads
the clean sequence once (no grad) and keeps the K,V of every layer; the denoiser reads all
blocks of the noisy sequence in one pass under a block-causal mask: the queries of block b
see the context K,V of the clean tokens before block b and the denoiser's own K,V of block b
only, exactly what they see at generation time. Cross-entropy on masked targets, summed; the
caller divides by the number of masked targets in the whole batch (no 1/t weight).

The block layout (`twotower.model.layout.BlockLayout`) says what block b reads and predicts:
shifted, input [x_{bS}, noised x_{bS+1} .. x_{bS+S-1}] and slot j predicts x_{bS+1+j} (the
anchor slot 0 sees only itself inside the block, as in generation); same-position, input
[noised x_{bS} .. x_{bS+S-1}] and slot j predicts x_{bS+j}. A sequence holds n*S + offset
tokens. Slot j of block b sits at RoPE position bS + j.
Hybrid backbones: the context pass also keeps every layer's Mamba state at each block
boundary bS, and the denoiser's Mamba layers scan each block from its own boundary state
(the blocks folded into the batch), as at generation time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from twotower.model.layout import BlockLayout


def layout_offset(layout: str) -> int:
    """Tokens a sequence holds beyond its n*S targets: 1 in the shifted layout (the anchor)."""
    return BlockLayout(layout).offset


@dataclass
class Noise:
    """The corruption of a batch: one masking level per sequence, one coin per target."""

    t: torch.Tensor  # (B,) masking level in [t_min, 1]
    masked: torch.Tensor  # (B, n, S) bool, True = target hidden from the denoiser (and scored)

    def split(self, size: int) -> list[Noise]:
        return [Noise(t, m) for t, m in zip(self.t.split(size), self.masked.split(size))]


def sample_noise(
    batch: int, n_blocks: int, block_size: int, generator: torch.Generator | None = None, t_min: float = 1e-3
) -> Noise:
    """t ~ U[t_min, 1] per sequence; every target masked independently with probability t."""
    t = t_min + (1 - t_min) * torch.rand(batch, generator=generator)
    coins = torch.rand(batch, n_blocks, block_size, generator=generator)
    return Noise(t, coins < t[:, None, None])


def training_logits(model, ids: torch.Tensor, noise: Noise) -> tuple[torch.Tensor, torch.Tensor]:
    """One training pass. ids: (B, n*S + o) clean tokens. Returns the denoiser logits over every
    slot (B, n*S, V) (float, mask token forbidden) and the targets (B, n*S)."""
    batch, n, s = noise.masked.shape
    inputs, targets = model.layout.training_inputs(ids, noise.masked, model.mask_token_id)
    view = model.training_context(ids[:, : n * s], s)  # frozen, clean tokens, no gradient
    mask = model.layout.training_mask(n, s, ids.device)[None, None].expand(batch, -1, -1, -1)
    start = torch.zeros(batch, dtype=torch.long, device=ids.device)
    return model.denoise(view, inputs, start, noise.t, mask=mask, blocks=n), targets


def masked_loss_sum(model, ids: torch.Tensor, noise: Noise) -> tuple[torch.Tensor, int]:
    """Sum of the cross-entropy over masked targets, and how many there were."""
    logits, targets = training_logits(model, ids, noise)
    scored = noise.masked.reshape(targets.shape)
    loss = F.cross_entropy(logits[scored], targets[scored], reduction="sum")
    return loss, int(scored.sum())
