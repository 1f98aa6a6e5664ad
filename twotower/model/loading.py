"""What a user names, loaded: a twotower checkpoint folder; "default", the default backbone with
the denoiser that ships for it; or a backbone (a folder, a .gguf file) wrapped as an untrained
two-tower model. Then, for generation, the inference transforms the caller asks for."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from twotower.backbones import load_backbone, resolve_backbone_path
from twotower.config import TwoTowerError
from twotower.model import inference
from twotower.model.checkpoint import WEIGHTS_NAME, from_pretrained, shipped_denoiser
from twotower.model.two_tower import TwoTowerForCausalLM


def load_model(
    ref: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.bfloat16,
    shipped: bool = True,
    weights: str = "dense",
    merge: bool = False,
    compile_steps: bool = False,
    backbone: str | os.PathLike | None = None,
    **config_kwargs,
):
    """Load what a user names: a twotower checkpoint folder; "default", the default backbone with
    the denoiser that ships for it (shipped=False, or any config_kwargs: a new untrained one); or
    a backbone (a folder, a .gguf file) wrapped as an untrained two-tower model with config_kwargs.
    weights: "dense", or "int8" / "int4" weight-only linear layers for CPU inference; merge: fold
    a shallow LoRA denoiser's adapters into copies of its layers and stack the projections of one
    input, for generation; compile_steps: the context passes decoding repeats compiled
    (`inference`, for all three); backbone: the backbone a checkpoint runs on instead of the one
    its config.json names (fingerprint checked).
    Returns (model, tokenizer)."""
    model, tokenizer = _load(ref, dtype, shipped, backbone, **config_kwargs)
    if merge:
        inference.merge_adapters(model)
        inference.fuse(model)
    inference.quantize(model, weights)
    if compile_steps:
        inference.compile_steps(model)
    return model, tokenizer


def _load(ref, dtype, shipped, backbone, **config_kwargs):
    path = Path(ref).expanduser() if ref not in (None, "default") else None
    if path is not None and (path / "config.json").is_file() and (path / WEIGHTS_NAME).is_file():
        model = from_pretrained(TwoTowerForCausalLM, path, dtype=dtype, backbone=backbone)
        return model, model.tokenizer
    if backbone is not None:
        if path is not None:
            resolve_backbone_path(path)  # a --model that is not there: say that first
        raise TwoTowerError(
            f"--backbone overrides the backbone of a twotower checkpoint, and {ref or 'default'!r} is not one (a "
            f"checkpoint folder holds config.json and {WEIGHTS_NAME}): to use a backbone, pass it as --model alone"
        )
    if path is None and shipped and not config_kwargs and shipped_denoiser() is not None:
        model = from_pretrained(TwoTowerForCausalLM, shipped_denoiser(), dtype=dtype, backbone="default")
        return model, model.tokenizer
    backbone, tokenizer = load_backbone(ref, dtype)
    model = TwoTowerForCausalLM.from_backbone(
        backbone, tokenizer, backbone_ref=str(path.resolve()) if path else "default", **config_kwargs
    )
    return model, tokenizer
