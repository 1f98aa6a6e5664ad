"""The context tower's cache and the denoiser's view of it.

Per layer the cache holds one state: `AttentionState` (post-RoPE K,V), `MambaState` (conv +
SSM state of a Mamba-2 layer, with the tail of its last pass to go back into) or None (MLP /
MoE layers keep nothing). Both state classes offer the same operations, so the cache and its
views are plain loops over the layers.

Rows are left-padded and extended together, so slot j is the same step for every row; a
padded slot is marked invalid instead of being removed. `next_pos` is each row's RoPE
position of the next token (left padding does not count).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from twotower.backbones.base import AttentionState
from twotower.backbones.ssm import MambaState, ScanTail

__all__ = ["AttentionState", "ContextCache", "ContextView", "MambaState", "ScanTail"]


def _typed(states: list) -> list:
    """Per-layer states, with (K, V) tuples (the form `kv` shows) read as `AttentionState`."""
    return [AttentionState(*s) if isinstance(s, tuple) else s for s in states]


def _plain(states: list) -> list:
    """Per-layer states as `kv` shows them: (K, V) tuples, MambaState or None."""
    return [s.as_tuple() if isinstance(s, AttentionState) else s for s in states]


@dataclass
class ContextView:
    """What the denoiser attends to: the states of the committed tokens (maybe minus the last)."""

    states: list  # per layer: AttentionState, MambaState (no tail) or None; (K, V) tuples are read as AttentionState
    valid: torch.Tensor  # (B, T) bool

    def __post_init__(self):
        self.states = _typed(self.states)

    @property
    def kv(self) -> list:
        """Per layer: (K, V) each (B, Hkv, T, D), a MambaState, or None."""
        return _plain(self.states)

    def to(self, device) -> ContextView:
        if self.valid.device == torch.device(device):
            return self
        return ContextView([None if s is None else s.to(device) for s in self.states], self.valid.to(device))


@dataclass
class ContextCache:
    states: list  # per layer: AttentionState, MambaState or None; (K, V) tuples are read as AttentionState
    valid: torch.Tensor  # (B, T) bool: False on left padding
    next_pos: torch.Tensor  # (B,) long

    def __post_init__(self):
        self.states = _typed(self.states)

    @property
    def kv(self) -> list:
        """Per layer: (K, V) each (B, Hkv, T, D) post-RoPE, a MambaState, or None."""
        return _plain(self.states)

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def append(self, new_states: list, new_valid: torch.Tensor) -> None:
        """Add what a pass over S new slots left per layer (K,V (B, Hkv, S, D) are appended, a
        Mamba state replaces the old one). new_valid: (B, S) bool."""
        self.states = [old if old is None else old.append(new) for old, new in zip(self.states, _typed(new_states))]
        self.valid = torch.cat([self.valid, new_valid], dim=1)
        self.next_pos = self.next_pos + new_valid.sum(dim=1)

    def keep_new(self, width: int, keep: torch.Tensor) -> None:
        """Of the last `width` slots just appended, keep the first keep[b] of each row (verify
        mode drops rejected drafts). Cut when every row keeps as many; otherwise the dropped
        slots are marked invalid, so each row's cache holds exactly its committed tokens."""
        drop = width - keep  # (B,)
        cut = self.length - int(drop[0]) if bool((keep == keep[0]).all()) else None
        self.states = [None if s is None else s.keep_new(drop, cut) for s in self.states]
        if cut is not None:
            self.valid = self.valid[:, :cut]
        else:
            slots = torch.arange(width, device=self.valid.device)[None]
            self.valid = torch.cat([self.valid[:, :-width], self.valid[:, -width:] & (slots < keep[:, None])], dim=1)
        self.next_pos = self.next_pos - drop

    def view(self, drop_last: bool = False) -> ContextView:
        """The denoiser's view: every slot, or every slot but the last (shifted layout). Mamba
        states come without their tail: the denoiser only starts from them."""
        if drop_last and not bool(self.valid[:, -1].all()):
            raise ValueError("the view without the last slot needs every row's last slot committed")
        states = [None if s is None else s.drop_last() if drop_last else s.for_view() for s in self.states]
        return ContextView(states, self.valid[:, :-1] if drop_last else self.valid)
