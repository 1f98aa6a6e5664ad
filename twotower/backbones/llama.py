"""Forward pass of a Llama-family decoder (Llama, SmolLM, Mistral, Qwen2, Qwen3) over
the modules of a transformers `*ForCausalLM`, with the hooks the two towers need:

- keys/values from outside: attention runs over `[past K,V ; own K,V]` with any boolean mask
  (the context tower's cache for the context tower and for the denoiser alike);
- adaLN modulation per sublayer (`modulation`, identity when None);
- LoRA deltas on the linear projections (`adapters`, none when None).

The weights are transformers' own modules, so a tower built here computes what transformers
computes; the parity tests check that token for token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

# Per decoder layer, modulation holds 6 vectors: (shift, scale, gate) for attention, then MLP.
N_MODULATION = 6


def projections(layer: nn.Module) -> dict[str, nn.Linear]:
    """The linear projections of one decoder layer a LoRA adapter may target, by name."""
    children = {**dict(layer.self_attn.named_children()), **dict(layer.mlp.named_children())}
    return {name: m for name, m in children.items() if isinstance(m, nn.Linear)}


def rope_tables(backbone: nn.Module, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin tables for absolute positions (B, T) -> two (B, T, head_dim) tensors."""
    probe = torch.empty(0, dtype=dtype, device=positions.device)
    return backbone.model.rotary_emb(probe, positions)


def _project(linear: nn.Linear, x: torch.Tensor, adapter: nn.Module | None) -> torch.Tensor:
    out = linear(x)
    if adapter is not None:
        out = out + adapter(x)
    return out


def _adapter_lookup(adapters):
    """name -> LoRA module or None (nn.ModuleDict has no .get)."""
    if adapters is None:
        return lambda name: None
    return lambda name: adapters[name] if name in adapters else None


def attention(attn: nn.Module, x, cos, sin, past_kv, mask, adapters):
    """Self-attention of one layer over [past K,V ; own K,V].

    x: (B, T, H); past_kv: None or ((B, Hkv, P, D), (B, Hkv, P, D)) post-RoPE;
    mask: None or (B, 1, T, P + T) bool, True = may attend.
    Returns the output (B, T, H) and this call's own post-RoPE (k, v), each (B, Hkv, T, D).
    """
    bsz, seq, _ = x.shape
    hd = attn.head_dim
    get = _adapter_lookup(adapters)
    q = _project(attn.q_proj, x, get("q_proj")).view(bsz, seq, -1, hd)
    k = _project(attn.k_proj, x, get("k_proj")).view(bsz, seq, -1, hd)
    v = _project(attn.v_proj, x, get("v_proj")).view(bsz, seq, -1, hd).transpose(1, 2)
    if hasattr(attn, "q_norm"):  # Qwen3 normalises q and k per head before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # (B, Hq|Hkv, T, D)
    if past_kv is not None:
        keys, values = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
    else:
        keys, values = k, v
    n_kv = keys.shape[1]
    if seq == 1 and mask is not None and q.shape[1] != n_kv:
        # One query with padding: fold the query heads of each KV group into the query axis,
        # (B, Hq, 1, D) -> (B, Hkv, Hq/Hkv, D); the kernel transformers uses here, bit for bit.
        out = F.scaled_dot_product_attention(q.reshape(bsz, n_kv, -1, hd), keys, values, attn_mask=mask,
                                             scale=attn.scaling)
        out = out.reshape(bsz, 1, -1)
    else:
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling, enable_gqa=True)
        out = out.transpose(1, 2).reshape(bsz, seq, -1)  # (B, T, Hq * D)
    return _project(attn.o_proj, out, get("o_proj")), (k, v)


def mlp(block: nn.Module, x: torch.Tensor, adapters) -> torch.Tensor:
    get = _adapter_lookup(adapters)
    gate = _project(block.gate_proj, x, get("gate_proj"))
    up = _project(block.up_proj, x, get("up_proj"))
    return _project(block.down_proj, block.act_fn(gate) * up, get("down_proj"))


def decoder_layer(layer, x, cos, sin, past_kv, mask, modulation=None, adapters=None):
    """One pre-norm decoder layer. modulation: None or (B, 6, H) = shift/scale/gate-1 for
    attention then MLP (gate stored as an offset from 1 so zeros are the identity)."""
    h = layer.input_layernorm(x)
    if modulation is not None:
        shift, scale, gate = (modulation[:, i, None, :] for i in range(3))  # (B, 1, H) each
        h = h * (1 + scale) + shift
    a, kv = attention(layer.self_attn, h, cos, sin, past_kv, mask, adapters)
    x = x + (a * (1 + gate) if modulation is not None else a)
    h = layer.post_attention_layernorm(x)
    if modulation is not None:
        shift, scale, gate = (modulation[:, i, None, :] for i in range(3, 6))
        h = h * (1 + scale) + shift
    m = mlp(layer.mlp, h, adapters)
    x = x + (m * (1 + gate) if modulation is not None else m)
    return x, kv


def run_layers(backbone, hidden, positions, mask, past=None, modulation=None, adapters=None):
    """All decoder layers and the final norm.

    hidden: (B, T, H) input embeddings; positions: (B, T) absolute RoPE positions;
    past: None or a per-layer list of (k, v); modulation: None or (B, L, 6, H);
    adapters: None or a per-layer list of {projection name: LoRA module}.
    Returns the normed hidden states (B, T, H) and the per-layer list of this call's (k, v).
    """
    cos, sin = rope_tables(backbone, positions, hidden.dtype)
    if mask is not None and bool(mask.all()):
        mask = None  # nothing masked: let the kernel run unmasked (as transformers does)
    new_kv = []
    for i, layer in enumerate(backbone.model.layers):
        hidden, kv = decoder_layer(
            layer,
            hidden,
            cos,
            sin,
            None if past is None else past[i],
            mask,
            None if modulation is None else modulation[:, i],
            None if adapters is None else adapters[i],
        )
        new_kv.append(kv)
    return backbone.model.norm(hidden), new_kv


def max_context(config) -> int:
    """Longest sequence the backbone can attend over (sliding-window models: the window)."""
    limit = config.max_position_embeddings
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        limit = min(limit, window)
    return limit
