"""Mamba-2 arithmetic with explicit states (hybrid backbones): the seeded chunk scan and the
seeded conv against token-by-token recurrence, and blocks folded into the batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from twotower.backbones.ssm import chunked_scan, recurrent_scan, scan_state, seeded_conv, seeded_scan

HEADS, P, N, GROUPS = 4, 3, 5, 2


def _inputs(batch, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, HEADS, P, generator=g)
    dt = F.softplus(torch.randn(batch, length, HEADS, generator=g))
    A = -torch.rand(HEADS, generator=g) * 2 - 0.1
    B = torch.randn(batch, length, GROUPS, N, generator=g)
    C = torch.randn(batch, length, GROUPS, N, generator=g)
    D = torch.randn(HEADS, generator=g)
    h0 = torch.randn(batch, HEADS, P, N, generator=g)  # a non-zero seeded state
    return x, dt, A, B, C, D, h0


@pytest.mark.parametrize("length", [1, 4, 16, 19])
def test_seeded_scan_equals_token_by_token_recurrence(length):
    args = _inputs(2, length)
    y_ref, h_ref, _ = recurrent_scan(*args)
    y, h = seeded_scan(*args)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h, h_ref, rtol=1e-4, atol=1e-4)
    y2, h2 = chunked_scan(*args, chunk_size=4)  # 19 = 4 + 4 + 4 + 4 + 3: a ragged last chunk
    torch.testing.assert_close(y2, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h2, h_ref, rtol=1e-4, atol=1e-4)


def test_scan_starts_from_the_seeded_state():
    x, dt, A, B, C, D, h0 = _inputs(1, 4)
    from_zero, _ = seeded_scan(x, dt, A, B, C, D, torch.zeros_like(h0))
    seeded, _ = seeded_scan(x, dt, A, B, C, D, h0)
    assert (seeded - from_zero).abs().max() > 1e-2


@pytest.mark.parametrize("block", [1, 4, 16])
def test_blocks_folded_into_the_batch_equal_one_long_recurrence(block):
    """Seed every block from the recurrence's state at its boundary and scan all blocks at
    once (blocks folded into the batch): outputs equal the single long recurrence; each
    block's end state is the next boundary's state."""
    n, batch = 3, 2
    x, dt, A, B, C, D, h0 = _inputs(batch, n * block, seed=1)
    y_ref, _, states = recurrent_scan(x, dt, A, B, C, D, h0)
    starts = torch.stack([h0] + [states[:, b * block - 1] for b in range(1, n)], dim=1)  # (B, n, H, P, N)
    fold = lambda t: t.reshape(batch * n, block, *t.shape[2:])
    y, h_end = seeded_scan(fold(x), fold(dt), A, fold(B), fold(C), D, starts.reshape(batch * n, HEADS, P, N))
    torch.testing.assert_close(y.reshape(batch, n * block, HEADS, P), y_ref, rtol=1e-4, atol=1e-4)
    ends = torch.stack([states[:, (b + 1) * block - 1] for b in range(n)], dim=1).reshape(batch * n, HEADS, P, N)
    torch.testing.assert_close(h_end, ends, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("split", [1, 3, 5])
def test_seeded_conv_continues_a_sequence(split):
    g = torch.Generator().manual_seed(0)
    channels, k, length = 6, 4, 9
    x = torch.randn(2, length, channels, generator=g)
    weight, bias = torch.randn(channels, 1, k, generator=g), torch.randn(channels, generator=g)
    whole = F.conv1d(F.pad(x.transpose(1, 2), (k - 1, 0)), weight, bias, groups=channels).transpose(1, 2)
    state = torch.zeros(2, channels, k - 1)
    first, state = seeded_conv(x[:, :split], state, weight, bias)
    second, state = seeded_conv(x[:, split:], state, weight, bias)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, x[:, -(k - 1) :].transpose(1, 2))


def test_seeded_scan_matches_transformers_nemotron_h_chunk_scan():
    """Same state layout and conventions as transformers' own Mamba-2 scan for nemotron_h
    (dt through bias, softplus and clamp; state (B, H, P, N)), from a non-zero initial state."""
    from transformers.models.nemotron_h.modeling_nemotron_h import mamba2_chunk_scan

    x, _, A, B, C, D, h0 = _inputs(2, 12, seed=3)
    g = torch.Generator().manual_seed(4)
    dt_raw, dt_bias = torch.randn(2, 12, HEADS, generator=g), torch.randn(HEADS, generator=g)
    y_ref, h_ref = mamba2_chunk_scan(
        x,
        dt_raw,
        A,
        B,
        C,
        chunk_size=8,
        D=D,
        dt_bias=dt_bias,
        initial_states=h0.clone(),
        dt_softplus=True,
        dt_limit=(0.0, float("inf")),
        return_final_states=True,
    )
    y, h = seeded_scan(x, F.softplus(dt_raw + dt_bias), A, B, C, D, h0)
    torch.testing.assert_close(y, y_ref.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h, h_ref.float(), rtol=1e-4, atol=1e-4)


def test_scans_stay_fp32_under_bf16_autocast():
    """A bf16 autocast training step must not round the scan: same results as outside it."""
    x, dt, A, B, C, D, h0 = _inputs(2, 12, seed=2)
    y, h = chunked_scan(x, dt, A, B, C, D, h0, chunk_size=5)
    state = scan_state(x, dt, A, B, h0)
    with torch.autocast("cpu", torch.bfloat16):
        y_auto, h_auto = chunked_scan(x, dt, A, B, C, D, h0, chunk_size=5)
        state_auto = scan_state(x, dt, A, B, h0)
    assert y_auto.dtype == h_auto.dtype == state_auto.dtype == torch.float32
    torch.testing.assert_close(y_auto, y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h_auto, h, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(state_auto, state, rtol=1e-6, atol=1e-6)
