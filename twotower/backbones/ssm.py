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
"""

from __future__ import annotations

import functools

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
    return out.transpose(1, 2), full[:, :, full.shape[2] - (k - 1):]


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
        h = h * torch.exp(dt[:, i] * A)[:, :, None, None] + (dt[:, i, :, None, None] * x[:, i, :, :, None]
                                                              * B[:, i, :, None, :])
        ys.append(torch.einsum("bhn,bhpn->bhp", C[:, i], h) + D[None, :, None] * x[:, i])
        states.append(h)
    return torch.stack(ys, dim=1), h, torch.stack(states, dim=1)
