"""TwoTowerForCausalLM: a frozen AR context tower and a trainable denoiser tower.

    context tower (frozen backbone)            denoiser tower (copy or LoRA over the same weights)
    reads prompt + committed blocks,           fills a block of S slots by mask diffusion;
    keeps the only cache (K,V per layer;       attention layer i attends to [context K,V of layer i ;
    Mamba-2 conv + SSM state per layer)        own K,V]; Mamba layer i starts from the context's state

Methods are the named steps that the generation modes compose: `context_prefill`,
`context_extend` (one pass per committed block) and `denoise` (one denoiser pass over a
block). Checkpoints hold config.json plus the trained tensors only; the backbone is referenced
and checked by fingerprint.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

from twotower.backbones import backbone_fingerprint, family_of, load_backbone
from twotower.backbones.base import Keep, LayerPass
from twotower.backbones.graphs import COMPILED_DTYPES
from twotower.backbones.llama import max_context
from twotower.config import TwoTowerConfig, TwoTowerError
from twotower.model.adaln import TimeConditioning
from twotower.model.cache import ContextCache, ContextView, TrainingContext
from twotower.model.layout import BlockLayout
from twotower.model.lora import build_adapters
from twotower.model.masks import extend_mask, prefill_mask

WEIGHTS_NAME = "denoiser.safetensors"


class TwoTowerForCausalLM(nn.Module):
    config_class = TwoTowerConfig

    def __init__(self, config: TwoTowerConfig, backbone: nn.Module, tokenizer=None):
        super().__init__()
        config.validate()
        bcfg = backbone.config
        self.family = family = family_of(bcfg.model_type)  # how the backbone's layers run (backbones.base.Family)
        self.layout = BlockLayout(config.layout)
        self.config = config
        self.weights = "dense"  # how the linear weights are stored: config.WEIGHT_FORMATS
        self.merged = False  # a LoRA denoiser's adapters folded into copies of its layers (merge_adapters)
        self.step_layers = None  # the context passes decoding repeats, compiled (compile_steps), else None
        self.context_tower = backbone.eval().requires_grad_(False)
        embed = backbone.get_input_embeddings()
        dtype, device = embed.weight.dtype, embed.weight.device
        self.num_embeddings = embed.num_embeddings
        self.mask_token_id = self._resolve_mask_token(config.mask_token_id, tokenizer)
        config.mask_token_id = self.mask_token_id
        config.backbone_config = bcfg.to_dict()
        if config.backbone_fingerprint is None:
            config.backbone_fingerprint = backbone_fingerprint(backbone)

        # The context layers the denoiser's layers align with: all of them, or K of them (shallow).
        num_layers = len(backbone.model.layers)
        self.aligned = config.resolve_aligned_layers(num_layers)
        config.aligned_layers = self.aligned
        self.shallow = len(self.aligned) < num_layers
        self.denoiser_tower = None  # full depth, full weights: own trainable copy; else None (shares context_tower)
        self.denoiser_layers = None  # shallow, full weights: trainable copies of the aligned layers
        self.lora = None
        if config.denoiser == "full" and self.shallow:
            self.denoiser_layers = nn.ModuleList(copy.deepcopy(backbone.model.layers[a]) for a in self.aligned)
            self.denoiser_layers.requires_grad_(True)
        elif config.denoiser == "full":
            self.denoiser_tower = copy.deepcopy(backbone).requires_grad_(True)
        else:
            layers = [family.projections(backbone.model.layers[a]) for a in self.aligned]
            if config.lora_targets is None:
                config.lora_targets = sorted({name for linears in layers for name in linears})
            self.lora = build_adapters(layers, config.lora_targets, config.lora_rank, config.lora_alpha)
            if not any(len(adapters) for adapters in self.lora):
                raise TwoTowerError(f"lora_targets {config.lora_targets} name no projection of this {bcfg.model_type} backbone")
            self.lora.to(device=device, dtype=dtype)
        # The mask token's embedding: a new learned vector, initialised to the mean embedding.
        self.mask_embedding = nn.Parameter(embed.weight.detach().float().mean(0).to(dtype))
        self.time_conditioning = None
        if config.adaln:
            tc = TimeConditioning(bcfg.hidden_size, len(self.aligned), config.time_embed_dim, family.n_modulation)
            self.time_conditioning = tc.to(device=device, dtype=dtype)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_backbone(cls, backbone: nn.Module, tokenizer=None, backbone_ref: str = "default", **config_kwargs):
        """Wrap a loaded backbone as an untrained two-tower model (identity adaLN, zero LoRA)."""
        return cls(TwoTowerConfig(backbone_ref=str(backbone_ref), **config_kwargs), backbone, tokenizer)

    def _resolve_mask_token(self, mask_token_id: int | None, tokenizer) -> int:
        n = self.num_embeddings
        if mask_token_id is None:
            return n  # a new id, embedded by the denoiser only
        if not 0 <= mask_token_id <= n:
            raise TwoTowerError(f"mask_token_id {mask_token_id} is outside [0, {n}] (the backbone has {n} embeddings)")
        if mask_token_id < n and tokenizer is not None and mask_token_id < len(tokenizer):
            token = tokenizer.convert_ids_to_tokens(mask_token_id)
            raise TwoTowerError(
                f"mask_token_id {mask_token_id} collides with the real token {token!r}; "
                f"leave it unset to add a new id ({n}) or pick an unused id in [{len(tokenizer)}, {n})"
            )
        return mask_token_id

    # ---------------------------------------------------------------- devices
    @property
    def denoiser_weights(self) -> nn.Module:
        """The backbone whose embedding, final norm and LM head the denoiser uses (its own copy
        for a full-depth full denoiser, else the context tower's, or a frozen copy of it on the
        denoiser's device)."""
        return self.denoiser_tower if self.denoiser_tower is not None else self.context_tower

    def denoiser_layer_modules(self) -> list[nn.Module]:
        """The denoiser's layers, in order: its own copies, or the aligned context layers."""
        if self.denoiser_layers is not None:
            return list(self.denoiser_layers)
        return [self.denoiser_weights.model.layers[a] for a in self.aligned]

    @property
    def capture_layer(self) -> int | None:
        """The context layer whose input a shallow denoiser's anchor slot reads (None: full depth)."""
        return self.aligned[0] if self.shallow else None

    @property
    def context_device(self) -> torch.device:
        return self.context_tower.get_input_embeddings().weight.device

    @property
    def denoiser_device(self) -> torch.device:
        return self.mask_embedding.device

    @property
    def max_context(self) -> int:
        return max_context(self.context_tower.config)

    def place_towers_on_devices(self, ctx_device, den_device) -> TwoTowerForCausalLM:
        """Context tower + its head on ctx_device; denoiser + head + time conditioning on den_device.
        A LoRA denoiser on another device gets a frozen copy of the shared weights there."""
        ctx_device, den_device = torch.device(ctx_device), torch.device(den_device)
        self.context_tower.to(ctx_device)
        if self.config.denoiser == "full" and not self.shallow:
            self.denoiser_tower.to(den_device)
        elif ctx_device != den_device:
            self.denoiser_tower = copy.deepcopy(self.context_tower).to(den_device)
        else:
            self.denoiser_tower = None
        for module in (self.lora, self.denoiser_layers, self.time_conditioning):
            if module is not None:
                module.to(den_device)
        with torch.no_grad():
            self.mask_embedding.data = self.mask_embedding.data.to(den_device)
        if self.step_layers is not None:  # the graphs hold the tensors of the old devices
            self.compile_steps()
        return self

    @property
    def exact_rows(self) -> int | None:
        """The most rows (batch x positions) a context pass may hold and still give each row the
        logits of a one-row pass bit for bit: quantised weights serve only so many
        (`quant.QUANTISED_ROWS`), wider passes take the dense ones; None: any."""
        from twotower.quant import QUANTISED_ROWS

        return None if self.weights == "dense" else QUANTISED_ROWS

    def quantize(self, weights: str) -> TwoTowerForCausalLM:
        """Weight-only int8 / int4 linear layers for CPU inference, in place (twotower/quant.py):
        both towers' projections and LM heads; LoRA, adaLN, the embeddings and a shallow
        denoiser's own layers stay as they are (its passes run over a block's rows, where the
        dense matmul is the cheaper, and 4 bits would not hold a merged adapter's small delta).
        "dense" leaves the model unchanged. A quantised model does not train or save."""
        if weights == "dense":
            return self
        from twotower.quant import quantize_backbone

        quantize_backbone(self.context_tower, weights, self.family.fusions)
        if self.denoiser_tower is not None:
            quantize_backbone(self.denoiser_tower, weights, self.family.fusions)
        self.weights, self.step_layers = weights, None  # graphs hold the layers' old tensors
        return self

    def compile_steps(self) -> bool:
        """For generation: run the context passes that decoding repeats (AR steps, verify
        passes, diffusion mode's block reads: at most `compiled_positions` new positions; not
        the prefill) with the work around each layer's attention compiled (`backbones.graphs`:
        one graph per batch size and width, compiled on first use or by `warm_steps`), where
        the family has such graphs. In bf16 a compiled pass gives each position the same logits
        at any width, so verify mode stays AR's output token for token, but not always the
        eager pass's last bits (a near-tie may break otherwise than eagerly); fp32 runs
        eagerly. Returns whether the family has them. Call it after `quantize`, which drops
        them."""
        make = self.family.compiled_layers
        self.step_layers = None if make is None else make()
        dtype = self.context_tower.get_input_embeddings().weight.dtype
        if self.step_layers is not None and dtype not in COMPILED_DTYPES:
            warnings.warn(
                f"twotower: compiled passes run in bf16 / fp16 only; this model is {dtype}, so they stay eager", stacklevel=2
            )
        return self.step_layers is not None

    @property
    def compiled_positions(self) -> int:
        """The widest context pass that runs compiled (`compile_steps`): a block and the token
        before it, the widest pass decoding makes."""
        return self.config.block_size + 1

    @torch.no_grad()
    def warm_steps(self, batch_sizes=(1,), positions: int | None = None) -> None:
        """Compile now, not on first use, the passes of each batch size over 1..positions new
        positions (default: `compiled_positions`): a short prefill and one extension each, of
        different tokens in every row and position. Nothing without `compile_steps`."""
        if self.step_layers is None:
            return
        device, vocab = self.context_device, self.num_embeddings
        for batch in batch_sizes:
            for width in range(1, (positions or self.compiled_positions) + 1):
                ids = (torch.arange(batch * (width + 2), device=device).view(batch, width + 2) * 7919 + 11) % vocab
                cache, _ = self.context_prefill(ids[:, :2], torch.ones_like(ids[:, :2]))
                self.context_extend(cache, ids[:, 2:], exact=batch == 1)

    def _apply(self, fn, *args, **kwargs):
        """`.to()` / `.half()` and the like: compiled passes compile again (their graphs hold the
        layers' old tensors)."""
        compiled = getattr(self, "step_layers", None) is not None
        super()._apply(fn, *args, **kwargs)
        if compiled:
            self.compile_steps()
        return self

    @torch.no_grad()
    def merge_adapters(self) -> TwoTowerForCausalLM:
        """For generation, in place: a shallow LoRA denoiser's adapters folded into dense copies
        of its K aligned layers (W + scale * B A, summed in fp32), so that a denoiser pass runs K
        plain layers instead of K layers plus two small matmuls and two casts per adapted
        projection. The copies cost K layers' weights (4 of 30 for the default model); a
        full-depth LoRA denoiser is left as it is, since its copy would be a second backbone.
        Merge before `quantize`. A merged model neither trains nor saves."""
        if self.lora is None or not self.shallow:
            return self
        if self.weights != "dense":
            raise TwoTowerError("merge the adapters before quantising the model (merge_adapters, then quantize)")
        layers = nn.ModuleList(copy.deepcopy(layer) for layer in self.denoiser_layer_modules())
        for layer, adapters in zip(layers, self.lora, strict=True):
            linears = self.family.projections(layer)
            for name, lora in adapters.items():
                w = linears[name].weight
                w.copy_((w.float() + lora.weight_delta()).to(w.dtype))
        self.denoiser_layers, self.lora, self.merged = layers.requires_grad_(False), None, True
        return self

    # ---------------------------------------------------------------- context tower
    def ar_logits(self, hidden: torch.Tensor, which):
        """The AR model's float next-token logits from the context tower's final hidden states
        (B, T, H), with the LM head only where they are read: None, "last" (B, V), "all" (B, T, V), or a
        (B,) tensor of positions, one per row (B, V)."""
        if which is None:
            return None
        if isinstance(which, torch.Tensor):
            hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), which.to(hidden.device)]
        elif which == "last":
            hidden = hidden[:, -1]
        return self.context_tower.lm_head(hidden).float()

    @torch.no_grad()
    def context_prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits: str | None = "last"):
        """Read a left-padded prompt (B, T). Returns the cache and the AR logits
        ((B, V) for "last", (B, T, V) for "all", None for None)."""
        valid = attention_mask.bool()
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)  # (B, T)
        embeds = self.context_tower.get_input_embeddings()(input_ids)
        # A Mamba state keeps a prompt's last token to go back into: the shifted layout's view.
        p = LayerPass(embeds, positions, prefill_mask(valid), keep=Keep.end(tail=1), valid=valid, capture=self.capture_layer)
        hidden, states, captured = self.family.run_layers(self.context_tower, p)
        cache = ContextCache(states, valid, valid.sum(1))
        cache.read(input_ids[:, -1:], None if captured is None else captured[:, -1:])
        return cache, self.ar_logits(hidden, logits)

    def empty_context(self, batch: int) -> ContextCache:
        """A cache holding no token yet (verify mode on one-token prompts)."""
        device = self.context_device
        return ContextCache(
            self.family.empty_states(self.context_tower, batch),
            torch.zeros(batch, 0, dtype=torch.bool, device=device),
            torch.zeros(batch, dtype=torch.long, device=device),
        )

    @torch.no_grad()
    def context_extend(self, cache: ContextCache, tokens: torch.Tensor, logits=None, exact: bool = False):
        """Read S committed tokens (B, S) in one pass and append their states to the cache (a
        Mamba state keeps the whole pass as its tail: verify may drop any of the pass's drafts).
        logits: None, "last", "all", or (B,) positions (see `ar_logits`); exact: each query
        attended over exactly the keys a one-token pass at its position reads, so that each
        position's logits are a one-token pass's bit for bit (`backbones.base.exact_attention`;
        Llama family, whose other ops are row by row)."""
        new_valid = torch.ones_like(tokens, dtype=torch.bool)
        positions = cache.next_pos[:, None] + torch.arange(tokens.shape[1], device=tokens.device)
        embeds = self.context_tower.get_input_embeddings()(tokens)
        mask = extend_mask(cache.valid, new_valid)
        p = LayerPass(embeds, positions, mask, cache.states, keep=Keep.end(), capture=self.capture_layer, exact=exact)
        compiled = self.step_layers is not None and tokens.shape[1] <= self.compiled_positions
        run_layers = self.step_layers.run_layers if compiled else self.family.run_layers
        hidden, states, captured = run_layers(self.context_tower, p)
        cache.append(states, new_valid)
        cache.read(tokens, captured)
        return self.ar_logits(hidden, logits)

    @torch.no_grad()
    def training_context(self, clean: torch.Tensor, block_size: int) -> TrainingContext:
        """The context tower over unpadded training sequences (B, n*S): what the denoiser reads
        of it (the states of its aligned layers: K,V of every position and, for Mamba layers, the
        state at every block boundary, folded: batch B*n; a shallow denoiser's anchors), and the
        AR model's final hidden states, from which the teacher's next-token logits come."""
        valid = torch.ones_like(clean, dtype=torch.bool)
        positions = torch.arange(clean.shape[1], device=clean.device)[None].expand(clean.shape[0], -1)
        embeds = self.context_tower.get_input_embeddings()(clean)
        p = LayerPass(embeds, positions, prefill_mask(valid), keep=Keep.block_starts(block_size), capture=self.capture_layer)
        hidden, states, captured = self.family.run_layers(self.context_tower, p)
        anchors = None if captured is None else captured[:, ::block_size]  # (B, n, H): the hidden state at x_{bS}
        return TrainingContext(ContextView(states, valid), anchors, hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """AR logits of the context tower over a whole sequence (B, T) -> (B, T, V), for scoring."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.context_prefill(input_ids, attention_mask, logits="all")[1]

    # ---------------------------------------------------------------- denoiser tower
    def embed_block(self, block_ids: torch.Tensor) -> torch.Tensor:
        """Denoiser input embeddings (B, S, H); the mask id maps to the learned mask embedding."""
        embed = self.denoiser_weights.get_input_embeddings()
        emb = embed(block_ids.clamp(max=self.num_embeddings - 1))
        is_mask = (block_ids == self.mask_token_id)[..., None]
        return torch.where(is_mask, self.mask_embedding.to(emb.dtype), emb)

    def denoise(self, *args, **kwargs) -> torch.Tensor:
        """One denoiser pass over a block: float logits (B, S, V), the mask token forbidden.
        Arguments as `denoise_hidden`."""
        return self.denoiser_logits(self.denoise_hidden(*args, **kwargs))

    def denoise_block(self, reads, block: torch.Tensor, t=None, slots: torch.Tensor | None = None) -> torch.Tensor:
        """One denoiser pass over the next block after a cache: reads = `layout.reads(cache,
        denoiser_device)`, block (B, S) the block's committed ids and mask ids (slot j = y_j),
        t (B,) or None, slots as `denoise_hidden`. Returns logits (B, S, V), output j for y_j."""
        inputs = self.layout.inputs(reads.anchor, block)
        return self.denoise(reads.view, inputs, reads.start, t, anchor_hidden=reads.anchor_hidden, slots=slots)

    def denoise_hidden(
        self,
        view: ContextView,
        block_ids: torch.Tensor,
        start_pos: torch.Tensor,
        t=None,
        mask: torch.Tensor | None = None,
        blocks: int = 1,
        anchor_hidden: torch.Tensor | None = None,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The denoiser's layers over a block: its final normed hidden states (B, S, H).

        view: the context states the block starts from, on the denoiser's device (the full
        context view; the denoiser reads the states of its aligned layers);
        block_ids: (B, S), mask id at masked slots; start_pos: (B,) RoPE position of slot 0;
        t: (B,) masking level for adaLN, or None for no time conditioning.
        mask / blocks: the training pass reads n blocks at once (B, n*S) under its own
        block-causal mask, Mamba layers seeded per block (view states of batch B*n).
        anchor_hidden: a shallow denoiser's anchor input, the context tower's hidden state
        entering the first aligned layer at each block's slot 0: (B, H), or (B, n, H) for n blocks.
        slots: None or (B, S) bool, the slots of each row's block (a row whose block is shorter
        than the batch's: its other slots are not attended to, so it sees what it would alone).
        """
        positions = start_pos[:, None] + torch.arange(block_ids.shape[1], device=block_ids.device)
        hidden = self.embed_block(block_ids)
        if self.shallow:
            if anchor_hidden is None:
                raise TwoTowerError("a shallow denoiser needs the context tower's hidden state at the anchor")
            batch, width, size = hidden.shape[0], hidden.shape[2], block_ids.shape[1] // blocks
            hidden = hidden.view(batch, blocks, size, width).clone()
            hidden[:, :, 0] = anchor_hidden.reshape(batch, blocks, width).to(hidden.dtype)
            hidden = hidden.view(batch, blocks * size, width)
        modulation = None
        if t is not None and self.time_conditioning is not None:
            modulation = self.time_conditioning(t.to(hidden.device)).to(hidden.dtype)
        if mask is None:
            mask = self.layout.block_mask(view.valid, block_ids.shape[1], slots)
        past = [view.states[a] for a in self.aligned]
        layers = self.denoiser_layer_modules()
        p = LayerPass(hidden, positions, mask, past, blocks=blocks, modulation=modulation, adapters=self.lora, layers=layers)
        return self.family.run_layers(self.denoiser_weights, p).hidden

    def denoiser_logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """Logits (..., V) from the denoiser's final hidden states, the mask token forbidden: fp32,
        or in the LM head's dtype (float32=False: the training loss reads them in fp32 chunks).
        A quantised head computes them over its dense weights: a denoiser pass has a block's
        rows, over which the int8 kernel costs several times the dense matmul (measured over 8
        rows of the default model: 7.6 ms against 3.2), and drafts need not match AR's logits."""
        head = self.denoiser_weights.lm_head
        logits = head.dense(hidden) if hasattr(head, "dense") else head(hidden)
        logits = logits.float() if float32 else logits
        if self.mask_token_id < logits.shape[-1]:
            logits[..., self.mask_token_id] = float("-inf")
        return logits

    # ---------------------------------------------------------------- checkpoints
    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores: the mask embedding, time conditioning, and either the full
        denoiser copy or the LoRA adapters. Tied tensors are stored once."""
        parts = {"mask_embedding": self.mask_embedding}
        if self.time_conditioning is not None:
            parts.update({f"time_conditioning.{k}": v for k, v in self.time_conditioning.state_dict().items()})
        if self.denoiser_layers is not None:
            parts.update({f"denoiser_layers.{k}": v for k, v in self.denoiser_layers.state_dict().items()})
        elif self.config.denoiser == "full":
            parts.update({f"denoiser_tower.{k}": v for k, v in self.denoiser_tower.state_dict().items()})
        else:
            parts.update({f"lora.{k}": v for k, v in self.lora.state_dict().items()})
        state, seen = {}, set()
        for name, tensor in parts.items():
            if tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            state[name] = tensor.detach().contiguous().cpu()
        return state

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write config.json and denoiser.safetensors (atomically: temp file, then rename)."""
        if self.weights != "dense" or self.merged:
            how = "its LoRA adapters merged" if self.merged else f"its weights quantised to {self.weights}"
            raise TwoTowerError(f"this model is prepared for inference ({how}); save the model as loaded")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(path)
        fd, tmp = tempfile.mkstemp(dir=path, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file(self.trained_state_dict(), tmp, metadata={"format": "pt", "denoiser": self.config.denoiser})
            os.replace(tmp, path / WEIGHTS_NAME)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *args, backbone=None, dtype=None, config=None, **kwargs):
        """Load a checkpoint written by `save_pretrained`.

        backbone: a loaded backbone module, or a reference overriding the one in config.json.
        dtype: torch dtype of the backbone (default bfloat16; `torch_dtype` is accepted too).
        """
        path = Path(path)
        dtype = dtype or kwargs.get("torch_dtype") or torch.bfloat16
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if not (path / "config.json").is_file() or not (path / WEIGHTS_NAME).is_file():
            raise TwoTowerError(f"{path} is not a twotower checkpoint (needs config.json and {WEIGHTS_NAME})")
        if config is None:
            config = TwoTowerConfig.from_pretrained(path)
        if getattr(config, "model_type", None) != "twotower":
            raise TwoTowerError(f"{path}/config.json is not a twotower config")
        tokenizer = None
        if backbone is None or isinstance(backbone, (str, os.PathLike)):
            backbone, tokenizer = load_backbone(backbone if backbone is not None else config.backbone_ref, dtype)
        found = backbone_fingerprint(backbone)
        if config.backbone_fingerprint and found != config.backbone_fingerprint:
            raise TwoTowerError(
                f"checkpoint {path} was trained on backbone {config.backbone_ref!r} (fingerprint "
                f"{config.backbone_fingerprint}), but the backbone given has fingerprint {found}: "
                "load it with the backbone it was trained on"
            )
        model = cls(config, backbone, tokenizer)
        model.tokenizer = tokenizer
        model.load_trained_state(path / WEIGHTS_NAME)
        return model

    def load_trained_state(self, file: Path) -> None:
        try:
            state = load_file(str(file))
        except (SafetensorError, OSError, ValueError) as err:
            raise TwoTowerError(f"{file} is corrupt or not a safetensors file: {err}") from err
        expected = self.trained_state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise TwoTowerError(
                f"{file} does not match this model ({self.config.denoiser} denoiser): "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        for name, tensor in state.items():
            if tensor.shape != expected[name].shape:
                raise TwoTowerError(
                    f"{file}: {name} has shape {tuple(tensor.shape)}, the model expects {tuple(expected[name].shape)}"
                )
        self.load_state_dict(state, strict=False)


SHIPPED = Path(__file__).resolve().parent.parent / "checkpoints" / "smollm2-135m-instruct"


def shipped_denoiser() -> Path | None:
    """The trained denoiser that ships for the default backbone (twotower/checkpoints/), or None."""
    return SHIPPED if (SHIPPED / WEIGHTS_NAME).is_file() else None


def load_model(
    ref: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.bfloat16,
    shipped: bool = True,
    weights: str = "dense",
    merge: bool = False,
    compile_steps: bool = False,
    **config_kwargs,
):
    """Load what a user names: a twotower checkpoint folder; "default", the default backbone with
    the denoiser that ships for it (shipped=False, or any config_kwargs: a new untrained one); or
    a backbone (a folder, a .gguf file) wrapped as an untrained two-tower model with config_kwargs.
    weights: "dense", or "int8" / "int4" weight-only linear layers for CPU inference; merge: fold
    a shallow LoRA denoiser's adapters into copies of its layers, for generation
    (`merge_adapters`); compile_steps: the context passes decoding repeats compiled
    (`TwoTowerForCausalLM.compile_steps`).
    Returns (model, tokenizer)."""
    model, tokenizer = _load(ref, dtype, shipped, **config_kwargs)
    if merge:
        model.merge_adapters()
    model.quantize(weights)
    if compile_steps:
        model.compile_steps()
    return model, tokenizer


def _load(ref, dtype, shipped, **config_kwargs):
    path = Path(ref).expanduser() if ref not in (None, "default") else None
    if path is not None and (path / "config.json").is_file() and (path / WEIGHTS_NAME).is_file():
        model = TwoTowerForCausalLM.from_pretrained(path, dtype=dtype)
        return model, model.tokenizer
    if path is None and shipped and not config_kwargs and shipped_denoiser() is not None:
        model = TwoTowerForCausalLM.from_pretrained(shipped_denoiser(), dtype=dtype, backbone="default")
        return model, model.tokenizer
    backbone, tokenizer = load_backbone(ref, dtype)
    model = TwoTowerForCausalLM.from_backbone(
        backbone, tokenizer, backbone_ref=str(path.resolve()) if path else "default", **config_kwargs
    )
    return model, tokenizer


AutoModelForCausalLM.register(TwoTowerConfig, TwoTowerForCausalLM, exist_ok=True)
