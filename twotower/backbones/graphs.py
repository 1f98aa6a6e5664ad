"""Compiled pieces of a layer: a function of (layer, tensors...) as one inductor graph per input
shape, traced with the layer's weights as inputs, so that every layer of a backbone with the
same structure shares it.

Why: a one-position pass of a 135M model dispatches some 2,000 small ops one by one from
Python, and on a CPU that costs about as long as computing them (an int4 AR step of the
default model: about half its time). torch.compile's dynamo front end removes the ops but
checks guards over every weight of the layer on each call (measured: ~60 us a call, 3.7 ms a
step here), so the graphs are traced directly (`make_fx`) and compiled by inductor
(`torch._inductor.compile`): a call is the compiled code alone, and which graph applies is
looked up here by the inputs' shapes, dtypes and strides (fixed shapes: a new shape compiles
once, about a second, the first of a process a few seconds more).

What a graph gives, measured on the default model (int4 and dense, bf16):

- each row and position the same result at any width and batch size of the pass (the norms'
  sums run per row in the same order; the matmuls are the eager kernels): a verify pass over
  8 positions gave, position for position, the logits of 8 compiled one-position steps (0 of
  192 teacher-forced positions differed), so verify mode over compiled passes is compiled AR
  token for token;
- not the eager pass's last bits: inductor's RMSNorm sums in another order than the eager
  kernel, which on real hidden states (values up to ~180) moves a bf16 result by one rounding
  now and then, so a near-tie may break otherwise than eagerly (compiled AR replies equal the
  eager ones in most but not all cases). That is why compiling is a choice (`--compile`), off
  by default.

Only bf16 / fp16 passes compile (`emulate_precision_casts`, which rounds intermediates as eager
does); fp32, the bit-exact reference, runs eagerly. On the first call of each shape at each
layer the graph is checked against the eager function, within bf16 rounding of each element and
its row (`close`); a graph that is off by more, or that fails to compile (no C++ compiler), runs
eagerly from then on, with one warning. The graphs hold the layers' tensors: a model moved or
cast after `compile_steps` compiles again (`TwoTowerForCausalLM._apply`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from twotower.backbones.base import RowWise, Tracing

_MISSING = object()
COMPILED_DTYPES = (torch.bfloat16, torch.float16)  # see above: fp32 runs eagerly


def close(a, b, tolerance: float = 2**-6) -> bool:
    """Whether a graph's outputs a are the eager ones b up to rounding: same dtypes and shapes,
    and every element within `tolerance` of eager, relative to itself and to its row's root mean
    square (bf16 keeps 8 bits: a rounding or two moves an element by ~2**-8 of itself, and a
    matmul spreads that over its row; a wrong graph, a dropped or scaled channel, far more)."""
    if isinstance(a, torch.Tensor):
        if not (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape):
            return False
        a, b = a.float(), b.float()
        rms = b.pow(2).mean(-1, keepdim=True).sqrt() if b.dim() else b.abs()
        return bool(((a - b).abs() <= tolerance * (b.abs() + rms)).all().item())
    return len(a) == len(b) and all(close(x, y, tolerance) for x, y in zip(a, b, strict=True))


class _Bound(nn.Module):
    """fn over one layer as a module, for `torch.func.functional_call`."""

    def __init__(self, fn: Callable, layer: nn.Module):
        super().__init__()
        self.fn, self.layer = fn, layer

    def forward(self, *args):
        return self.fn(self.layer, *args)


class LayerGraphs:
    """fn(layer, *args) compiled per kind of call; args are tensors or None (a None is part of
    the graph: an absent modulation is no input)."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.graphs: dict = {}  # (layer structure, args' shapes) -> compiled graph, or None: eager
        self.weights: dict[int, tuple[nn.Module, tuple, list[str], list[torch.Tensor]]] = {}
        self.checked: set = set()  # (key, id(layer)) whose first call was compared with eager
        self.warned = False

    def _weights(self, layer: nn.Module):
        """(structure, tensor names, tensors) of a layer, gathered once (the layer is held, so its
        id is not reused)."""
        held = self.weights.get(id(layer))
        if held is None or held[0] is not layer:
            named = {**dict(layer.named_parameters(remove_duplicate=False)), **dict(layer.named_buffers(remove_duplicate=False))}
            names = [n for n, t in named.items() if t is not None]
            tensors = [named[n] for n in names]
            structure = tuple((n, t.shape, t.dtype, t.stride()) for n, t in zip(names, tensors, strict=True))
            held = self.weights[id(layer)] = (layer, structure, names, tensors)
        return held[1:]

    def __call__(self, layer: nn.Module, *args):
        structure, names, tensors = self._weights(layer)
        args_key = tuple(None if a is None else (a.shape, a.dtype, a.stride(), a.device) for a in args)
        key = (structure, args_key, RowWise.on)  # an exact pass's linears run rows apart (base.linear)
        graph = self.graphs.get(key, _MISSING)
        given = [a for a in args if a is not None]
        if graph is _MISSING:
            graph = self.graphs[key] = self._compile(names, tensors, args, layer) if self._compiles(args) else None
        if graph is None:
            return self.fn(layer, *args)
        out = graph(*tensors, *given)
        if (key, id(layer)) not in self.checked:  # the first call of this shape at this layer
            self.checked.add((key, id(layer)))
            eager = self.fn(layer, *args)
            if not close(out, eager):
                self._warn(f"compiled, differ from the eager pass in {given[0].dtype} by more than rounding")
                self.graphs[key] = None
                return eager
        return out

    @staticmethod
    def _compiles(args) -> bool:
        return all(a.dtype in COMPILED_DTYPES for a in args if a is not None and a.is_floating_point())

    def _compile(self, names, tensors, args, layer):
        """The graph of fn for calls like this one (None: it does not compile)."""
        slots = [a is not None for a in args]
        bound = _Bound(self.fn, layer)
        n = len(names)

        def flat(*inputs):
            given = iter(inputs[n:])
            full = tuple(next(given) if present else None for present in slots)
            weights = {f"layer.{name}": t for name, t in zip(names, inputs[:n], strict=True)}
            return torch.func.functional_call(bound, weights, full)

        given = [a for a in args if a is not None]
        try:
            from torch._inductor import config as inductor_config
            from torch.fx.experimental.proxy_tensor import make_fx

            was, Tracing.on = Tracing.on, True
            try:
                traced = make_fx(flat)(*tensors, *given)
            finally:
                Tracing.on = was
            with inductor_config.patch(emulate_precision_casts=True):
                return torch._inductor.compile(traced, [*tensors, *given])
        except Exception as error:  # any failure to compile means: run eagerly
            self._warn(f"could not be compiled ({type(error).__name__}: {str(error).strip().splitlines()[0][:200]})")
            return None

    def _warn(self, why: str) -> None:
        if not self.warned:
            warnings.warn(f"twotower: the layer pieces `{self.fn.__name__}` {why}; those passes run eagerly", stacklevel=3)
            self.warned = True
