"""twotower: a frozen AR context tower plus a trainable denoiser tower that fills blocks of
tokens by mask diffusion. Importing this package registers the model with transformers'
AutoConfig / AutoModelForCausalLM."""

from transformers import AutoConfig, AutoModelForCausalLM

from twotower.backbones import load_backbone
from twotower.config import GenerationSettings, TwoTowerConfig, TwoTowerError
from twotower.generate import (
    GenerationResult,
    generate,
    generate_ar,
    generate_mask_diffusion,
    generate_mock_ar,
    generate_verify,
    stream,
)
from twotower.model.checkpoint import load_model
from twotower.model.two_tower import TwoTowerForCausalLM
from twotower.text import encode_prompt, eos_token_ids

AutoConfig.register("twotower", TwoTowerConfig, exist_ok=True)
AutoModelForCausalLM.register(TwoTowerConfig, TwoTowerForCausalLM, exist_ok=True)

__version__ = "0.1.0"
__all__ = [
    "GenerationResult",
    "GenerationSettings",
    "TwoTowerConfig",
    "TwoTowerError",
    "TwoTowerForCausalLM",
    "encode_prompt",
    "eos_token_ids",
    "generate",
    "generate_ar",
    "generate_mask_diffusion",
    "generate_mock_ar",
    "generate_verify",
    "load_backbone",
    "load_model",
    "stream",
]
