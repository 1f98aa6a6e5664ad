"""From `LoadOptions` to a model ready for inference on this machine: the dtype rule for the
mode (twotower/machine.py), torch's threads, quantised weights, merged adapters, compiled
passes. The command line, eval, bench and the server all load through `load_for_inference`."""

from __future__ import annotations

import torch

from twotower.machine import auto_dtype
from twotower.settings import DTYPES, LoadOptions


def torch_dtype(name: str, mode: str | None = None) -> torch.dtype:
    """A dtype name of LoadOptions as torch's; auto: the machine's rule for the mode."""
    return auto_dtype(mode) if name == "auto" else getattr(torch, DTYPES[name])


def load_for_inference(options: LoadOptions, mode: str | None = None, **overrides):
    """(model, tokenizer) as the options say, for generation in `mode` (None: any mode);
    overrides: load_model's keywords to set otherwise (e.g. weights="dense" for a reference)."""
    from twotower.model.loading import load_model

    if options.threads:
        torch.set_num_threads(options.threads)
    kwargs = dict(dtype=torch_dtype(options.dtype, mode), weights=options.weights, merge=True, compile_steps=options.compile,
                  backbone=options.backbone)  # fmt: skip
    return load_model(options.model, **{**kwargs, **overrides})
