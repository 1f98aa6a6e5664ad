"""The block layout (docs/METHOD.md section 3.1): where a block of S new tokens sits, what the
denoiser reads as its input, which context it attends to, and the masks of both passes.

For a block of S new tokens y_0 .. y_{S-1} after the committed x_0 .. x_{n-1}:
  shifted:        input [x_{n-1}, y_0 .. y_{S-2}] at positions n-1 .. n+S-2, context view without
                  x_{n-1} (the anchor); output j predicts y_j. An untrained denoiser predicts y_0
                  exactly as AR does.
  same-position:  input [y_0 .. y_{S-1}] at positions n .. n+S-1, the full context; output j
                  predicts y_j (NVIDIA's released layout).
(y_j shows the mask token until committed.) A training sequence of n blocks therefore holds
n*S + `offset` tokens: the shifted layout needs one more, the first block's anchor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from twotower.config import LAYOUTS, SHIFTED, TwoTowerError
from twotower.model import masks


class BlockReads(NamedTuple):
    """What a denoiser pass over the next block reads of a context cache: the view, the
    position of slot 0 (B,), each row's anchor (last committed token, B) and a shallow
    denoiser's anchor input (B, H) or None."""

    view: object  # ContextView
    start: torch.Tensor
    anchor: torch.Tensor
    anchor_hidden: torch.Tensor | None


@dataclass(frozen=True)
class BlockLayout:
    name: str

    def __post_init__(self):
        if self.name not in LAYOUTS:
            raise TwoTowerError(f"layout must be one of {LAYOUTS}, got {self.name!r}")

    @property
    def anchored(self) -> bool:
        """Slot 0 holds the last committed token (the anchor)."""
        return self.name == SHIFTED

    @property
    def offset(self) -> int:
        """Tokens a training sequence holds beyond its n*S targets; also how far slot 0 sits
        before the first new token."""
        return 1 if self.anchored else 0

    # ---------------------------------------------------------------- generation
    def view(self, cache):
        """The context the denoiser attends to: every committed slot, or all but the anchor."""
        return cache.view(drop_last=self.anchored)

    def start(self, cache) -> torch.Tensor:
        """(B,) position of slot 0."""
        return cache.next_pos - self.offset

    def reads(self, cache, device) -> BlockReads:
        """Everything a denoiser pass over the next block reads of `cache`, moved to `device`
        (once per block, not per pass)."""
        hidden = cache.anchor_hidden
        return BlockReads(
            self.view(cache).to(device),
            self.start(cache).to(device),
            cache.anchor.to(device),
            None if hidden is None else hidden.to(device),
        )

    def inputs(self, anchor: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        """The denoiser's input (B, S) for a block (B, S) of committed ids and mask ids;
        anchor: (B,) the last committed token."""
        return torch.cat([anchor[:, None], block[:, :-1]], dim=1) if self.anchored else block

    def block_mask(self, ctx_valid: torch.Tensor, size: int, slots: torch.Tensor | None = None) -> torch.Tensor:
        return masks.block_mask(ctx_valid, size, self.name, slots)

    # ---------------------------------------------------------------- training
    def training_mask(self, n_blocks: int, block_size: int, device=None) -> torch.Tensor:
        return masks.training_mask(n_blocks, block_size, self.name, device)

    def training_inputs(self, ids: torch.Tensor, masked: torch.Tensor, mask_id: int):
        """ids (B, n*S + offset) clean tokens, masked (B, n, S) -> denoiser inputs (B, n*S) and
        targets (B, n*S). Shifted: block b reads [x_{bS}, noised x_{bS+1} .. x_{bS+S-1}] and
        slot j predicts x_{bS+1+j}; same-position: it reads noised x_{bS} .. x_{bS+S-1}."""
        batch, n, s = masked.shape
        o = self.offset
        if ids.shape[1] != n * s + o:
            raise TwoTowerError(f"a training sequence needs n*S + {o} = {n * s + o} tokens, got {ids.shape[1]}")
        targets = ids[:, o:].reshape(batch, n, s)
        if self.anchored:
            anchors = ids[:, : n * s : s].reshape(batch, n, 1)
            inputs = torch.cat([anchors, torch.where(masked[..., :-1], mask_id, targets[..., :-1])], dim=2)
        else:
            inputs = torch.where(masked, mask_id, targets)
        return inputs.reshape(batch, n * s), targets.reshape(batch, n * s)
