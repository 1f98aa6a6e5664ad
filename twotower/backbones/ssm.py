"""Mamba-2 arithmetic with explicit states, for hybrid backbones (`nemotron_h`).

The context tower keeps, per Mamba-2 layer, the conv state (the last K-1 pre-conv inputs)
and the SSM state h (B, H, P, N). The denoiser starts each block from the context's states at
the block boundary, scans the block causally and throws its end state away. Both need the
same two operations, given here as plain functions in fp32:

- `seeded_conv`: the causal depthwise conv over new inputs, continuing from a conv state;
- `seeded_scan`: the SSD recurrence  h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,
  y_t = C_t . h_t + D x_t  over a whole chunk at once (quadratic in the chunk length),
  continuing from h0; `chunked_scan` runs long inputs chunk by chunk carrying the state.

To scan n blocks of S tokens from n different seeded states in one call, fold the blocks
into the batch: x (B, n*S, ...) -> (B*n, S, ...), h0 (B, n, H, P, N) -> (B*n, H, P, N).
`recurrent_scan` is the token-by-token reference the tests hold the others to.

`MambaState` is what the context cache keeps per Mamba-2 layer. A state cannot drop tokens the
way K,V slots can, so it keeps what the last pass read (`ScanTail`: every token of an
extension, the last token of a prompt) and recomputes the state after any of them from that
(`MambaState.at`), without another pass of the tower: verify mode dropping rejected drafts,
the shifted layout's view without the last token.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _fp32(scan):
    """Run a scan in fp32 also under autocast (a bf16 training step would otherwise round the
    state's decays and sums)."""

    @functools.wraps(scan)
    def wrapper(x, *args, **kwargs):
        with torch.autocast(x.device.type, enabled=False):
            return scan(x, *args, **kwargs)

    return wrapper


def seeded_conv(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """x: (B, T, C) new pre-conv inputs; conv_state: (B, C, K-1) the previous K-1 inputs
    (zeros before the first token); weight: (C, 1, K) depthwise kernel.
    Returns the conv output (B, T, C) (no activation) and the new state (B, C, K-1)."""
    k = weight.shape[-1]
    full = torch.cat([conv_state.to(x.dtype), x.transpose(1, 2)], dim=2)  # (B, C, K-1+T)
    out = F.conv1d(full, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), groups=weight.shape[0])
    return out.transpose(1, 2), full[:, :, full.shape[2] - (k - 1) :]


def _expand_groups(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, G, N) -> (B, T, H, N): each group serves H/G consecutive heads."""
    return t.repeat_interleave(heads // t.shape[2], dim=2)


@_fp32
def seeded_scan(x, dt, A, B, C, D, h0):
    """One chunk of the SSD recurrence from state h0, in fp32.

    x: (B, T, H, P); dt: (B, T, H) step sizes (already softplus'd and clamped); A: (H,) negative;
    B, C: (B, T, G, N); D: (H,); h0: (B, H, P, N).
    Returns y (B, T, H, P) and the state after the last token (B, H, P, N).
    """
    x, dt, A, D, h0 = x.float(), dt.float(), A.float(), D.float(), h0.float()
    heads = x.shape[2]
    B, C = _expand_groups(B.float(), heads), _expand_groups(C.float(), heads)
    cum = torch.cumsum(dt * A, dim=1)  # (B, T, H) log-decay from the start of the chunk
    seg = cum[:, :, None, :] - cum[:, None, :, :]  # (B, Ti, Tj, H): log-decay from j to i
    t = x.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()[None, :, :, None]
    decay = torch.exp(torch.where(causal, seg, float("-inf")))
    scores = torch.einsum("bihn,bjhn->bijh", C, B) * decay  # (B, Ti, Tj, H)
    y = torch.einsum("bijh,bjh,bjhp->bihp", scores, dt, x)
    y = y + torch.einsum("bihn,bhpn->bihp", C, h0) * torch.exp(cum)[..., None]
    y = y + D[None, None, :, None] * x
    return y, _end_state(cum, x, dt, B, h0)


def _end_state(cum, x, dt, B, h0):
    to_end = torch.exp(cum[:, -1:, :] - cum) * dt  # (B, T, H)
    return h0 * torch.exp(cum[:, -1])[:, :, None, None] + torch.einsum("bjh,bjhn,bjhp->bhpn", to_end, B, x)


@_fp32
def scan_state(x, dt, A, B, h0):
    """The state after a chunk, without its outputs (same arguments as `seeded_scan`, no C, D).
    A step with dt = 0 leaves the state unchanged, so zeroing dt after token k of a row gives
    that row's state after k tokens."""
    x, dt, h0 = x.float(), dt.float(), h0.float()
    cum = torch.cumsum(dt * A.float(), dim=1)
    return _end_state(cum, x, dt, _expand_groups(B.float(), x.shape[2]), h0)


def chunked_scan(x, dt, A, B, C, D, h0, chunk_size: int = 64, starts: list | None = None):
    """`seeded_scan` over a long input, chunk by chunk (memory linear in the length).
    starts: if a list, receives the state at the start of every chunk."""
    ys, h = [], h0.float()
    for start in range(0, x.shape[1], chunk_size):
        if starts is not None:
            starts.append(h)
        part = slice(start, start + chunk_size)
        y, h = seeded_scan(x[:, part], dt[:, part], A, B[:, part], C[:, part], D, h)
        ys.append(y)
    return torch.cat(ys, dim=1), h


@_fp32
def recurrent_scan(x, dt, A, B, C, D, h0):
    """Token-by-token reference of `seeded_scan` (fp32). Also returns every state (B, T, H, P, N)."""
    x, dt, A, D, h = x.float(), dt.float(), A.float(), D.float(), h0.float()
    heads = x.shape[2]
    B, C = _expand_groups(B.float(), heads), _expand_groups(C.float(), heads)
    ys, states = [], []
    for i in range(x.shape[1]):
        h = h * torch.exp(dt[:, i] * A)[:, :, None, None] + (dt[:, i, :, None, None] * x[:, i, :, :, None] * B[:, i, :, None, :])
        ys.append(torch.einsum("bhn,bhpn->bhp", C[:, i], h) + D[None, :, None] * x[:, i])
        states.append(h)
    return torch.stack(ys, dim=1), h, torch.stack(states, dim=1)


# ------------------------------------------------------------------ the cached state and its rewind
@dataclass
class ScanTail:
    """What a Mamba-2 layer read in the last w tokens of a pass (shapes for batch B)."""

    window: torch.Tensor  # (B, C, K-1+w) pre-conv inputs: the conv state before the tail, then the tail's
    h_start: torch.Tensor  # (B, H, P, N) fp32 SSM state before the tail
    x: torch.Tensor  # (B, w, H, P) scan inputs
    dt: torch.Tensor  # (B, w, H) step sizes
    B: torch.Tensor  # (B, w, G, N)
    A: torch.Tensor  # (H,)

    def widened(self, width: int) -> ScanTail:
        """The same tail with zero steps appended up to `width` tokens (a step with dt = 0 leaves
        the state as it is), so that tails of different passes can share one batch."""
        extra = width - self.x.shape[1]
        if extra <= 0:
            return self
        pad = lambda t, dim: torch.cat([t, t.new_zeros(*t.shape[:dim], extra, *t.shape[dim + 1 :])], dim=dim)
        return ScanTail(pad(self.window, 2), self.h_start, pad(self.x, 1), pad(self.dt, 1), pad(self.B, 1), self.A)


@dataclass
class MambaState:
    """A Mamba-2 layer's state: conv (last K-1 pre-conv inputs) and SSM state, after `kept`
    tokens of the tail (per row), or after a whole pass when there is no tail.

    The same operations as `base.AttentionState`: `append`, `keep_new`, `drop_last`,
    `for_view`, `to`."""

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

    def append(self, new: MambaState) -> MambaState:
        """The state after a pass that started from this one is the pass's own end state."""
        return new

    def keep_new(self, drop: torch.Tensor, cut: int | None = None) -> MambaState:
        """The state before the last drop[b] tokens of the last pass (per row)."""
        return self.at(self.kept - drop)

    def reorder_new(self, width: int, order: torch.Tensor) -> MambaState:
        """A recurrent state cannot keep one path of a token tree (verify uses a chain here)."""
        raise ValueError("a Mamba state keeps a chain of tokens, not a path of a token tree")

    def drop_last(self, cut: bool = True) -> MambaState:
        """The state before each row's last kept token, without a tail (a view's state). A row
        that kept none of its last pass (a finished row) stays at the start of the pass."""
        return self.at((self.kept - 1).clamp(min=0)).for_view()

    def for_view(self) -> MambaState:
        """The state without its tail: what the denoiser starts from."""
        return MambaState(self.conv, self.ssm)

    def to(self, device) -> MambaState:
        if self.tail is not None:
            raise ValueError("a Mamba state moves without its tail (take the cache's view)")
        return MambaState(self.conv.to(device), self.ssm.to(device))

    def join(self, other: MambaState, left_self: int = 0, left_other: int = 0) -> MambaState:
        """Both states' rows in one (self's first); their tails are widened to the longer one."""
        if self.tail is None or other.tail is None:
            raise ValueError("joined Mamba states need the tails of their last passes")
        width = max(self.tail.x.shape[1], other.tail.x.shape[1])
        a, b = self.tail.widened(width), other.tail.widened(width)
        cat = lambda x, y: torch.cat([x, y.to(x.device)])
        tail = ScanTail(cat(a.window, b.window), cat(a.h_start, b.h_start), cat(a.x, b.x), cat(a.dt, b.dt), cat(a.B, b.B), a.A)
        return MambaState(cat(self.conv, other.conv), cat(self.ssm, other.ssm), tail, cat(self.kept, other.kept))

    def select(self, rows: torch.Tensor, drop_front: int = 0) -> MambaState:
        """Only these rows (a (R,) index); a state has no slots to drop."""
        tail = self.tail
        if tail is not None:
            tail = ScanTail(tail.window[rows], tail.h_start[rows], tail.x[rows], tail.dt[rows], tail.B[rows], tail.A)
        return MambaState(self.conv[rows], self.ssm[rows], tail, None if self.kept is None else self.kept[rows])
