"""The context tower's cache: per layer, post-RoPE K,V (attention), a `MambaState` (Mamba-2
layers of hybrid backbones) or None (MLP / MoE layers), plus which slots hold real tokens.

Rows are left-padded and extended together, so slot j is the same step for every row; a
padded slot is marked invalid instead of being removed. `next_pos` is each row's RoPE
position of the next token (left padding does not count).

A Mamba state cannot drop tokens the way K,V slots can. So each state keeps what the last
pass read (`ScanTail`: every token of an extension, the last token of a prompt): the state
after any of them is recomputed from those (verify mode dropping rejected drafts, the
shifted layout's view without the last token) without another pass of the tower.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from twotower.backbones.ssm import scan_state


@dataclass
class ScanTail:
    """What a Mamba-2 layer read in the last w tokens of a pass (shapes for batch B)."""

    window: torch.Tensor  # (B, C, K-1+w) pre-conv inputs: the conv state before the tail, then the tail's
    h_start: torch.Tensor  # (B, H, P, N) fp32 SSM state before the tail
    x: torch.Tensor  # (B, w, H, P) scan inputs
    dt: torch.Tensor  # (B, w, H) step sizes
    B: torch.Tensor  # (B, w, G, N)
    A: torch.Tensor  # (H,)


@dataclass
class MambaState:
    """A Mamba-2 layer's state: conv (last K-1 pre-conv inputs) and SSM state, after `kept`
    tokens of the tail (per row), or after a whole pass when there is no tail."""

    conv: torch.Tensor  # (B, C, K-1)
    ssm: torch.Tensor  # (B, H, P, N) fp32
    tail: ScanTail | None = None
    kept: torch.Tensor | None = None  # (B,) long

    def at(self, kept: torch.Tensor) -> MambaState:
        """The state after the first kept[b] tokens of the tail (0 <= kept[b] <= w)."""
        tail = self.tail
        width = 0 if tail is None else tail.x.shape[1]
        if tail is None or bool((kept < 0).any()) or bool((kept > width).any()):
            raise ValueError(f"a Mamba state can go back at most {width} tokens into its last pass")
        k1 = tail.window.shape[2] - width
        idx = kept[:, None] + torch.arange(k1, device=kept.device)  # (B, K-1)
        conv = torch.gather(tail.window, 2, idx[:, None, :].expand(-1, tail.window.shape[1], -1))
        live = torch.arange(width, device=kept.device)[None] < kept[:, None]  # (B, w)
        ssm = scan_state(tail.x, tail.dt * live[..., None], tail.A, tail.B, tail.h_start)
        return MambaState(conv, ssm, tail, kept)

    def to(self, device) -> MambaState:
        if self.tail is not None:
            raise ValueError("a Mamba state moves without its tail (take the cache's view)")
        return MambaState(self.conv.to(device), self.ssm.to(device))


def _move(entry, device):
    if entry is None or isinstance(entry, MambaState):
        return None if entry is None else entry.to(device)
    return (entry[0].to(device), entry[1].to(device))


@dataclass
class ContextView:
    """What the denoiser attends to: K,V of the committed tokens (maybe minus the last)."""

    kv: list  # per layer: (K, V) each (B, Hkv, T, D), a MambaState, or None
    valid: torch.Tensor  # (B, T) bool

    def to(self, device) -> ContextView:
        if self.valid.device == torch.device(device):
            return self
        return ContextView([_move(entry, device) for entry in self.kv], self.valid.to(device))


@dataclass
class ContextCache:
    kv: list  # per layer: (K, V) each (B, Hkv, T, D) post-RoPE, a MambaState, or None
    valid: torch.Tensor  # (B, T) bool: False on left padding
    next_pos: torch.Tensor  # (B,) long

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def append(self, new_kv, new_valid: torch.Tensor) -> None:
        """Add what a pass over S new slots left per layer: K,V (B, Hkv, S, D) are appended,
        a Mamba state replaces the old one. new_valid: (B, S) bool."""
        self.kv = [new if not isinstance(old, tuple) else (torch.cat([old[0], new[0]], dim=2),
                                                          torch.cat([old[1], new[1]], dim=2))
                   for old, new in zip(self.kv, new_kv)]
        self.valid = torch.cat([self.valid, new_valid], dim=1)
        self.next_pos = self.next_pos + new_valid.sum(dim=1)

    def keep_new(self, width: int, keep: torch.Tensor) -> None:
        """Of the last `width` slots just appended, keep the first keep[b] of each row (verify
        mode drops rejected drafts). Cropped when every row keeps as many; otherwise the dropped
        slots are marked invalid, so each row's cache holds exactly its committed tokens."""
        drop = width - keep  # (B,)
        self.kv = [e.at(e.kept - drop) if isinstance(e, MambaState) else e for e in self.kv]
        if bool((keep == keep[0]).all()):
            cut = self.length - int(drop[0])
            self.kv = [(e[0][:, :, :cut], e[1][:, :, :cut]) if isinstance(e, tuple) else e for e in self.kv]
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

        def entry(e):
            if isinstance(e, tuple):
                return (e[0][:, :, :-1], e[1][:, :, :-1]) if drop_last else e
            if isinstance(e, MambaState):
                state = e.at(e.kept - 1) if drop_last else e
                return MambaState(state.conv, state.ssm)
            return None

        return ContextView([entry(e) for e in self.kv], self.valid[:, :-1] if drop_last else self.valid)
