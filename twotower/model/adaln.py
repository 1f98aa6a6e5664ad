"""adaLN-single time conditioning (PixArt-alpha), identity-initialised.

t in [0, 1] (masking level) -> sinusoidal(t * 1000, 256) -> t_embedder (Linear, SiLU, Linear)
-> SiLU -> t_block (Linear to 6H, zero-initialised) + a learned per-layer table (zeros).
Each sublayer gets (shift, scale, gate-1): a Llama layer one triple for attention and one for
the MLP (per_layer=6), a hybrid layer one for its single mixer (per_layer=3). All zeros at
initialisation, which is the identity.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) in [0, 1] -> (B, dim) sinusoidal embedding of t * 1000 (DiT convention)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimeConditioning(nn.Module):
    def __init__(self, hidden_size: int, num_layers: int, freq_dim: int = 256, per_layer: int = 6):
        super().__init__()
        self.freq_dim, self.per_layer = freq_dim, per_layer
        self.t_embedder = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, per_layer * hidden_size))
        self.layer_tables = nn.Parameter(torch.zeros(num_layers, per_layer, hidden_size))
        nn.init.zeros_(self.t_block[1].weight)
        nn.init.zeros_(self.t_block[1].bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t: (B,) -> modulation (B, L, per_layer, H)."""
        p = self.t_block[1].weight
        emb = timestep_embedding(t, self.freq_dim).to(p.dtype)
        shared = self.t_block(self.t_embedder(emb)).view(t.shape[0], 1, self.per_layer, -1)
        return shared + self.layer_tables[None]
