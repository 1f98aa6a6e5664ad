"""Forward pass of a hybrid Mamba-2 / attention / MLP / MoE decoder (transformers'
`nemotron_h`) over the modules of a `NemotronHForCausalLM`, with the hooks the two towers need:

- attention layers run over `[past K,V ; own K,V]` with any boolean mask (no RoPE in this
  family: the Mamba layers carry word order);
- Mamba-2 layers start from a given state (`MambaState`: conv + SSM state) and scan the new
  tokens causally in fp32 (`twotower.backbones.ssm`). The context tower keeps the end state
  and the inputs of its last pass (`ScanTail`: a whole extension, a prompt's last token);
  the denoiser throws it away;
- one adaLN triple (shift, scale, gate) per layer: every layer has a single sublayer;
- LoRA deltas on in_proj / out_proj (Mamba), q/k/v/o_proj (attention), up_proj / down_proj
  (MLP, and the shared expert of MoE layers; routed experts have none);
- `LayerPass.blocks = n`: a (B, n*S) input is n blocks, each scanned by the Mamba layers from
  its own state (states of batch B*n): the training pass, blocks folded into the batch.

MoE layers use transformers' router and experts as they are (the routing is a pure
function of the input, so it is deterministic). `NEMOTRON_H` is the family object the two
towers use (`twotower.backbones.base.Family`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from twotower.backbones.base import (
    NOTHING,
    AttentionState,
    Keep,
    LayerPass,
    PassOutput,
    adapter_lookup,
    attend_over,
    exact_attention,
    gated,
    modulate,
    project,
    sdpa,
)
from twotower.backbones.ssm import MambaState, ScanTail, chunked_scan, seeded_conv

N_MODULATION = 3
MAMBA_KINDS = ("linear_attention", "mamba")
ATTENTION_KINDS = ("full_attention", "attention")


def projections(layer: nn.Module) -> dict[str, nn.Linear]:
    """The linear projections of one layer a LoRA adapter may target, by name."""
    mixer = layer.mixer
    shared = getattr(mixer, "shared_experts", None)  # MoE: only the shared expert (see `moe`)
    owner = mixer if shared is None else shared
    return {name: m for name, m in owner.named_children() if isinstance(m, nn.Linear)}


def attention(attn: nn.Module, x, past_kv, mask, adapters, in_place: bool = False, exact: bool = False):
    """x: (B, T, H); past_kv: None or an AttentionState, K and V (B, Hkv, P, D); mask: None or
    (B, 1, T, P+T) bool. Returns the output (B, T, H) and the state this call leaves (past_kv
    extended in place when in_place, else this call's own K,V)."""
    bsz, seq, _ = x.shape
    get = adapter_lookup(adapters)
    hd = attn.head_dim
    q = project(attn.q_proj, x, get("q_proj")).view(bsz, seq, -1, hd).transpose(1, 2)
    k = project(attn.k_proj, x, get("k_proj")).view(bsz, seq, -1, hd).transpose(1, 2)
    v = project(attn.v_proj, x, get("v_proj")).view(bsz, seq, -1, hd).transpose(1, 2)
    keys, values, state = attend_over(past_kv, k, v, in_place)
    if exact and seq > 1:
        out = exact_attention(q, keys, values, mask, attn.scaling)
    else:
        out = sdpa(q, keys, values, mask, attn.scaling)
    return project(attn.o_proj, out.transpose(1, 2).reshape(bsz, seq, -1), get("o_proj")), state


def mlp(block: nn.Module, x, adapters):
    get = adapter_lookup(adapters)
    return project(block.down_proj, block.act_fn(project(block.up_proj, x, get("up_proj"))), get("down_proj"))


def moe(block: nn.Module, x, adapters):
    """transformers' NemotronHMoE with LoRA on its shared expert."""
    _, weights, chosen = block.gate(x)
    routed = block.fc2_latent_proj(block.experts(block.fc1_latent_proj(x.reshape(-1, x.shape[-1])), chosen, weights))
    return routed.view(x.shape) + mlp(block.shared_experts, x, adapters)


def mamba(mixer: nn.Module, x, state: MambaState | None, valid, adapters, keep: Keep = NOTHING):
    """One Mamba-2 mixer from `state` (zeros when None) over x (B, T, H).

    valid: None or (B, T) bool; padded positions are zeroed before and after the conv, as in
    transformers, so left padding leaves a zero state. keep: nothing (the end state is not
    wanted), the end state with a `ScanTail` of the last `keep.tail` tokens (all of them when
    None, to go back that far later), or the states at every `keep.every` = S tokens, folded
    into the batch: (B * T/S) states, the i-th of row b being the state before token i*S.
    Returns the output (B, T, H) and the state asked for (or None).
    """
    bsz, seq, _ = x.shape
    get = adapter_lookup(adapters)
    heads, head_dim, groups = mixer.num_heads, mixer.head_dim, mixer.n_groups
    n_state, k1 = mixer.ssm_state_size, mixer.conv_kernel_size - 1
    if valid is not None:
        x = x * valid[..., None].to(x.dtype)
    gate, xbc, dt = project(mixer.in_proj, x, get("in_proj")).split([mixer.intermediate_size, mixer.conv_dim, heads], dim=-1)
    conv_state = state.conv if state is not None else xbc.new_zeros(bsz, mixer.conv_dim, k1)
    h0 = state.ssm if state is not None else torch.zeros(bsz, heads, head_dim, n_state, device=x.device)
    conv, new_conv = seeded_conv(xbc, conv_state, mixer.conv1d.weight, mixer.conv1d.bias)
    conv = mixer.act(conv)
    if valid is not None:
        conv = conv * valid[..., None].to(conv.dtype)
    xs, b, c = conv.split([mixer.intermediate_size, groups * n_state, groups * n_state], dim=-1)
    xs, b, c = xs.view(bsz, seq, heads, head_dim), b.view(bsz, seq, groups, n_state), c.view(bsz, seq, groups, n_state)
    low, high = mixer.time_step_limit
    dt = F.softplus(dt.float() + mixer.dt_bias.float()).clamp(min=low, max=high)
    A, D = -torch.exp(mixer.A_log.float()), mixer.D
    new = None
    if keep.kind == "none":
        y, _ = chunked_scan(xs, dt, A, b, c, D, h0, mixer.chunk_size)
    elif keep.kind == "end":
        split = 0 if keep.tail is None else max(seq - keep.tail, 0)  # the tail is x[:, split:]
        ys, h_mid = [], h0
        if split:
            y_head, h_mid = chunked_scan(xs[:, :split], dt[:, :split], A, b[:, :split], c[:, :split], D, h0, mixer.chunk_size)
            ys.append(y_head)
        y_tail, h_end = chunked_scan(xs[:, split:], dt[:, split:], A, b[:, split:], c[:, split:], D, h_mid, mixer.chunk_size)
        y = torch.cat([*ys, y_tail], dim=1)
        window = torch.cat([conv_state.to(xbc.dtype), xbc.transpose(1, 2)], dim=2)[:, :, split:]
        tail = ScanTail(window, h_mid, xs[:, split:], dt[:, split:], b[:, split:], A)
        new = MambaState(new_conv, h_end, tail, torch.full((bsz,), seq - split, dtype=torch.long, device=x.device))
    else:
        starts = []
        y, _ = chunked_scan(xs, dt, A, b, c, D, h0, keep.every, starts=starts)
        window = torch.cat([conv_state.to(xbc.dtype), xbc.transpose(1, 2)], dim=2)  # (B, C, K-1+T)
        convs = window.unfold(2, k1, keep.every)[:, :, : len(starts)]  # (B, C, n, K-1)
        new = MambaState(
            convs.permute(0, 2, 1, 3).reshape(-1, mixer.conv_dim, k1),
            torch.stack(starts, dim=1).reshape(-1, heads, head_dim, n_state),
        )
    y = mixer.norm(y.reshape(bsz, seq, -1), gate)
    return project(mixer.out_proj, y.to(x.dtype), get("out_proj")), new


def run_layers(backbone, p: LayerPass) -> PassOutput:
    """All layers and the final norm over one pass (see `LayerPass`: positions are unused, this
    family has no RoPE; valid, blocks and keep steer the Mamba layers).
    Returns the normed hidden states (B, T, H), per layer the state p.keep asks for (this
    call's AttentionState, the Mamba state, or None: MLP / MoE layers, or keep = nothing), and
    the captured hidden state.
    """
    mask = None if p.mask is not None and bool(p.mask.all()) else p.mask
    hidden, kept = p.hidden, {}
    bsz, seq, width = hidden.shape
    new = []
    for i, layer in enumerate(p.modules(backbone)):
        if i in p.captures:
            kept[i] = hidden
        past, modulation, adapters = p.layer(i)
        kind = layer.block_type
        h, gate = modulate(layer.norm(hidden.to(layer.norm.weight.dtype)), modulation, 0)
        entry = None
        if kind in MAMBA_KINDS:
            folded = h.reshape(bsz * p.blocks, seq // p.blocks, width)
            out, entry = mamba(layer.mixer, folded, past, p.valid, adapters, p.keep)
            out = out.reshape(bsz, seq, width)
        elif kind in ATTENTION_KINDS:
            out, entry = attention(layer.mixer, h, past, mask, adapters, p.keep.kind == "end", p.exact)
        elif kind == "moe":
            out = moe(layer.mixer, h, adapters)
        else:
            out = mlp(layer.mixer, h, adapters)
        hidden = hidden + gated(out, gate)
        new.append(None if p.keep.kind == "none" else entry)
    return PassOutput(backbone.model.norm_f(hidden), new, p.captured(kept))


def empty_states(backbone, batch: int) -> list:
    """Per layer: empty K,V, a zero Mamba state, or None: the cache of no token."""
    cfg = backbone.config
    weight = backbone.get_input_embeddings().weight
    out = []
    for layer in backbone.model.layers:
        mixer = layer.mixer
        if layer.block_type in MAMBA_KINDS:
            out.append(
                MambaState(
                    weight.new_zeros(batch, mixer.conv_dim, mixer.conv_kernel_size - 1),
                    torch.zeros(batch, mixer.num_heads, mixer.head_dim, mixer.ssm_state_size, device=weight.device),
                )
            )
        elif layer.block_type in ATTENTION_KINDS:
            empty = weight.new_zeros(batch, cfg.num_key_value_heads, 0, mixer.head_dim)
            out.append(AttentionState(empty, empty))
        else:
            out.append(None)
    return out


class _NemotronH:
    """The hybrid Mamba-2 / attention / MLP / MoE family (`nemotron_h`) as a `base.Family`."""

    name = "nemotron_h"
    model_types = ("nemotron_h",)
    n_modulation = N_MODULATION
    stateful = True
    fusions = ()  # its projections of one input already are one matmul (in_proj)
    projections = staticmethod(projections)
    run_layers = staticmethod(run_layers)
    empty_states = staticmethod(empty_states)
    compiled_layers = None  # its Mamba scans and MoE routing stay eager
    run_two = None  # a Mamba scan is not row by row


NEMOTRON_H = _NemotronH()
