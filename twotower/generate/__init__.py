"""Generation modes. Each `*_stream` is a generator of StreamEvents returning a
GenerationResult; each `generate_*` runs it to the end."""

from __future__ import annotations

from twotower.config import MODES, TwoTowerError
from twotower.generate.ar import ARDecoder, ar_stream
from twotower.generate.common import GenerationResult, StreamEvent, drain
from twotower.generate.mask_diffusion import DiffusionDecoder, MockARDecoder, diffusion_stream, mock_ar_stream
from twotower.generate.verify import VerifyDecoder, verify_stream

STREAMS = dict(zip(MODES, (ar_stream, mock_ar_stream, diffusion_stream, verify_stream), strict=True))
DECODERS = dict(zip(MODES, (ARDecoder, MockARDecoder, DiffusionDecoder, VerifyDecoder), strict=True))


def generate_ar(model, input_ids, attention_mask=None, **options) -> GenerationResult:
    """Context tower only, one token per pass (the baseline)."""
    return drain(ar_stream(model, input_ids, attention_mask, **options))


def generate_mock_ar(model, input_ids, attention_mask=None, **options) -> GenerationResult:
    """Denoiser as a one-token-per-pass predictor; equals AR with an untrained denoiser."""
    return drain(mock_ar_stream(model, input_ids, attention_mask, **options))


def generate_mask_diffusion(model, input_ids, attention_mask=None, **options) -> GenerationResult:
    """Block mask diffusion with confidence-threshold commits (docs/METHOD.md section 5)."""
    return drain(diffusion_stream(model, input_ids, attention_mask, **options))


def generate_verify(model, input_ids, attention_mask=None, **options) -> GenerationResult:
    """Lossless: denoiser / prompt-lookup drafts checked by the context tower (AR output)."""
    return drain(verify_stream(model, input_ids, attention_mask, **options))


def generate(model, mode: str, input_ids, attention_mask=None, **options) -> GenerationResult:
    return drain(stream(model, mode, input_ids, attention_mask, **options))


def stream(model, mode: str, input_ids, attention_mask=None, **options):
    if mode not in STREAMS:
        raise TwoTowerError(f"mode must be one of {MODES}, got {mode!r}")
    return STREAMS[mode](model, input_ids, attention_mask, **options)


__all__ = [
    "GenerationResult",
    "StreamEvent",
    "MODES",
    "generate",
    "stream",
    "generate_ar",
    "generate_mock_ar",
    "generate_mask_diffusion",
    "generate_verify",
    "ar_stream",
    "mock_ar_stream",
    "diffusion_stream",
    "verify_stream",
]
