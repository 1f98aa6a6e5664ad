"""twotower: a frozen AR context tower plus a trainable denoiser tower that fills blocks of
tokens by mask diffusion.

The names below load on first use (PEP 562), so that `import twotower` and the command line's
`--help` do not import torch. Importing the model class registers it with transformers'
AutoConfig / AutoModelForCausalLM."""

from __future__ import annotations

import importlib
import sys
import types

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
    "generate_ar": "twotower.generate",
    "generate_mask_diffusion": "twotower.generate",
    "generate_mock_ar": "twotower.generate",
    "generate_verify": "twotower.generate",
    "stream": "twotower.generate",
    "TwoTowerConfig": "twotower.config",
    "TwoTowerForCausalLM": "twotower.model.two_tower",
    "load_model": "twotower.model.loading",
    "load_backbone": "twotower.backbones",
    "encode_prompt": "twotower.text",
    "eos_token_ids": "twotower.text",
    "evaluate": "twotower.eval.commands",
    "benchmark": "twotower.eval.commands",
}


def generate(model, mode: str, input_ids, attention_mask=None, **options):
    """Generate in `mode` ("ar", "mock-ar", "diffusion", "verify"): a GenerationResult
    (twotower.generate.generate)."""
    from twotower.generate import generate as run

    return run(model, mode, input_ids, attention_mask, **options)


class _Package(types.ModuleType):
    """The package module: importing the subpackage `twotower.generate` does not hide the
    function `generate` (as an eager `from twotower.generate import generate` used to ensure)."""

    def __setattr__(self, name, value):
        if name == "generate" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'twotower' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "generate",
    "BenchOptions",
    "EvalOptions",
    "GenerationSettings",
    "LoadOptions",
    "ServeOptions",
    "TwoTowerError",
    "VerifyOptions",
    *_LAZY,
]
