"""The denoiser tower, one class per kind: which layers it runs, which backbone's embedding,
final norm and LM head it reads, what it trains (what a checkpoint stores) and how it moves
between devices.

  FullDenoiser     full depth, full weights: a trainable copy of the backbone  "denoiser_tower.*"
  ShallowDenoiser  K aligned layers, full weights: trainable copies of those   "denoiser_layers.*"
  LoRADenoiser     full depth or K aligned layers: low-rank adapters over the  "lora.*"
                   context tower's frozen layers
  MergedDenoiser   a shallow LoRA denoiser's adapters folded into copies of its layers (for
                   generation only: `inference.merge_adapters`)

Every kind also trains the mask token's embedding ("mask_embedding"), with adaLN the time
conditioning ("time_conditioning.*"), and with `fuse_layers` (shallow kinds) the fusion of the
anchor's features from several depths ("fusion.*", `twotower.model.fusion`). The names in
quotes are the checkpoint's tensor names and the modules' own, so a kind's `trained_state_dict`
loads back with `load_state_dict`. The kinds without a backbone copy read the context tower's
weights in place, or a frozen copy of them when the denoiser sits on another device (`place`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from twotower.backbones.base import LayerPass
from twotower.config import TwoTowerConfig, TwoTowerError
from twotower.model.adaln import TimeConditioning
from twotower.model.cache import ContextView
from twotower.model.fusion import FeatureFusion
from twotower.model.lora import build_adapters


def resolve_mask_token(mask_token_id: int | None, num_embeddings: int, tokenizer) -> int:
    """The mask token's id: a new one (`num_embeddings`, embedded by the denoiser only) unless the
    config names one, which must not be a real token of the tokenizer."""
    n = num_embeddings
    if mask_token_id is None:
        return n
    if not 0 <= mask_token_id <= n:
        raise TwoTowerError(f"mask_token_id {mask_token_id} is outside [0, {n}] (the backbone has {n} embeddings)")
    if mask_token_id < n and tokenizer is not None and mask_token_id < len(tokenizer):
        token = tokenizer.convert_ids_to_tokens(mask_token_id)
        raise TwoTowerError(
            f"mask_token_id {mask_token_id} collides with the real token {token!r}; "
            f"leave it unset to add a new id ({n}) or pick an unused id in [{len(tokenizer)}, {n})"
        )
    return mask_token_id


def build_denoiser(config: TwoTowerConfig, backbone: nn.Module, family, mask_token_id: int) -> Denoiser:
    """The kind of denoiser the config names, over `backbone` (the frozen context tower), aligned
    with the context layers `config.aligned_layers`."""
    if config.denoiser != "full":
        return LoRADenoiser(config, backbone, family, mask_token_id)
    if len(config.aligned_layers) < len(backbone.model.layers):
        return ShallowDenoiser(config, backbone, family, mask_token_id)
    return FullDenoiser(config, backbone, family, mask_token_id)


class Denoiser(nn.Module):
    """What every kind shares: the aligned layers, the mask embedding, the time conditioning,
    the denoiser pass and its logits. A kind says which layers it runs (`layers`), its adapters
    (`adapters`), which backbone it reads (`backbone`) and what it trains (`trained_modules`)."""

    merged = False  # prepared for generation (MergedDenoiser): neither trains nor saves
    adapters = None  # the LoRA adapters of each layer (LoRADenoiser), else None

    def __init__(self, backbone: nn.Module, family, aligned: list[int], mask_token_id: int):
        super().__init__()
        self.family = family  # how the backbone's layers run (backbones.base.Family)
        self.aligned = aligned  # the context layers the denoiser's layers align with (ascending)
        self.shallow = len(aligned) < len(backbone.model.layers)
        self.mask_token_id = mask_token_id
        self.num_embeddings = backbone.get_input_embeddings().num_embeddings
        object.__setattr__(self, "shared", backbone)  # the context tower: read, not owned (no submodule)
        self.device_copy = None  # a frozen copy of the shared weights on the denoiser's device, else None
        self.fuse: list[int] = []  # context layers whose input at the anchor the fusion also reads
        self.fusion = None  # FeatureFusion, or None

    def add_conditioning(self, backbone: nn.Module, config: TwoTowerConfig) -> None:
        """The mask embedding (a new vector, initialised to the mean embedding) and, with adaLN,
        the time conditioning (identity at first), in the backbone's dtype and device."""
        embed = backbone.get_input_embeddings()
        dtype, device = embed.weight.dtype, embed.weight.device
        self.mask_embedding = nn.Parameter(embed.weight.detach().float().mean(0).to(dtype))
        self.time_conditioning = None
        width = backbone.config.hidden_size
        if config.adaln:
            tc = TimeConditioning(width, len(self.aligned), config.time_embed_dim, self.family.n_modulation)
            self.time_conditioning = tc.to(device=device, dtype=dtype)
        if config.fuse_layers:
            self.add_fusion(config.fuse_layers)

    def add_fusion(self, layers: list[int]) -> None:
        """A fusion of the anchor's features entering `layers` too (zero at first: the denoiser's
        output is unchanged), in the mask embedding's dtype and device."""
        width, weight = self.mask_embedding.shape[-1], self.mask_embedding
        self.fuse = list(layers)
        self.fusion = FeatureFusion(width, 1 + len(self.fuse)).to(device=weight.device, dtype=weight.dtype)

    # ---------------------------------------------------------------- what the kind holds
    @property
    def backbone(self) -> nn.Module:
        """The backbone whose embedding, final norm and LM head the denoiser reads: the context
        tower's, or its frozen copy on the denoiser's device (FullDenoiser: its own copy)."""
        return self.device_copy if self.device_copy is not None else self.shared

    @property
    def capture_layer(self) -> int | tuple[int, ...] | None:
        """The context layer whose input a shallow denoiser's anchor slot reads, and after it the
        layers whose input the fusion reads (`LayerPass.capture`); None: full depth."""
        if not self.shallow:
            return None
        return (self.aligned[0], *self.fuse) if self.fuse else self.aligned[0]

    def layers(self) -> list[nn.Module]:
        """The denoiser's layers, in order: the aligned layers of `backbone`, or its own copies."""
        return [self.backbone.model.layers[a] for a in self.aligned]

    def trained_modules(self) -> dict[str, nn.Module]:
        """The kind's own trained modules by checkpoint prefix."""
        raise NotImplementedError

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores: the mask embedding, time conditioning, and the kind's own
        modules (the backbone copy, the layer copies, or the LoRA adapters). Tied tensors are
        stored once."""
        parts = {"mask_embedding": self.mask_embedding}
        for prefix in ("time_conditioning", "fusion"):
            module = getattr(self, prefix)
            if module is not None:
                parts.update({f"{prefix}.{k}": v for k, v in module.state_dict().items()})
        for prefix, module in self.trained_modules().items():
            parts.update({f"{prefix}.{k}": v for k, v in module.state_dict().items()})
        state, seen = {}, set()
        for name, tensor in parts.items():
            if tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            state[name] = tensor.detach().contiguous().cpu()
        return state

    # ---------------------------------------------------------------- devices
    @property
    def device(self) -> torch.device:
        return self.mask_embedding.device

    def place(self, device: torch.device, context_device: torch.device) -> None:
        """Everything the denoiser owns onto `device`; a kind that reads the context tower's
        weights gets a frozen copy of them there when the context tower is elsewhere."""
        self.device_copy = copy.deepcopy(self.shared).to(device) if device != context_device else None
        for module in (*self.trained_modules().values(), self.time_conditioning, self.fusion):
            if module is not None:
                module.to(device)
        with torch.no_grad():
            self.mask_embedding.data = self.mask_embedding.data.to(device)

    # ---------------------------------------------------------------- the pass
    def modulation(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """adaLN's modulation (B, L, per_layer, H) for masking levels t (B,)."""
        return self.time_conditioning(t).to(dtype)

    def embed(self, block_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings (B, S, H); the mask id maps to the learned mask embedding."""
        embed = self.backbone.get_input_embeddings()
        emb = embed(block_ids.clamp(max=self.num_embeddings - 1))
        is_mask = (block_ids == self.mask_token_id)[..., None]
        return torch.where(is_mask, self.mask_embedding.to(emb.dtype), emb)

    def hidden(
        self,
        view: ContextView,
        block_ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        t: torch.Tensor | None = None,
        blocks: int = 1,
        anchor_hidden: torch.Tensor | None = None,
        run_layers=None,
    ) -> torch.Tensor:
        """The denoiser's layers over n blocks (B, n*S) at positions (B, n*S) under `mask`: its
        final normed hidden states (B, n*S, H). Arguments as `TwoTowerForCausalLM.denoise_hidden`;
        run_layers: the family's `run_layers` (default) or compiled ones (`compile_steps`)."""
        hidden = self.embed(block_ids)
        if self.shallow:
            if anchor_hidden is None:
                raise TwoTowerError("a shallow denoiser needs the context tower's hidden state at the anchor")
            batch, width, size = hidden.shape[0], hidden.shape[2], block_ids.shape[1] // blocks
            hidden = hidden.view(batch, blocks, size, width).clone()
            anchor = anchor_hidden.reshape(batch, blocks, -1)  # (B, n, H), or (B, n, k*H) with the fused depths
            hidden[:, :, 0] = anchor[..., :width].to(hidden.dtype)
            if self.fusion is not None:  # every slot after the anchor gets the anchor's fused features
                hidden[:, :, 1:] += self.fusion(anchor).to(hidden.dtype)[:, :, None]
            hidden = hidden.view(batch, blocks * size, width)
        modulation = None
        if t is not None and self.time_conditioning is not None:
            modulation = self.modulation(t.to(hidden.device), hidden.dtype)
        past = [view.states[a] for a in self.aligned]
        p = LayerPass(
            hidden, positions, mask, past, blocks=blocks, modulation=modulation, adapters=self.adapters, layers=self.layers()
        )
        return (run_layers or self.family.run_layers)(self.backbone, p).hidden

    def logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """Logits (..., V) from the final hidden states, the mask token forbidden: fp32, or in the
        LM head's dtype (float32=False: the training loss reads them in fp32 chunks). A quantised
        head computes them over its dense weights: a denoiser pass has a block's rows, over which
        the quantised kernel costs more than the dense matmul, and drafts need not match AR's
        logits."""
        head = self.backbone.lm_head
        rows = hidden.reshape(-1, hidden.shape[-1])  # flat rows: strided ones would copy the head's weights
        logits = head.dense(rows) if hasattr(head, "dense") else head(rows)
        logits = logits.view(*hidden.shape[:-1], logits.shape[-1])
        logits = logits.float() if float32 else logits
        if self.mask_token_id < logits.shape[-1]:
            logits[..., self.mask_token_id] = float("-inf")
        return logits

    def vocab_logits(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Logits (..., N) over the tokens `ids` (N,) only, in the head's dtype, for training over
        a draft vocabulary: the head's rows are gathered in the pass, so a head that trains (a
        full denoiser's) gets their gradients."""
        head = self.backbone.lm_head
        rows = hidden.reshape(-1, hidden.shape[-1])
        bias = None if getattr(head, "bias", None) is None else head.bias[ids]
        logits = torch.nn.functional.linear(rows, head.weight[ids], bias)
        return logits.view(*hidden.shape[:-1], len(ids))

    def draft_head(self, ids: torch.Tensor) -> DraftHead:
        """The LM head restricted to the tokens `ids` (a draft vocabulary's N most frequent),
        gathered once per set of ids and kept while the head's weights stay where they are."""
        head = self.backbone.lm_head
        weight = head.dense_weight if hasattr(head, "dense_weight") else head.weight
        cached = getattr(self, "_draft_head", None)
        if cached is None or cached.source != DraftHead.key(weight) or not torch.equal(cached.given, ids):
            cached = DraftHead(weight, getattr(head, "bias", None), ids, self.mask_token_id)
            object.__setattr__(self, "_draft_head", cached)  # derived weights: no submodule, not saved
        return cached


class DraftHead:
    """The LM head's rows of N tokens: logits (..., N) over them only, fp32, for drafts that
    pick among a draft vocabulary (`twotower.model.draft_vocab`); `ids` maps a pick back to its
    token id. The mask token is never among them."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor, mask_token_id: int):
        self.source, self.given = self.key(weight), ids
        self.width = weight.shape[0]  # V: the whole head's
        self.ids = ids[ids != mask_token_id].to(weight.device)  # (N,)
        self.weight = weight.detach()[self.ids].contiguous()  # (N, H)
        self.bias = None if bias is None else bias.detach()[self.ids]

    @staticmethod
    def key(weight: torch.Tensor) -> tuple:
        """What says the head's weights moved, were cast or replaced (the rows must be gathered again)."""
        return weight.data_ptr(), weight.dtype, weight.device

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., N) fp32 logits. The rows flattened first: a batched matmul over
        strided rows (a block's drafted slots) would copy the (N, H) weights on every call."""
        rows = hidden.reshape(-1, hidden.shape[-1]).to(self.weight.dtype)
        return torch.nn.functional.linear(rows, self.weight, self.bias).float().view(*hidden.shape[:-1], len(self.ids))

    def spread(self, values: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Values over the N tokens (..., N) as values over the whole vocabulary (..., V), `fill`
        outside them (0 for a distribution, -inf for logits)."""
        full = values.new_full((*values.shape[:-1], self.width), fill)
        return full.scatter_(-1, self.ids.to(values.device).expand(values.shape), values)


class FullDenoiser(Denoiser):
    """Full depth, full weights: its own trainable copy of the whole backbone, whose embedding,
    layers, final norm and LM head it runs."""

    def __init__(self, config: TwoTowerConfig, backbone: nn.Module, family, mask_token_id: int):
        super().__init__(backbone, family, config.aligned_layers, mask_token_id)
        self.denoiser_tower = copy.deepcopy(backbone).requires_grad_(True)
        self.add_conditioning(backbone, config)

    @property
    def backbone(self) -> nn.Module:
        return self.denoiser_tower

    def trained_modules(self) -> dict[str, nn.Module]:
        return {"denoiser_tower": self.denoiser_tower}

    def place(self, device: torch.device, context_device: torch.device) -> None:
        super().place(device, device)  # its own copy moves; nothing to copy


class ShallowDenoiser(Denoiser):
    """K aligned layers, full weights: trainable copies of the aligned context layers, over the
    context tower's embedding, final norm and LM head."""

    def __init__(self, config: TwoTowerConfig, backbone: nn.Module, family, mask_token_id: int):
        super().__init__(backbone, family, config.aligned_layers, mask_token_id)
        self.denoiser_layers = nn.ModuleList(copy.deepcopy(backbone.model.layers[a]) for a in self.aligned)
        self.denoiser_layers.requires_grad_(True)
        self.add_conditioning(backbone, config)

    def layers(self) -> list[nn.Module]:
        return list(self.denoiser_layers)

    def trained_modules(self) -> dict[str, nn.Module]:
        return {"denoiser_layers": self.denoiser_layers}


class LoRADenoiser(Denoiser):
    """Low-rank adapters on the projections of the aligned context layers (all of them, or K),
    over the context tower's frozen weights. The adapters start at zero: an untrained LoRA
    denoiser runs the backbone's own layers."""

    def __init__(self, config: TwoTowerConfig, backbone: nn.Module, family, mask_token_id: int):
        super().__init__(backbone, family, config.aligned_layers, mask_token_id)
        layers = [family.projections(backbone.model.layers[a]) for a in self.aligned]
        if config.lora_targets is None:
            config.lora_targets = sorted({name for linears in layers for name in linears})
        self.lora = build_adapters(layers, config.lora_targets, config.lora_rank, config.lora_alpha)
        if not any(len(adapters) for adapters in self.lora):
            model_type = backbone.config.model_type
            raise TwoTowerError(f"lora_targets {config.lora_targets} name no projection of this {model_type} backbone")
        embed = backbone.get_input_embeddings().weight
        self.lora.to(device=embed.device, dtype=embed.dtype)
        self.add_conditioning(backbone, config)

    @property
    def adapters(self) -> nn.ModuleList:
        return self.lora

    def trained_modules(self) -> dict[str, nn.Module]:
        return {"lora": self.lora}


class MergedDenoiser(Denoiser):
    """A shallow LoRA denoiser's adapters folded into frozen dense copies of its K layers
    (W + scale * B A, summed in fp32), so that a pass runs K plain layers instead of K layers
    plus two small matmuls and two casts per adapted projection. For generation only."""

    merged = True

    @torch.no_grad()
    def __init__(self, lora: LoRADenoiser):
        super().__init__(lora.shared, lora.family, lora.aligned, lora.mask_token_id)
        self.device_copy = lora.device_copy
        layers = nn.ModuleList(copy.deepcopy(layer) for layer in lora.layers())
        for layer, adapters in zip(layers, lora.lora, strict=True):
            linears = self.family.projections(layer)
            for name, adapter in adapters.items():
                w = linears[name].weight
                w.copy_((w.float() + adapter.weight_delta()).to(w.dtype))
        self.denoiser_layers = layers.requires_grad_(False)
        self.mask_embedding, self.time_conditioning = lora.mask_embedding, lora.time_conditioning
        self.fuse, self.fusion = lora.fuse, lora.fusion

    def layers(self) -> list[nn.Module]:
        return list(self.denoiser_layers)

    def trained_modules(self) -> dict[str, nn.Module]:
        return {"denoiser_layers": self.denoiser_layers}

    def modulation(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """adaLN's modulation, kept per masking level: the weights are frozen, and every draft
        of verify mode reads the one of a wholly masked block (t = 1), so a pass does not pay
        for three small matmuls of the same input again. Levels that differ across the batch
        are computed."""
        if t.numel() == 0 or not bool((t == t[0]).all()):
            return super().modulation(t, dtype)
        key = (float(t[0]), t.device, dtype)
        kept = self.__dict__.setdefault("_modulations", {})  # derived tensors: no submodule, not saved
        if key not in kept:
            kept[key] = super().modulation(t[:1], dtype)
        return kept[key].expand(t.shape[0], *kept[key].shape[1:])
