"""twotower: a frozen AR context tower plus a trainable denoiser tower that fills blocks of
tokens by mask diffusion.

The names below load on first use (PEP 562), so that `import twotower` and the command line's
`--help` do not import torch. Importing the model class registers it with transformers'
AutoConfig / AutoModelForCausalLM."""

from __future__ import annotations

import importlib

from twotower.settings import (
    BenchOptions,
    EvalOptions,
    GenerationSettings,
    LoadOptions,
    ServeOptions,
    TwoTowerError,
    VerifyOptions,
)

__version__ = "0.1.0"

_LAZY = {  # name: the module that defines it
    "GenerationResult": "twotower.generate",
    "generate": "twotower.generate",
    "generate_ar": "twotower.generate",
    "generate_mask_diffusion": "twotower.generate",
    "generate_mock_ar": "twotower.generate",
    "generate_verify": "twotower.generate",
    "stream": "twotower.generate",
    "TwoTowerConfig": "twotower.config",
    "TwoTowerForCausalLM": "twotower.model.two_tower",
    "load_model": "twotower.model.two_tower",
    "load_backbone": "twotower.backbones",
    "encode_prompt": "twotower.text",
    "eos_token_ids": "twotower.text",
    "evaluate": "twotower.eval.commands",
    "benchmark": "twotower.eval.commands",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'twotower' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "BenchOptions",
    "EvalOptions",
    "GenerationSettings",
    "LoadOptions",
    "ServeOptions",
    "TwoTowerError",
    "VerifyOptions",
    *_LAZY,
]
