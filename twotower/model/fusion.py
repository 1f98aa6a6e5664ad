"""Reading the context tower's features from several depths (docs/METHOD.md section 3.7).

A shallow denoiser's anchor slot reads the context tower's hidden state entering its first
aligned layer; with `fuse_layers` the context pass also keeps the hidden states entering those
layers at the anchor, and `FeatureFusion` maps all of them to one vector that is added to every
slot after the anchor (the pending AR token's embedding and the masks), as EAGLE-3 feeds its
drafter a fusion of the target's low, middle and high features. The map starts at zero, so an
untrained fusion leaves the denoiser exactly as it was (and the anchor slot is never touched).
"""

from __future__ import annotations

import torch
from torch import nn


class FeatureFusion(nn.Module):
    """(..., k*H) hidden states of the anchor at k depths -> (..., H): each depth RMS-normalised
    (their scales grow with depth), then one linear map, zero at first."""

    def __init__(self, width: int, depths: int):
        super().__init__()
        self.width, self.depths = width, depths
        self.proj = nn.Linear(depths * width, width, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        parts = features.unflatten(-1, (self.depths, self.width)).float()
        parts = parts * torch.rsqrt(parts.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.proj(parts.flatten(-2).to(self.proj.weight.dtype))
