"""Low-rank adapters for the denoiser's linear projections over the shared frozen weights."""

from __future__ import annotations

import math

import torch
from torch import nn


class LoRA(nn.Module):
    """delta(x) = (x @ A^T) @ B^T * alpha / rank; B starts at zero, so the delta starts at zero."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Adapters may be kept in fp32 over a bf16 backbone: compute in theirs, return in x's.
        return ((x.to(self.A.dtype) @ self.A.T) @ self.B.T * self.scale).to(x.dtype)

    def weight_delta(self) -> torch.Tensor:
        """The delta as one fp32 matrix (out, in), scale * B A: what merging adds to the weight."""
        return self.scale * (self.B.float() @ self.A.float())


def build_adapters(layers: list[dict[str, nn.Linear]], targets: list[str], rank: int, alpha: float) -> nn.ModuleList:
    """One {projection name: LoRA} dict per decoder layer, shaped after the layer's linears
    (layers: per layer, its projections by name). A layer without a target gets no adapter for it."""
    per_layer = []
    for linears in layers:
        adapters = nn.ModuleDict()
        for name in targets:
            if name in linears:
                adapters[name] = LoRA(linears[name].in_features, linears[name].out_features, rank, alpha)
        per_layer.append(adapters)
    return nn.ModuleList(per_layer)
