"""Weight-only quantised linear layers for CPU inference (`--weights int8|int4`).

A pass of a 135M model at batch 1 reads every weight once per token, so on a CPU it is bound
by the bytes it reads (its matmuls are most of an AR step: docs/benchmarks.md). Fewer bytes per
weight make it faster:

- int4: 4-bit weights in groups of 32 along the input axis, each group with its own scale and
  zero (w = (q - 8) * scale + zero). The default backbone's GGUF stores every linear
  projection as Q4_1, which is exactly this format (blocks of 32, w = d * q + m), so for it int4
  gives back the GGUF's own weights up to the rounding of d and m to the activation dtype;
- int8: 8-bit weights with one scale per output channel (symmetric). The LM head uses it in
  int4 mode too: the GGUF stores the tied embedding as Q8_0, which 4 bits cannot hold.

The kernels are PyTorch's own CPU ones (`aten._weight_int4pack_mm_for_cpu`,
`aten._weight_int8pack_mm`, as gpt-fast and torchao use them), so there is nothing to build.
They unpack the weights again for every row of the input, so their cost grows with the rows
of a pass until, past a few rows, it exceeds the dense matmul's (the pass costs by width:
docs/benchmarks.md, "Quantised weights"). A quantised layer therefore keeps the dense weights
too and uses them for passes of more than `QUANTISED_ROWS` rows (long drafts, wide batches,
prompts): the quantised weights serve what is bound by reading weights, the dense ones what
is bound by arithmetic. A pass of at most that many rows gives every row the logits of a
one-row pass, bit for bit (each row is unpacked and summed alike), so verify mode keeps its
passes that narrow on a quantised model and stays token for token its AR output
(`TwoTowerForCausalLM.exact_rows`). Inference only:
a quantised model neither trains nor saves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from twotower.backbones.base import fuse_layers
from twotower.config import WEIGHT_FORMATS, TwoTowerError

GROUP = 32  # int4 group along the input axis (the GGUF's Q4_1 block)
ROWS = 16  # the int4 kernel packs output channels in sixteens
QUANTISED_ROWS = 8  # passes of at most this many rows (batch x positions) use the quantised weights (docs/benchmarks.md)


def fits_int4(linear: nn.Linear) -> bool:
    """Whether the int4 kernel takes this projection's shape (else it is stored int8)."""
    return linear.in_features % GROUP == 0 and linear.out_features % ROWS == 0


class _Quantised(nn.Module):
    """What both formats share: the dense weights (the same tensors as the layer replaced, so
    they cost no copy) for passes of more than QUANTISED_ROWS rows, and the bias."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("dense_weight", linear.weight.detach())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """The layer over its dense weights, however many rows."""
        return F.linear(x, self.dense_weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # (rows, K)
        if flat.shape[0] > QUANTISED_ROWS:
            return self.dense(x)
        out = self.quantised_mm(flat.to(self.dense_weight.dtype))
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)


class Int8Linear(_Quantised):
    """y = x W^T + b with W int8 (N, K), one scale per output channel."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        w = linear.weight.detach().float()  # (N, K)
        scale = (w.abs().amax(1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        self.register_buffer("weight_int8", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))

    def quantised_mm(self, flat: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.scale)


class Int4Linear(_Quantised):
    """y = x W^T + b with W 4-bit (N, K) in groups of GROUP inputs, a scale and a zero per group."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        w = linear.weight.detach().float()  # (N, K)
        n, k = w.shape
        groups = w.view(n, k // GROUP, GROUP)
        low, high = groups.amin(-1), groups.amax(-1)  # (N, K/G)
        scale = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
        q = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).view(n, k)
        zero = low + 8 * scale  # the kernel computes (q - 8) * scale + zero
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        self.register_buffer("scales_zeros", torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(linear.weight.dtype))

    def quantised_mm(self, flat: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, GROUP, self.scales_zeros)

    def dequantized(self) -> torch.Tensor:
        """The weights this layer computes with, (N, K) fp32 (what the tests compare)."""
        n, k = self.out_features, self.in_features
        eye = torch.eye(k, dtype=self.scales_zeros.dtype)
        return self.quantised_mm(eye).float().T.reshape(n, k)


def quantised(linear: nn.Linear, weights: str) -> _Quantised:
    """One projection as `weights` ("int8" or "int4"; a shape the int4 kernel does not take is
    stored int8)."""
    if linear.weight.device.type != "cpu":
        raise TwoTowerError(f"--weights {weights} is a CPU path (PyTorch's CPU kernels); the model is on {linear.weight.device}")
    return Int4Linear(linear) if weights == "int4" and fits_int4(linear) else Int8Linear(linear)


def _check(weights: str) -> None:
    if weights not in WEIGHT_FORMATS[1:]:
        raise TwoTowerError(f"unknown weight format {weights!r}; choose one of {', '.join(WEIGHT_FORMATS)}")


def quantize_linears(module: nn.Module, weights: str) -> int:
    """Replace every nn.Linear inside `module` in place by `weights` (see `quantised`). Returns
    how many were replaced."""
    _check(weights)
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, quantised(child, weights))
                replaced += 1
    return replaced


def quantize_backbone(backbone: nn.Module, weights: str, fusions=()) -> int:
    """A transformers `*ForCausalLM` in place: its layers' projections as `weights`
    (`quantize_layers`) and its LM head int8 (the embedding it may be tied to stays as it is).
    Returns how many projections were replaced."""
    replaced = quantize_layers(backbone.model.layers, weights, fusions)
    if isinstance(backbone.lm_head, nn.Linear):
        backbone.lm_head = Int8Linear(backbone.lm_head)
        replaced += 1
    return replaced


def quantize_layers(layers: nn.ModuleList, weights: str, fusions=()) -> int:
    """Decoder layers in place: their projections as `weights`, those of one input also stacked
    into one matmul where the family names them (`fusions`: `base.fuse_layers`, whose stacks a
    dense model prepared for generation may hold already). Returns how many projections were
    replaced."""
    _check(weights)
    replaced = 0
    for parent, fused, names in fuse_layers(layers, fusions):
        stacked = quantised(getattr(parent, fused), weights)
        stacked.sizes = getattr(parent, fused).sizes
        setattr(parent, fused, stacked)
        # Each projection stays too, for transformers' own forward (its `generate`, which the
        # benchmark times), its dense weights a view of the stacked ones.
        for name in names:
            setattr(parent, name, quantised(getattr(parent, name), weights))
        replaced += len(names)
    return replaced + quantize_linears(layers, weights)  # the projections left
