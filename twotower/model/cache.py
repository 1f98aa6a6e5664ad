"""The context tower's cache and the denoiser's view of it.

Per layer the cache holds one state: `AttentionState` (post-RoPE K,V), `MambaState` (conv +
SSM state of a Mamba-2 layer, with the tail of its last pass to go back into) or None (MLP /
MoE layers keep nothing). Both state classes offer the same operations, so the cache and its
views are plain loops over the layers.

Rows are left-padded and extended together, so slot j is the same step for every row; a
padded slot is marked invalid instead of being removed (so are the slots a row drops when
rows keep different numbers of a pass's tokens). `next_pos` is each row's RoPE position of
the next token (left padding does not count).

The cache also remembers its last pass (`Tail`: the ids read, and for a shallow denoiser the
hidden states entering its first aligned layer), so that each row's last committed token, the
anchor of the shifted layout, is known after any pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from twotower.backbones.base import AttentionState
from twotower.backbones.ssm import MambaState, ScanTail

__all__ = ["AttentionState", "ContextCache", "ContextView", "MambaState", "ScanTail", "Tail", "TrainingContext"]


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
class Tail:
    """What the last pass read: ids (B, W), the hidden states entering the denoiser's first
    aligned layer (B, W, H) when a shallow denoiser needs them (else None), and which slot of
    them is each row's last committed token (B,)."""

    ids: torch.Tensor
    hidden: torch.Tensor | None
    last: torch.Tensor

    def anchor_only(self) -> Tail:
        """The tail reduced to each row's last committed token (width 1)."""
        rows = torch.arange(self.ids.shape[0], device=self.last.device)
        hidden = None if self.hidden is None else self.hidden[rows, self.last][:, None]
        return Tail(self.ids[rows, self.last][:, None], hidden, torch.zeros_like(self.last))


@dataclass
class ContextCache:
    states: list  # per layer: AttentionState, MambaState or None; (K, V) tuples are read as AttentionState
    valid: torch.Tensor  # (B, T) bool: False on left padding
    next_pos: torch.Tensor  # (B,) long
    tail: Tail | None = None  # the last pass (None for a cache built by hand)

    def __post_init__(self):
        self.states = _typed(self.states)

    def read(self, ids: torch.Tensor, hidden: torch.Tensor | None) -> None:
        """Remember the pass that just ended: ids (B, W), hidden (B, W, H) or None."""
        self.tail = Tail(ids, hidden, torch.full((ids.shape[0],), ids.shape[1] - 1, device=ids.device))

    @property
    def anchor(self) -> torch.Tensor:
        """(B,) each row's last committed token."""
        return self.tail.ids.gather(1, self.tail.last[:, None])[:, 0]

    @property
    def anchor_hidden(self) -> torch.Tensor | None:
        """(B, H) the hidden state entering the shallow denoiser's first aligned layer at each
        row's last committed token, or None when the denoiser does not read one."""
        if self.tail.hidden is None:
            return None
        rows = torch.arange(self.tail.ids.shape[0], device=self.tail.last.device)
        return self.tail.hidden[rows, self.tail.last]

    @property
    def kv(self) -> list:
        """Per layer: (K, V) each (B, Hkv, T, D) post-RoPE, a MambaState, or None."""
        return _plain(self.states)

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def join(self, other: ContextCache) -> None:
        """Take another cache's rows (continuous batching: a request joins the running batch at a
        cycle boundary). The shorter one is left-padded with invalid slots so that slot j is one
        step for every row; each row keeps its own positions. Both tails shrink to their anchors."""
        length = max(self.length, other.length)
        left_self, left_other = length - self.length, length - other.length
        self.states = [
            None if a is None else a.join(b, left_self, left_other) for a, b in zip(self.states, other.states, strict=True)
        ]
        pad = lambda valid, left: torch.cat([valid.new_zeros(valid.shape[0], left), valid], dim=1)
        self.valid = torch.cat([pad(self.valid, left_self), pad(other.valid.to(self.valid.device), left_other)])
        self.next_pos = torch.cat([self.next_pos, other.next_pos.to(self.next_pos.device)])
        a, b = self.tail.anchor_only(), other.tail.anchor_only()
        hidden = None if a.hidden is None else torch.cat([a.hidden, b.hidden.to(a.hidden.device)])
        self.tail = Tail(torch.cat([a.ids, b.ids.to(a.ids.device)]), hidden, torch.cat([a.last, b.last.to(a.last.device)]))

    def select(self, rows: list[int]) -> None:
        """Keep only these rows, in this order (finished or cancelled requests leave at once);
        slots that no row still holds are dropped from the front."""
        index = torch.tensor(rows, dtype=torch.long, device=self.valid.device)
        valid = self.valid[index]
        held = valid.any(0)
        front = int(held.int().argmax()) if bool(held.any()) else valid.shape[1]
        self.states = [None if s is None else s.select(index, front) for s in self.states]
        self.valid, self.next_pos = valid[:, front:], self.next_pos[index]
        t = self.tail
        self.tail = Tail(t.ids[index], None if t.hidden is None else t.hidden[index], t.last[index])

    def append(self, new_states: list, new_valid: torch.Tensor) -> None:
        """Add what a pass over S new slots left per layer (K,V (B, Hkv, S, D) are appended, a
        Mamba state replaces the old one). new_valid: (B, S) bool."""
        self.states = [old if old is None else old.append(new) for old, new in zip(self.states, _typed(new_states))]
        self.valid = torch.cat([self.valid, new_valid], dim=1)
        self.next_pos = self.next_pos + new_valid.sum(dim=1)

    def reorder_new(self, width: int, order: torch.Tensor) -> None:
        """Rewrite the last `width` slots just appended in `order` (B, width), per row: after a
        token tree's pass (`TwoTowerForCausalLM.context_extend` with parents), its accepted path
        first, so that `keep_new` keeps it. Attention states only (`Family.stateful` is False)."""
        self.states = [None if s is None else s.reorder_new(width, order) for s in self.states]
        if self.tail is not None:
            t = self.tail
            hidden = t.hidden
            if hidden is not None:
                hidden = hidden.gather(1, order.to(hidden.device)[..., None].expand(-1, -1, hidden.shape[2]))
            self.tail = Tail(t.ids.gather(1, order.to(t.ids.device)), hidden, t.last)

    def keep_new(self, width: int, keep: torch.Tensor) -> None:
        """Of the last `width` slots just appended, keep the first keep[b] of each row (verify
        mode drops rejected drafts). Cut when every row keeps as many; otherwise the dropped
        slots are marked invalid, so each row's cache holds exactly its committed tokens."""
        if bool((keep == width).all()):
            return  # nothing dropped: the cache and its tail stay as the pass left them
        drop = width - keep  # (B,)
        cut = self.length - int(drop[0]) if bool((keep == keep[0]).all()) else None
        if self.tail is not None:  # a row keeping none of the pass keeps no anchor in it either (a finished row)
            self.tail.last = (keep - 1).clamp(min=0).to(self.tail.last.device)
        self.states = [None if s is None else s.keep_new(drop, cut) for s in self.states]
        if cut is not None:
            self.valid = self.valid[:, :cut]
        else:
            slots = torch.arange(width, device=self.valid.device)[None]
            self.valid = torch.cat([self.valid[:, :-width], self.valid[:, -width:] & (slots < keep[:, None])], dim=1)
        self.next_pos = self.next_pos - drop

    def view(self, drop_last: bool = False) -> ContextView:
        """The denoiser's view: every slot, or every slot but each row's last committed one (the
        shifted layout's anchor). When every row's last slot holds a token, that slot is cut;
        otherwise (rows that kept different numbers of a pass's tokens) each row's last valid
        slot is marked invalid. Mamba states come without their tail: the denoiser only starts
        from them."""
        if not drop_last:
            return ContextView([None if s is None else s.for_view() for s in self.states], self.valid)
        if not bool(self.valid.any(1).all()):
            raise ValueError("the view without the last slot needs a committed token in every row")
        cut = bool(self.valid[:, -1].all())
        states = [None if s is None else s.drop_last(cut) for s in self.states]
        if cut:
            return ContextView(states, self.valid[:, :-1])
        slots = torch.arange(self.length, device=self.valid.device)
        last = torch.where(self.valid, slots, -1).max(1).values  # (B,) each row's last valid slot
        return ContextView(states, self.valid & (slots[None] != last[:, None]))


@dataclass
class TrainingContext:
    """What one frozen pass over clean training sequences (B, n*S) gives the denoiser: the view
    (K,V of every position; Mamba states at every block boundary, batch B*n), a shallow
    denoiser's anchor inputs (B, n, H) or None, and the AR model's final hidden states
    (B, n*S, H), from which the teacher's next-token logits come."""

    view: ContextView
    anchors: torch.Tensor | None
    hidden: torch.Tensor
