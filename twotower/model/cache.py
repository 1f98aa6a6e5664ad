"""The context tower's cache: per-layer post-RoPE K,V plus which slots hold real tokens.

Rows are left-padded and extended together, so slot j is the same step for every row; a
padded slot is marked invalid instead of being removed. `next_pos` is each row's RoPE
position of the next token (left padding does not count).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ContextView:
    """What the denoiser attends to: K,V of the committed tokens (maybe minus the last)."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, each (B, Hkv, T, D)
    valid: torch.Tensor  # (B, T) bool

    def to(self, device) -> ContextView:
        if self.valid.device == torch.device(device):
            return self
        return ContextView([(k.to(device), v.to(device)) for k, v in self.kv], self.valid.to(device))


@dataclass
class ContextCache:
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, each (B, Hkv, T, D), post-RoPE
    valid: torch.Tensor  # (B, T) bool: False on left padding
    next_pos: torch.Tensor  # (B,) long

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def append(self, new_kv, new_valid: torch.Tensor) -> None:
        """Add the K,V of S new slots (per layer (B, Hkv, S, D)); new_valid: (B, S) bool."""
        self.kv = [(torch.cat([k, nk], dim=2), torch.cat([v, nv], dim=2)) for (k, v), (nk, nv) in zip(self.kv, new_kv)]
        self.valid = torch.cat([self.valid, new_valid], dim=1)
        self.next_pos = self.next_pos + new_valid.sum(dim=1)

    def keep_new(self, width: int, keep: torch.Tensor) -> None:
        """Of the last `width` slots just appended, keep the first keep[b] of each row (verify
        mode drops rejected drafts). Cropped when every row keeps as many; otherwise the dropped
        slots are marked invalid, so each row's cache holds exactly its committed tokens."""
        drop = width - keep  # (B,)
        if bool((keep == keep[0]).all()):
            cut = self.length - int(drop[0])
            self.kv = [(k[:, :, :cut], v[:, :, :cut]) for k, v in self.kv]
            self.valid = self.valid[:, :cut]
        else:
            slots = torch.arange(width, device=self.valid.device)[None]
            self.valid = torch.cat([self.valid[:, :-width], self.valid[:, -width:] & (slots < keep[:, None])], dim=1)
        self.next_pos = self.next_pos - drop

    def view(self, drop_last: bool = False) -> ContextView:
        """The denoiser's view: every slot, or every slot but the last (shifted layout)."""
        if not drop_last:
            return ContextView(self.kv, self.valid)
        return ContextView([(k[:, :, :-1], v[:, :, :-1]) for k, v in self.kv], self.valid[:, :-1])
