"""Forward pass of a Llama-family decoder (Llama, SmolLM, Mistral, Qwen2, Qwen3) over
the modules of a transformers `*ForCausalLM`, with the hooks the two towers need:

- keys/values from outside: attention runs over `[past K,V ; own K,V]` with any boolean mask
  (the context tower's cache for the context tower and for the denoiser alike);
- adaLN modulation per sublayer (`modulation`, identity when None);
- LoRA deltas on the linear projections (`adapters`, none when None).

The weights are transformers' own modules, so a tower built here computes what transformers
computes; the parity tests check that token for token. `LLAMA` is the family object the two
towers use (`twotower.backbones.base.Family`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

from twotower.backbones.base import (
    AttentionState,
    LayerPass,
    PassOutput,
    RowWise,
    adapter_lookup,
    attend_over,
    exact_attention,
    gate_of,
    gated,
    linear_beside,
    modulate,
    project,
    project_together,
    sdpa,
)
from twotower.backbones.graphs import LayerGraphs

# Per decoder layer, modulation holds 6 vectors: (shift, scale, gate) for attention, then MLP.
N_MODULATION = 6
QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")
FUSIONS = (("self_attn", "qkv_proj", QKV), ("mlp", "gate_up_proj", GATE_UP))  # see base.Family.fusions


def projections(layer: nn.Module) -> dict[str, nn.Linear]:
    """The linear projections of one decoder layer a LoRA adapter may target, by name."""
    children = {**dict(layer.self_attn.named_children()), **dict(layer.mlp.named_children())}
    return {name: m for name, m in children.items() if isinstance(m, nn.Linear)}


def rope_tables(backbone: nn.Module, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin tables for absolute positions (B, T) -> two (B, 1, T, head_dim) tensors (one
    for every head)."""
    probe = torch.empty(0, dtype=dtype, device=positions.device)
    cos, sin = backbone.model.rotary_emb(probe, positions)
    return cos[:, None], sin[:, None]


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (B, heads, T, D), as transformers' `apply_rotary_pos_emb` computes
    it for q and for k (the same ops element by element, so q and k may go in one tensor)."""
    return x * cos + rotate_half(x) * sin


def rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A transformers Llama-family RMSNorm over x: fp32 statistics, the weight applied in x's
    dtype, bit for bit the module's result in three ops instead of eight (a one-token pass of
    the default model runs 61 of them, each op costing its Python dispatch). A norm of another
    form runs as itself."""
    eps = getattr(norm, "variance_epsilon", None)
    if eps is None:
        return norm(x)
    return norm.weight * F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)


def attention_inputs(layer: nn.Module, x, cos, sin, modulation=None, adapters=None):
    """What a layer's attention reads of its input x (B, T, H): the normed (and modulated) input
    projected to q (B, Hq, T, D), k and v (B, Hkv, T, D), q and k rotated (post-RoPE).
    modulation: None or (B, 6, H) (see `decoder_layer`)."""
    attn = layer.self_attn
    bsz, seq, _ = x.shape
    hd = attn.head_dim
    h, _ = modulate(rms_norm(layer.input_layernorm, x), modulation, 0)
    q, k, v = (t.reshape(bsz, seq, -1, hd) for t in project_together(attn, "qkv_proj", QKV, h, adapter_lookup(adapters)))
    v = v.transpose(1, 2)
    if hasattr(attn, "q_norm"):  # Qwen3 normalises q and k per head before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    heads = q.shape[2]
    qk = rope(torch.cat([q, k], dim=2).transpose(1, 2), cos, sin)  # (B, Hq + Hkv, T, D): one rotation for both
    return qk[:, :heads], qk[:, heads:], v


def attend(attn: nn.Module, q, k, v, past_kv, mask, in_place: bool = False, exact: bool = False):
    """q (B, Hq, T, D) over [past K,V ; own K,V] -> (B, Hq, T, D), and the state this call
    leaves: past_kv with this call's K,V written into it (in_place: the context tower), else
    those K,V alone. past_kv: None or an AttentionState, K and V (B, Hkv, P, D) post-RoPE;
    mask: None or (B, 1, T, P + T) bool, True = may attend; exact: as a one-token pass at each
    position (`base.exact_attention`)."""
    keys, values, state = attend_over(past_kv, k, v, in_place)
    if exact and q.shape[2] > 1:
        return exact_attention(q, keys, values, mask, attn.scaling), state
    return sdpa(q, keys, values, mask, attn.scaling), state


def layer_output(layer: nn.Module, x, out, modulation=None, adapters=None):
    """The rest of a layer after attention: the attention output (B, Hq, T, D) projected back
    and added to x (B, T, H) (gated), then the MLP sublayer."""
    get = adapter_lookup(adapters)
    bsz, seq, _ = x.shape
    a = project(layer.self_attn.o_proj, out.transpose(1, 2).reshape(bsz, seq, -1), get("o_proj"))  # (B, T, H)
    x = x + gated(a, gate_of(modulation, 0))
    h, gate = modulate(rms_norm(layer.post_attention_layernorm, x), modulation, 3)
    return x + gated(mlp(layer.mlp, h, adapters), gate)


def mlp(block: nn.Module, x: torch.Tensor, adapters) -> torch.Tensor:
    get = adapter_lookup(adapters)
    gate, up = project_together(block, "gate_up_proj", GATE_UP, x, get)
    return project(block.down_proj, block.act_fn(gate) * up, get("down_proj"))


def decoder_layer(layer, x, cos, sin, past_kv, mask, modulation=None, adapters=None, in_place: bool = False, exact: bool = False):
    """One pre-norm decoder layer. modulation: None or (B, 6, H) = shift/scale/gate-1 for
    attention then MLP (gate stored as an offset from 1 so zeros are the identity)."""
    q, k, v = attention_inputs(layer, x, cos, sin, modulation, adapters)
    out, kv = attend(layer.self_attn, q, k, v, past_kv, mask, in_place, exact)
    return layer_output(layer, x, out, modulation, adapters), kv


class CompiledLayers:
    """`decoder_layer` with the work before and after attention as compiled graphs
    (`graphs.LayerGraphs`), the same for every layer; attention and the cache write stay eager
    (their key count changes every step). LoRA adapters, which are modules of their own, run
    eagerly."""

    def __init__(self):
        self.inputs, self.output = LayerGraphs(attention_inputs), LayerGraphs(layer_output)

    def decoder_layer(self, layer, x, cos, sin, past_kv, mask, modulation=None, adapters=None, in_place=False, exact=False):
        if adapters is not None:
            return decoder_layer(layer, x, cos, sin, past_kv, mask, modulation, adapters, in_place, exact)
        q, k, v = self.inputs(layer, x, cos, sin, modulation)
        out, kv = attend(layer.self_attn, q, k, v, past_kv, mask, in_place, exact)
        return self.output(layer, x, out, modulation), kv

    def run_layers(self, backbone, p: LayerPass) -> PassOutput:
        return run_layers(backbone, p, self.decoder_layer)

    def used(self) -> bool:
        """Whether some pass ran compiled: a graph of each piece compiled and kept."""
        return all(any(g is not None for g in piece.graphs.values()) for piece in (self.inputs, self.output))


def run_layers(backbone, p: LayerPass, layer_fn=decoder_layer) -> PassOutput:
    """The decoder layers and the final norm over one pass (see `LayerPass`); layer_fn: one
    layer (`decoder_layer`, or `CompiledLayers.decoder_layer`).
    Returns the normed hidden states (B, T, H), per layer this call's AttentionState (None for
    every layer when p.keep asks for nothing), and the captured hidden state."""
    cos, sin = rope_tables(backbone, p.positions, p.hidden.dtype)
    mask = None if p.mask is not None and bool(p.mask.all()) else p.mask  # nothing masked: run unmasked, as transformers
    hidden, new, kept = p.hidden, [], {}
    with RowWise(p.exact):
        for i, layer in enumerate(p.modules(backbone)):
            if i in p.captures:
                kept[i] = hidden
            past, modulation, adapters = p.layer(i)
            hidden, kv = layer_fn(layer, hidden, cos, sin, past, mask, modulation, adapters, p.keep.kind == "end", p.exact)
            new.append(None if p.keep.kind == "none" else kv)
    return PassOutput(rms_norm(backbone.model.norm, hidden), new, p.captured(kept))


def run_two(backbone, p: LayerPass, rider: LayerPass) -> tuple[PassOutput, PassOutput]:
    """Two context-tower passes over the layers at once (`TwoTowerForCausalLM.carrying`): the
    rider (a prompt chunk of another cache) shares the calls that work row by row (norms, the
    linear projections: `base.linear_beside`, which keeps p's rows what they get alone; RoPE;
    residual adds), and each pass attends over its own cache with its own mask. A pass's fixed
    cost (some 30 calls per layer) is paid once for both. No modulation, adapters or layer
    subsets (the context tower's passes). Returns each pass's `PassOutput`."""
    passes = (p, rider)
    shapes = [x.hidden.shape[:2] for x in passes]
    rows = shapes[0].numel()
    cos, sin = (torch.cat(t) for t in zip(*(_rope_rows(backbone, x) for x in passes)))  # (N, 1, D) each
    masks = [None if x.mask is not None and bool(x.mask.all()) else x.mask for x in passes]
    hidden = torch.cat([x.hidden.reshape(-1, x.hidden.shape[-1]) for x in passes])  # (N, H): p's rows, then the rider's
    new, kept = ([], []), {}
    with RowWise(p.exact):
        for i, layer in enumerate(backbone.model.layers):
            if i in p.captures:
                kept[i] = hidden
            pasts = [x.layer(i)[0] for x in passes]
            hidden, states = layer_two(layer, hidden, rows, shapes, cos, sin, pasts, masks, p.exact)
            for kept, x, state in zip(new, passes, states):
                kept.append(None if x.keep.kind == "none" else state)
    hidden, captured = rms_norm(backbone.model.norm, hidden), p.captured(kept)

    def output(part: int) -> PassOutput:
        at = slice(0, rows) if part == 0 else slice(rows, None)
        unflat = lambda t: None if t is None else t[at].reshape(*shapes[part], -1)
        return PassOutput(unflat(hidden), new[part], unflat(captured))

    return output(0), output(1)


def _rope_rows(backbone, p: LayerPass):
    """A pass's cos/sin tables per row: (B*T, 1, D) each."""
    return (t[:, 0].reshape(-1, 1, t.shape[-1]) for t in rope_tables(backbone, p.positions, p.hidden.dtype))


def layer_two(layer, x, rows: int, shapes, cos, sin, pasts, masks, exact: bool):
    """One decoder layer over two passes' rows x (N, H), the first `rows` the main pass's (see
    `run_two`); cos, sin (N, 1, D); attention in place in each pass's cache. The activation runs
    per pass, so its elementwise kernel sees only that pass's rows, as alone."""
    attn, block = layer.self_attn, layer.mlp
    parts = (slice(0, rows), slice(rows, None))
    q, k, v = (
        t.reshape(x.shape[0], -1, attn.head_dim)
        for t in projections_beside(attn, "qkv_proj", QKV, rms_norm(layer.input_layernorm, x), rows)
    )
    if hasattr(attn, "q_norm"):  # Qwen3 normalises q and k per head before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    heads = q.shape[1]
    qk = rope(torch.cat([q, k], dim=1), cos, sin)  # (N, Hq + Hkv, D): one rotation for both passes
    outs, states = [], []
    for part, at in enumerate(parts):
        bsz, seq = shapes[part]
        q, k, vp = (t[at].reshape(bsz, seq, -1, attn.head_dim).transpose(1, 2) for t in (qk[:, :heads], qk[:, heads:], v))
        out, state = attend(attn, q, k, vp, pasts[part], masks[part], True, exact and part == 0)  # q (B, Hq, T, D)
        outs.append(out.transpose(1, 2).reshape(bsz * seq, -1))
        states.append(state)
    x = x + linear_beside(attn.o_proj, torch.cat(outs), rows)
    h = rms_norm(layer.post_attention_layernorm, x)
    gate, up = projections_beside(block, "gate_up_proj", GATE_UP, h, rows)
    act = torch.cat([block.act_fn(gate[at]) for at in parts])
    return x + linear_beside(block.down_proj, act * up, rows), states


def projections_beside(parent: nn.Module, fused: str, names: tuple[str, ...], x: torch.Tensor, rows: int) -> list:
    """`base.project_together` without adapters, over two passes' rows (`base.linear_beside`)."""
    stacked = getattr(parent, fused, None)
    if stacked is None:
        return [linear_beside(getattr(parent, name), x, rows) for name in names]
    return list(linear_beside(stacked, x, rows).split(stacked.sizes, dim=-1))


def empty_states(backbone, batch: int) -> list:
    """Per layer an empty AttentionState: the cache of no token."""
    cfg = backbone.config
    weight = backbone.get_input_embeddings().weight
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    empty = weight.new_zeros(batch, cfg.num_key_value_heads, 0, head_dim)
    return [AttentionState(empty, empty) for _ in backbone.model.layers]


def max_context(config) -> int:
    """Longest sequence the backbone can attend over (sliding-window models: the window)."""
    limit = config.max_position_embeddings
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        limit = min(limit, window)
    return limit


class _Llama:
    """The Llama family (Llama, SmolLM, Mistral, Qwen2, Qwen3) as a `base.Family`."""

    name = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    n_modulation = N_MODULATION
    stateful = False
    fusions = FUSIONS
    projections = staticmethod(projections)
    run_layers = staticmethod(run_layers)
    run_two = staticmethod(run_two)
    empty_states = staticmethod(empty_states)
    compiled_layers = CompiledLayers


LLAMA = _Llama()
