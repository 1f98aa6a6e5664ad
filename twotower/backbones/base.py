"""What the two towers ask of a backbone family, and the pieces every family shares.

A family (`llama.LLAMA`, `nemotron_h.NEMOTRON_H`) is looked up by the backbone's `model_type`
(`family_of`) and offers the same four things, so nothing above this package asks which
family it holds:

- `projections(layer)`: the linear projections of one layer a LoRA adapter may target;
- `n_modulation`: adaLN vectors per layer (3 per sublayer: shift, scale, gate);
- `run_layers(backbone, p)`: the layers and the final norm over one `LayerPass`, which names
  its inputs, its past states, which layers run and what state the caller wants back (`Keep`);
- `empty_states(backbone, batch)`: the per-layer states of no token.

Below the families: the attention layers' cached state (`AttentionState`; the Mamba-2 state
lives beside its scan in `ssm.py`), and the LoRA and adaLN hooks both apply the same way
(`project`, `adapter_lookup`, `modulate`, `gated`).
"""

from __future__ import annotations

import ctypes
import os
import sys
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Keep:
    """What state a pass returns per layer.

    none:   nothing (the denoiser reads the context's states and throws its own away);
    end:    the state after the pass (attention: this pass's K,V; Mamba: the end state, able to
            go back into the pass's last `tail` tokens, all of them when None): the context tower;
    every:  attention K,V of the pass, and Mamba states at every `every` tokens, folded into
            the batch: the training pass, which starts every block from its own boundary state.
    """

    kind: str = "none"
    tail: int | None = None
    every: int | None = None

    @staticmethod
    def nothing() -> Keep:
        return Keep("none")

    @staticmethod
    def end(tail: int | None = None) -> Keep:
        return Keep("end", tail=tail)

    @staticmethod
    def block_starts(size: int) -> Keep:
        return Keep("every", every=size)


NOTHING = Keep.nothing()


@dataclass
class LayerPass:
    """One pass of a tower's layers.

    hidden: (B, T, H) input; positions: (B, T) absolute positions (RoPE; a family without RoPE
    has no use for them); mask: None or (B, 1, T, P + T) bool over [past slots ; own slots];
    past: None or per-layer states (`AttentionState`, `MambaState` or None); valid: None or
    (B, T) bool, the padding of a prefill (Mamba layers zero padded inputs); blocks: n > 1
    means T = n*S tokens in n blocks, each scanned by Mamba layers from its own state (past
    states of batch B*n); modulation: None or (B, L, n_modulation, H); adapters: None or per
    layer {projection name: LoRA}; layers: the layer modules to run (None: every layer of the
    backbone; a shallow denoiser runs its K layers, and past, modulation and adapters then
    hold K entries); capture: return the hidden state entering this layer (index into the
    layers run; the shallow denoiser's anchor input), or entering each of these layers,
    concatenated in this order along the last dimension (its fused features); exact: attention and linear projections
    that give each position what a one-token pass gives it (`exact_attention`, `linear`; the
    Llama family).
    """

    hidden: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor | None
    past: list | None = None
    keep: Keep = NOTHING
    valid: torch.Tensor | None = None
    blocks: int = 1
    modulation: torch.Tensor | None = None
    adapters: nn.ModuleList | None = None
    layers: Sequence[nn.Module] | None = None
    capture: int | tuple[int, ...] | None = None
    exact: bool = False

    @property
    def captures(self) -> tuple[int, ...]:
        """The layers whose input the pass returns, in the order `captured` joins them."""
        c = self.capture
        return () if c is None else (c,) if isinstance(c, int) else tuple(c)

    def captured(self, kept: dict[int, torch.Tensor]) -> torch.Tensor | None:
        """The hidden states kept entering each captured layer, joined along the last dimension
        ((..., H) for one layer, (..., k*H) for k), or None where the pass captures none."""
        if not self.captures:
            return None
        parts = [kept[i] for i in self.captures]
        return parts[0] if len(parts) == 1 else torch.cat(parts, -1)

    def modules(self, backbone: nn.Module) -> Sequence[nn.Module]:
        return backbone.model.layers if self.layers is None else self.layers

    def layer(self, i: int):
        """(past state, modulation, adapters) of layer i."""
        return (
            None if self.past is None else self.past[i],
            None if self.modulation is None else self.modulation[:, i],
            None if self.adapters is None else self.adapters[i],
        )


class PassOutput(NamedTuple):
    hidden: torch.Tensor  # (B, T, H) after the final norm
    states: list  # per layer run: the state LayerPass.keep asked for, or None
    captured: torch.Tensor | None  # (B, T, k*H) the hidden states entering the k layers `capture` names, or None


class Family(Protocol):
    """A backbone family: how its layers run with the two towers' hooks."""

    name: str
    n_modulation: int
    stateful: bool  # has recurrent (Mamba) state, which cannot drop tokens like K,V slots
    # Projections of one input that inference stacks into one matmul (`fuse_layers`):
    # (sublayer attribute, name of the stacked projection, the projections' names).
    fusions: tuple[tuple[str, str, tuple[str, ...]], ...]

    def projections(self, layer: nn.Module) -> dict[str, nn.Linear]: ...

    def run_layers(self, backbone: nn.Module, p: LayerPass) -> PassOutput: ...

    def empty_states(self, backbone: nn.Module, batch: int) -> list: ...

    # Two context-tower passes over the layers at once, sharing their row-wise calls
    # (llama.run_two: a prompt chunk riding along a decoding pass); None for a family whose
    # layers are not row by row (Mamba scans).
    run_two: Callable[[nn.Module, LayerPass, LayerPass], tuple[PassOutput, PassOutput]] | None

    # `run_layers` with compiled graphs around attention (llama.CompiledLayers: .run_layers),
    # made fresh per model; None for a family that has none.
    compiled_layers: type | None


class AttentionState:
    """An attention layer's cache: post-RoPE keys and values, (B, Hkv, T, D) each.

    Static: the keys and values live in pre-allocated buffers of some capacity, and the context
    tower writes each pass's own K,V into them in place (`extend`), instead of concatenating
    the whole cache every step; a buffer grows (doubling) only when it is full. `k` and `v` are
    views of the slots in use.

    The same operations as `ssm.MambaState`, so that a cache is a plain loop over its layers:
    `append` a pass, `keep_new` (verify mode drops rejected drafts), `drop_last` (the shifted
    layout's view), `for_view`, `to` a device. Slots are never removed one row at a time: a
    row's dropped slots are marked invalid by the cache, and cut when every row drops as many.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, length: int | None = None):
        self.buf_k, self.buf_v = k, v
        self.length = k.shape[2] if length is None else length

    @property
    def k(self) -> torch.Tensor:
        return self.buf_k[:, :, : self.length]

    @property
    def v(self) -> torch.Tensor:
        return self.buf_v[:, :, : self.length]

    @property
    def capacity(self) -> int:
        return self.buf_k.shape[2]

    def reserve(self, slots: int) -> None:
        """Room for `slots` more keys without reallocating."""
        need = self.length + slots
        if need <= self.capacity:
            return
        size = max(need, 2 * self.capacity, 64)
        grown_k = self.buf_k.new_empty(*self.buf_k.shape[:2], size, self.buf_k.shape[3])
        grown_v = self.buf_v.new_empty(*self.buf_v.shape[:2], size, self.buf_v.shape[3])
        grown_k[:, :, : self.length] = self.k
        grown_v[:, :, : self.length] = self.v
        self.buf_k, self.buf_v = grown_k, grown_v

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write a pass's own K,V (B, Hkv, n, D) after the slots in use, in place; returns the
        keys and values over every slot now in use."""
        n = k.shape[2]
        self.reserve(n)
        self.buf_k[:, :, self.length : self.length + n] = k
        self.buf_v[:, :, self.length : self.length + n] = v
        self.length += n
        return self.k, self.v

    def append(self, new: AttentionState) -> AttentionState:
        """This state after a pass: itself when the pass extended it in place, else a copy with
        the pass's K,V after its own."""
        if new is self:
            return self
        return AttentionState(torch.cat([self.k, new.k], dim=2), torch.cat([self.v, new.v], dim=2))

    def keep_new(self, drop: torch.Tensor, cut: int | None) -> AttentionState:
        """After dropping the last drop[b] slots of each row: cut to `cut` slots when every row
        drops as many (cut is not None: the next pass writes over them), else unchanged (the
        cache marks the slots invalid)."""
        if cut is not None:
            self.length = cut
        return self

    def reorder_new(self, width: int, order: torch.Tensor) -> AttentionState:
        """The last `width` slots rewritten in `order` (B, width) per row: a token tree's pass
        keeps its accepted path first (`ContextCache.keep_new`)."""
        start = self.length - width
        index = order.to(self.buf_k.device)[:, None, :, None].expand(-1, self.buf_k.shape[1], -1, self.buf_k.shape[3])
        self.buf_k[:, :, start : self.length] = self.buf_k[:, :, start : self.length].gather(2, index)
        self.buf_v[:, :, start : self.length] = self.buf_v[:, :, start : self.length].gather(2, index)
        return self

    def drop_last(self, cut: bool = True) -> AttentionState:
        """Without the last slot: cut when every row's last slot is a token (cut), else unchanged
        (the view marks each row's last valid slot invalid instead)."""
        return AttentionState(self.k[:, :, :-1], self.v[:, :, :-1]) if cut else self.for_view()

    def for_view(self) -> AttentionState:
        """The slots in use now (a view: the cache's later writes go after them)."""
        return AttentionState(self.k, self.v)

    def to(self, device) -> AttentionState:
        return AttentionState(self.k.to(device), self.v.to(device))

    def join(self, other: AttentionState, left_self: int, left_other: int) -> AttentionState:
        """Both states' rows in one (self's first), each left-padded by so many empty slots that
        their slots line up (the cache marks the padding invalid)."""
        length = left_self + self.length
        if left_other + other.length != length:
            raise ValueError("joined attention states must line up to one length")
        batch = self.k.shape[0] + other.k.shape[0]
        k = self.buf_k.new_zeros(batch, self.k.shape[1], max(length, 64), self.k.shape[3])
        v = torch.zeros_like(k)
        for first, state, left in ((0, self, left_self), (self.k.shape[0], other, left_other)):
            rows = slice(first, first + state.k.shape[0])
            k[rows, :, left:length], v[rows, :, left:length] = state.k, state.v
        return AttentionState(k, v, length)

    def select(self, rows: torch.Tensor, drop_front: int = 0) -> AttentionState:
        """Only these rows (a (R,) index), without the first `drop_front` slots."""
        return AttentionState(self.k[rows, :, drop_front:], self.v[rows, :, drop_front:])

    def as_tuple(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.k, self.v)


def attend_over(past: AttentionState | None, k: torch.Tensor, v: torch.Tensor, in_place: bool):
    """Keys and values over [past slots ; this call's own] and the state this call leaves: the
    past state extended in place (the context tower), or this call's own K,V alone (the
    denoiser, whose past is a view it must not write into)."""
    if past is None:
        return k, v, AttentionState(k, v)
    if in_place:
        keys, values = past.extend(k, v)
        return keys, values, past
    return torch.cat([past.k, k], dim=2), torch.cat([past.v, v], dim=2), AttentionState(k, v)


def sdpa(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask, scale: float) -> torch.Tensor:
    """Attention of q (B, Hq, T, D) over keys and values (B, Hkv, P, D) -> (B, Hq, T, D); mask:
    None or (B, 1, T, P) bool, True = may attend. A decoding pass's few queries (at most
    FOLDED_QUERIES: a step, each query of `exact_attention`, a block, a prompt chunk read while
    rows decode): the query heads of each KV group folded into the query axis, (B, Hq, T, D) ->
    (B, Hkv, Hq/Hkv * T, D) with the mask repeated for each, a plain attention call that gives
    each query what grouped-query attention gives it; grouped-query attention (`enable_gqa`)
    would give each query head its own copy of the keys, which a CPU's bf16 kernel pays for in
    proportion to the keys (docs/benchmarks.md, "One query over a long context"). Wider passes
    (prefills) are compute-bound either way and call it as it is."""
    bsz, heads, seq, hd = q.shape
    n_kv = keys.shape[1]
    if seq <= FOLDED_QUERIES and heads != n_kv:
        group = heads // n_kv
        folded_mask = None if mask is None else mask.repeat(1, 1, group, 1)  # (B, 1, group * T, P): head-major, as q folds
        out = F.scaled_dot_product_attention(
            q.reshape(bsz, n_kv, group * seq, hd), keys, values, attn_mask=folded_mask, scale=scale
        )
        return out.reshape(bsz, heads, seq, hd)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)


FOLDED_QUERIES = 17  # the widest pass `sdpa` folds: a block of 16 and the token before it


def exact_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask, scale: float):
    """Attention of a pass's T queries (B, Hq, T, D) that gives each the result of a one-token
    pass at its position bit for bit: every row's every query is a call of its own, as a one-token
    pass calls the kernel when its row is unpadded (one query over the slots up to its own,
    `sdpa`), under its own row of the mask, dropped when
    nothing in it is masked (as `run_layers` drops a one-token pass's). Same call, same result,
    whatever the kernel's summation order depends on.

    Not fewer, wider calls (queries side by side along the batch axis, each over the widest
    one's keys with the rest masked): a CPU kernel's rounding of a query may depend on how many
    keys the call holds even when the extra ones are masked (bf16: now and then, on the data),
    and on which thread computes a row, so on how many rows share the call (fp32); neither holds
    on every CPU, and a check on random data cannot show that it holds for every input.
    A token tree's pass (`masks.tree_mask`: a query sees the past slots and its ancestors among
    the pass's own) gives each query the keys an AR step over its path reads: the past slots,
    then its ancestors' and its own, in order. The queries run depth first, each writing its own
    K,V at its depth's slot after the past ones, so that the slots there hold its path (a chain's
    already do); the pass's own K,V are put back in their order at the end (`_exact_plan`).
    mask: None or (B, 1, T, P + T) bool. Returns (B, Hq, T, D)."""
    batch, _, seq, _ = q.shape
    past = keys.shape[2] - seq
    plan = _exact_plan(mask, past, seq, batch)
    moved = any(write for row in plan for _, _, write, _ in row)
    own_k, own_v = (keys[:, :, past:].clone(), values[:, :, past:].clone()) if moved else (None, None)
    rows = []
    for b, order in enumerate(plan):
        outs = [None] * seq
        for i, depth, write, own in order:
            upto = past + depth + 1
            if write:  # its path's slot at this depth holds another node's K,V
                keys[b : b + 1, :, upto - 1] = own_k[b : b + 1, :, i]
                values[b : b + 1, :, upto - 1] = own_v[b : b + 1, :, i]
            outs[i] = sdpa(q[b : b + 1, :, i : i + 1], keys[b : b + 1, :, :upto], values[b : b + 1, :, :upto], own, scale)
        rows.append(torch.cat(outs, dim=2))
    if moved:  # the pass's own K,V back in their order, as the cache keeps them
        keys[:, :, past:], values[:, :, past:] = own_k, own_v
    return rows[0] if batch == 1 else torch.cat(rows)


_PLAN: list = [None]  # this pass's plan: (a weak reference to its mask, what it was made of, the plan); see RowWise


def _exact_plan(mask, past: int, seq: int, batch: int) -> list[list[tuple]]:
    """How `exact_attention` runs a pass's queries, per row: (query, depth, whether it writes
    its K,V at its depth's slot, its mask over the keys it reads, or None when nothing in it is
    masked) in depth-first order: a query's ancestors among the pass's own (its row of the mask
    there; a chain's are the queries before it) at depths 0..depth-1, itself at its depth.
    The same for every layer of a pass, so made once for its mask (kept until the pass ends:
    `RowWise`)."""
    if mask is None:
        return [[(i, i, False, None) for i in range(seq)] for _ in range(batch)]
    kept = _PLAN[0]
    made_of = (past, seq)
    if kept is not None and kept[0]() is mask and kept[1] == made_of:
        return kept[2]
    own, ctx_all = mask[:, 0, :, past:].tolist(), mask[:, 0, :, :past].all(-1).tolist()
    plan = []
    for b in range(batch):
        paths = [[j for j in range(seq) if own[b][i][j]] for i in range(seq)]  # ancestors, then itself
        children: dict[int, list[int]] = {}
        for i, path in enumerate(paths):
            children.setdefault(path[-2] if len(path) > 1 else -1, []).append(i)
        held, order, stack = list(range(seq)), [], list(reversed(children.get(-1, [])))
        while stack:
            i = stack.pop()
            depth = len(paths[i]) - 1
            own_mask = None
            if not ctx_all[b][i]:
                ones = mask.new_ones(1, 1, 1, depth + 1)
                own_mask = torch.cat([mask[b : b + 1, :, i : i + 1, :past], ones], dim=-1)
            order.append((i, depth, held[depth] != i, own_mask))
            held[depth] = i
            stack.extend(reversed(children.get(i, [])))
        plan.append(order)
    _PLAN[0] = (weakref.ref(mask), made_of, plan)
    return plan


# ------------------------------------------------------------------ hooks shared by the families
def adapter_lookup(adapters):
    """name -> LoRA module or None (nn.ModuleDict has no .get)."""
    if adapters is None:
        return lambda name: None
    return lambda name: adapters[name] if name in adapters else None


class RowWise:
    """Whether the linear projections of the passes run now give each row (position) what a
    one-row pass gives it bit for bit (`linear`): set by `run_layers` around an exact pass.
    Leaving it ends the pass's exact-attention plan (`_exact_plan`)."""

    on = False

    def __init__(self, on: bool):
        self.want, self.was = on, False

    def __enter__(self):
        self.was, RowWise.on = RowWise.on, self.want

    def __exit__(self, *exc):
        RowWise.on = self.was
        if not self.was:  # the exact pass ends, and its exact-attention plan (`_exact_plan`) with it
            _PLAN[0] = None


def linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x), where a dense nn.Linear gives each row what every pass gives it: a one-row pass
    (an AR step) and, in an exact pass (`RowWise.on`), each row of a wider one go through
    `rows_apart`. A CPU's matmul may sum a row's products in one order when it multiplies one
    row and in another when it multiplies several (it depends on the kernel the library picks
    for the shape); `rows_apart` makes both the same call. Wider passes that need not be exact
    and quantised linears (twotower/quant.py) run as they are."""
    rows = x.shape[:-1].numel()
    if type(module) is not nn.Linear or (rows > 1 and not RowWise.on):
        return module(x)
    if rows == 1 and FLOOR_OF.get(_floor_key(module.weight, module.bias)) == 1:  # measured: one row as in any pass
        return module(x)
    apart = rows_apart if Tracing.on else rows_apart_eager  # a custom op's dispatch costs ~30 us a call
    return apart(x.reshape(-1, x.shape[-1]), module.weight, module.bias).reshape(*x.shape[:-1], -1)


def linear_beside(module: nn.Module, x: torch.Tensor, rows: int) -> torch.Tensor:
    """`linear` over two passes' rows at once, x (N, K): the first `rows` are a pass whose rows
    must get what they get in it alone (an exact pass, or a one-row step), the rest a prompt
    chunk riding along (`llama.run_two`). One call where this machine's matmul gives each of
    those rows the same bits in a call of N rows (a dense nn.Linear with a `row_floor`, N within
    the row counts it was checked at); otherwise a call for each pass, the first as in its own
    pass. A pass of several rows that need not be exact shares the call whatever the weights."""
    if rows > 1 and not RowWise.on:
        return linear(module, x)
    n = x.shape[0]
    if type(module) is nn.Linear and n <= max(FLOOR_CHECKED) and row_floor(module.weight, module.bias) is not None:
        with RowWise(True):
            return linear(module, x)
    return torch.cat([linear(module, x[:rows]), module(x[rows:])])


class Tracing:
    """Whether a compiled graph is being traced now (`graphs.LayerGraphs`): `linear` then records
    `rows_apart` as one op of its own, so that the graph calls it as it is."""

    on = False


@torch.library.custom_op("twotower::rows_apart", mutates_args=())
def rows_apart(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`rows_apart_eager` as an op of its own, for compiled graphs."""
    return rows_apart_eager(x, weight, bias)


def rows_apart_eager(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) over x (M, K) with each row what it gets in any pass: computed
    in a call of at least `row_floor` rows (fewer are padded with zero rows), where this
    machine's matmul gives every row the same result at any row count from there on; where no
    such floor was found, each row alone."""
    floor = row_floor(weight, bias)
    rows = x.shape[0]
    if floor is None:
        return F.linear(x, weight, bias) if rows == 1 else torch.cat([F.linear(x[i : i + 1], weight, bias) for i in range(rows)])
    if rows >= floor:
        return F.linear(x, weight, bias)
    return F.linear(torch.cat([x, x.new_zeros(floor - rows, x.shape[1])]), weight, bias)[:rows]


FLOORS = (1, 2, 4)  # row counts tried as the floor
FLOOR_CHECKED = (2, 3, 4, 5, 8, 9, 16, 17)  # row counts checked against it: a verify pass's, a token tree's


FLOOR_OF: dict[tuple, int | None] = {}  # what row_floor measured, by `_floor_key`


def _floor_key(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    return str(weight.device), weight.dtype, weight.shape[1], weight.shape[0], bias is not None, torch.get_num_threads()


def row_floor(weight: torch.Tensor, bias: torch.Tensor | None) -> int | None:
    """The fewest rows R (of FLOORS) such that this machine's matmul of this weight's shape and
    dtype gives each row of a call of M >= R rows (FLOOR_CHECKED), bit for bit, what it gets
    first in an R-row call padded with zero rows; None if none does. Measured once per shape,
    dtype, device and thread count, on random draws (kept in FLOOR_OF). Where it differs, it
    differs by the kernel the library picks for the row count, so in a share of the rows of
    every draw."""
    key = _floor_key(weight, bias)
    if key not in FLOOR_OF:
        FLOOR_OF[key] = _measure_floor(*key[:5])
    return FLOOR_OF[key]


def _measure_floor(device, dtype, inputs, outputs, bias) -> int | None:
    g = torch.Generator().manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
    weight, b = make(outputs, inputs) / inputs**0.5, make(outputs) if bias else None
    draws = [3 * make(max(FLOOR_CHECKED), inputs) for _ in range(16)]  # some 256 rows in all
    wide, alone = {}, {}  # each call made once: (draw, rows) -> its output; (floor, draw, row) -> the row padded alone

    def agrees(floor: int, d: int, rows: int, i: int) -> bool:
        if (d, rows) not in wide:
            wide[d, rows] = F.linear(draws[d][:rows], weight, b)
        if (floor, d, i) not in alone:
            row = draws[d][i : i + 1]
            alone[floor, d, i] = F.linear(torch.cat([row, row.new_zeros(floor - 1, inputs)]), weight, b)[:1]
        return torch.equal(wide[d, rows][i : i + 1], alone[floor, d, i])

    for floor in FLOORS:
        checks = ((d, rows, i) for d in range(len(draws)) for rows in FLOOR_CHECKED if rows >= floor for i in range(rows))
        if all(agrees(floor, *check) for check in checks):
            return floor
    return None


@rows_apart.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


def project(linear_module: nn.Module, x: torch.Tensor, adapter: nn.Module | None) -> torch.Tensor:
    """A linear projection plus its LoRA delta, if any."""
    out = linear(linear_module, x)
    if adapter is not None:
        out = out + adapter(x)
    return out


def project_together(parent: nn.Module, fused: str, names: tuple[str, ...], x: torch.Tensor, get) -> list[torch.Tensor]:
    """Projections of one input (q, k, v; gate, up), each plus its LoRA delta: one matmul over
    their stacked weights when the layer holds them fused under `fused` (`fuse_layers`: a model
    prepared for generation, dense or quantised), else one per projection."""
    stacked = getattr(parent, fused, None)
    if stacked is None:
        return [project(getattr(parent, name), x, get(name)) for name in names]
    outs = linear(stacked, x).split(stacked.sizes, dim=-1)
    return [out if get(name) is None else out + get(name)(x) for out, name in zip(outs, names, strict=True)]


def stack(linears: list[nn.Linear]) -> nn.Linear:
    """One frozen linear layer computing several of one input at once: their weights (and
    biases) stacked along the output axis."""
    first = linears[0]
    stacked = nn.Linear(first.in_features, sum(m.out_features for m in linears), bias=first.bias is not None, device="meta")
    stacked.weight = nn.Parameter(torch.cat([m.weight.detach() for m in linears]), requires_grad=False)
    if first.bias is not None:
        stacked.bias = nn.Parameter(torch.cat([m.bias.detach() for m in linears]), requires_grad=False)
    return stacked


def fuse_layers(layers: nn.ModuleList, fusions) -> list[tuple[nn.Module, str, tuple[str, ...]]]:
    """Decoder layers in place, for inference: the projections of one input that the family
    names (`Family.fusions`) stacked into one frozen nn.Linear under the fused name, with `sizes`
    (each one's outputs), which `project_together` then runs as one matmul. Each projection stays
    too (transformers' own forward calls it), its weights a view of the stacked ones, so the
    stack costs no memory. Layers already fused keep their stacks. Returns the dense stacks the
    layers hold: (sublayer, fused name, projection names) each."""
    stacks, replaced = [], []
    for layer in layers:
        for sublayer, fused, names in fusions:
            parent = getattr(layer, sublayer, None)
            held = getattr(parent, fused, None)
            if held is not None:  # fused already: a dense stack is kept, a quantised one is done
                if type(held) is nn.Linear:
                    stacks.append((parent, fused, names))
                continue
            linears = [getattr(parent, n, None) for n in names]
            if not all(isinstance(m, nn.Linear) for m in linears):
                continue
            stacked = stack(linears)
            stacked.sizes = [m.out_features for m in linears]
            replaced += [
                (weakref.ref(m.weight), m.weight.data_ptr(), m.weight.nbytes * m.weight.is_contiguous()) for m in linears
            ]
            view_projections(stacked, linears)
            setattr(parent, fused, stacked)
            stacks.append((parent, fused, names))
    release_file_pages(replaced)
    return stacks


def view_projections(stacked: nn.Module, projections: list[nn.Module]) -> None:
    """Each projection's weights (and bias) become its rows of the stack's, in order: a view, no
    copy. A dense stack's are Parameters; a quantised one's dense weights are buffers."""
    dense = type(stacked) is nn.Linear
    weight = stacked.weight if dense else stacked.dense_weight
    first = 0
    for proj in projections:
        rows = slice(first, first + proj.out_features)
        if dense:
            proj.weight = nn.Parameter(weight[rows], requires_grad=False)
            if proj.bias is not None:
                proj.bias = nn.Parameter(stacked.bias[rows], requires_grad=False)
        else:
            proj.dense_weight = weight[rows]
            if proj.bias is not None:
                proj.bias = stacked.bias[rows]
        first += proj.out_features


def view_stacks(layers: nn.ModuleList, fusions) -> None:
    """Decoder layers whose tensors were just moved or cast (`.to()`, `.float()`), which copies
    each projection apart from the stack it was a view of: every projection becomes a view of
    its stack again (`view_projections`, as `fuse_layers` made it), so the copies are freed and
    the layers hold each weight once."""
    for layer in layers:
        for sublayer, fused, names in fusions:
            parent = getattr(layer, sublayer, None)
            stacked = getattr(parent, fused, None)
            if stacked is not None:
                view_projections(stacked, [getattr(parent, name) for name in names])


def release_file_pages(tensors: list[tuple]) -> int:
    """Give back the memory of weights no longer used whose bytes a file mapping holds (transformers
    maps a safetensors file and reads the weights from it; a stack copies them): the pages the copy
    read stay resident until the kernel needs them, counted in the process's memory. Each entry:
    (a weak reference to the tensor, its address, its bytes); only a tensor nobody holds any more,
    and only the whole pages of its bytes inside a mapping of a file (/proc/self/maps, Linux):
    weights are read, never written, so dropping them loses nothing (a read would map the file's
    bytes again), and anonymous memory (a copy, a converted dtype) is freed by its owner, never
    here. Returns the bytes released."""
    maps = Path("/proc/self/maps")
    if not tensors or sys.platform != "linux" or not maps.is_file():
        return 0
    files = []
    for line in maps.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5].startswith("/"):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            files.append((lo, hi))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page, released = os.sysconf("SC_PAGE_SIZE"), 0
    for alive, address, size in tensors:
        start, end = -(-address // page) * page, (address + size) // page * page
        if alive() is None and end > start and any(lo <= start and end <= hi for lo, hi in files):
            released += (end - start) * (libc.madvise(start, end - start, MADV_DONTNEED) == 0)
    return released


MADV_DONTNEED = 4  # Linux: drop the pages; a file mapping's are read again from the file on access


def modulate(h: torch.Tensor, modulation: torch.Tensor | None, first: int):
    """adaLN on a normed sublayer input h (B, T, H): h * (1 + scale) + shift, with the triple
    (shift, scale, gate - 1) at modulation[:, first:first + 3] (B, 3, H). Returns the modulated
    input and the gate offset (None without modulation)."""
    if modulation is None:
        return h, None
    shift, scale = modulation[:, first, None, :], modulation[:, first + 1, None, :]  # (B, 1, H) each
    return h * (1 + scale) + shift, gate_of(modulation, first)


def gate_of(modulation: torch.Tensor | None, first: int) -> torch.Tensor | None:
    """The gate offset (B, 1, H) of the triple at modulation[:, first:first + 3], None without modulation."""
    return None if modulation is None else modulation[:, first + 2, None, :]


def gated(out: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """A sublayer's output scaled by its adaLN gate (stored as an offset from 1: zeros are the identity)."""
    return out if gate is None else out * (1 + gate)
