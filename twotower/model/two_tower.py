"""TwoTowerForCausalLM: a frozen AR context tower and a trainable denoiser tower.

    context tower (frozen backbone)            denoiser tower (copy or LoRA over the same weights)
    reads prompt + committed blocks,           fills a block of S slots by mask diffusion;
    keeps the only cache (K,V per layer;       attention layer i attends to [context K,V of layer i ;
    Mamba-2 conv + SSM state per layer)        own K,V]; Mamba layer i starts from the context's state

Methods are the named steps that the generation modes compose: `context_prefill`,
`context_extend` (one pass per committed block) and `denoise` (one denoiser pass over a
block); `protocol.DecodingModel` lists what the decoders use. The pieces around the towers sit
in their own modules: the kinds of denoiser (`denoiser`), the inference transforms
(`inference`: merge, quantise, compile) and checkpoint save / load (`checkpoint`), to which the
methods of the same names delegate.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from twotower.backbones import backbone_fingerprint, family_of
from twotower.backbones.base import Keep, LayerPass
from twotower.backbones.llama import max_context
from twotower.config import TwoTowerConfig, TwoTowerError
from twotower.model import inference
from twotower.model.cache import ContextCache, ContextView, TrainingContext
from twotower.model.denoiser import build_denoiser, resolve_mask_token
from twotower.model.layout import BlockLayout
from twotower.model.masks import extend_mask, prefill_mask, tree_mask


@dataclass
class Rider:
    """Prompt tokens (1, C) to read after one row's cache in the next context pass
    (`TwoTowerForCausalLM.carrying`); `logits` (1, V) after its last token once read."""

    cache: ContextCache
    tokens: torch.Tensor
    logits: torch.Tensor | None = None


class TwoTowerForCausalLM(nn.Module):
    config_class = TwoTowerConfig

    def __init__(self, config: TwoTowerConfig, backbone: nn.Module, tokenizer=None):
        super().__init__()
        config.validate()
        self.family = family_of(backbone.config.model_type)  # how the backbone's layers run (backbones.base.Family)
        self.layout = BlockLayout(config.layout)
        self.config = config
        self.weights = "dense"  # how the linear weights are stored: config.WEIGHT_FORMATS
        self.fused = False  # whether projections of one input are stacked into one matmul (inference.fuse)
        self.step_layers = None  # the context passes decoding repeats, compiled (compile_steps), else None
        self.context_tower = backbone.eval().requires_grad_(False)
        self.num_embeddings = backbone.get_input_embeddings().num_embeddings
        self.mask_token_id = resolve_mask_token(config.mask_token_id, self.num_embeddings, tokenizer)
        config.mask_token_id = self.mask_token_id
        config.backbone_config = backbone.config.to_dict()
        if config.backbone_fingerprint is None:
            config.backbone_fingerprint = backbone_fingerprint(backbone)
        # The context layers the denoiser's layers align with: all of them, or K of them (shallow).
        config.aligned_layers = config.resolve_aligned_layers(len(backbone.model.layers))
        self.denoiser = build_denoiser(config, backbone, self.family, self.mask_token_id)
        self.draft_vocab = None  # the training data's tokens by frequency (`model.draft_vocab`), from a checkpoint
        self.rider: Rider | None = None  # prompt tokens the next context pass reads beside its own (`carrying`)

    @classmethod
    def from_backbone(cls, backbone: nn.Module, tokenizer=None, backbone_ref: str = "default", **config_kwargs):
        """Wrap a loaded backbone as an untrained two-tower model (identity adaLN, zero LoRA)."""
        return cls(TwoTowerConfig(backbone_ref=str(backbone_ref), **config_kwargs), backbone, tokenizer)

    # ---------------------------------------------------------------- devices
    @property
    def context_device(self) -> torch.device:
        return self.context_tower.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the backbone's weights (its embedding's)."""
        return self.context_tower.get_input_embeddings().weight.dtype

    @property
    def denoiser_device(self) -> torch.device:
        return self.denoiser.device

    @property
    def max_context(self) -> int:
        return max_context(self.context_tower.config)

    def place_towers_on_devices(self, ctx_device, den_device) -> TwoTowerForCausalLM:
        """Context tower + its head on ctx_device; denoiser + head + time conditioning on den_device.
        A denoiser that shares the context tower's weights gets a frozen copy of them there."""
        ctx_device, den_device = torch.device(ctx_device), torch.device(den_device)
        self.context_tower.to(ctx_device)
        self.denoiser.place(den_device, ctx_device)
        inference.view_stacks(self)
        if self.step_layers is not None:  # the graphs hold the tensors of the old devices
            self.compile_steps()
        return self

    def _apply(self, fn, *args, **kwargs):
        """`.to()` / `.half()` and the like: stacked projections are views of their stacks again
        (`inference.view_stacks`: the move copied them apart), and compiled passes compile again
        (their graphs hold the layers' old tensors)."""
        compiled = getattr(self, "step_layers", None) is not None
        super()._apply(fn, *args, **kwargs)
        if getattr(self, "fused", False) or getattr(self, "weights", "dense") != "dense":
            inference.view_stacks(self)
        if compiled:
            self.compile_steps()
        return self

    # ---------------------------------------------------------------- inference transforms (inference.py)
    def merge_adapters(self) -> TwoTowerForCausalLM:
        """`inference.merge_adapters`: for generation, before `quantize`."""
        return inference.merge_adapters(self)

    def fuse(self) -> TwoTowerForCausalLM:
        """`inference.fuse`: for generation, after `merge_adapters`."""
        return inference.fuse(self)

    def quantize(self, weights: str) -> TwoTowerForCausalLM:
        """`inference.quantize`: weight-only "int8" / "int4" linear layers ("dense": unchanged)."""
        return inference.quantize(self, weights)

    def compile_steps(self) -> bool:
        """`inference.compile_steps`: the context passes decoding repeats compiled; after `quantize`."""
        return inference.compile_steps(self)

    def warm_steps(self, batch_sizes=(1,), positions: int | None = None) -> None:
        """`inference.warm_steps`: compile those passes now rather than on first use."""
        inference.warm_steps(self, batch_sizes, positions)

    @property
    def compiled_positions(self) -> int:
        """The widest context pass that runs compiled (`inference.compiled_positions`)."""
        return inference.compiled_positions(self)

    @property
    def exact_rows(self) -> int | None:
        """The most rows a context pass gives each row a one-row pass's logits (`inference.exact_rows`)."""
        return inference.exact_rows(self)

    @property
    def can_carry(self) -> bool:
        """Whether a context pass carries a rider (`carrying`): a family whose layers work row by
        row (`Family.run_two`), passes run eagerly (not `compile_steps`)."""
        return self.family.run_two is not None and self.step_layers is None

    @property
    def verifies_trees(self) -> bool:
        """Whether `context_extend` reads token trees: attention backbones (the cache keeps one
        path's K,V), not recurrent Mamba states (`Family.stateful`)."""
        return not self.family.stateful

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
        capture = self.denoiser.capture_layer
        p = LayerPass(embeds, positions, prefill_mask(valid), keep=Keep.end(tail=1), valid=valid, capture=capture)
        hidden, states, captured = self.family.run_layers(self.context_tower, p)
        cache = ContextCache(states, valid, valid.sum(1))
        cache.read(input_ids[:, -1:], None if captured is None else captured[:, -1:])
        return cache, self.ar_logits(hidden, logits)

    def empty_context(self, batch: int) -> ContextCache:
        """A cache holding no token yet."""
        device = self.context_device
        return ContextCache(
            self.family.empty_states(self.context_tower, batch),
            torch.zeros(batch, 0, dtype=torch.bool, device=device),
            torch.zeros(batch, dtype=torch.long, device=device),
        )

    @torch.no_grad()
    def context_extend(self, cache: ContextCache, tokens: torch.Tensor, logits=None, exact: bool = False, parents=None):
        """Read S committed tokens (B, S) in one pass and append their states to the cache (a
        Mamba state keeps the whole pass as its tail: verify may drop any of the pass's drafts).
        logits: None, "last", "all", or (B,) positions (see `ar_logits`); exact: each query
        attended over exactly the keys a one-token pass at its position reads, so that each
        position's logits are a one-token pass's bit for bit (`backbones.base.exact_attention`;
        Llama family, whose other ops are row by row). parents: None, or (B, S) a token tree
        (`masks.tree_mask`; attention backbones): each token sees the cache and its ancestors, at
        the position after its parent's; the cache then holds every node until the caller keeps
        one path (`ContextCache.reorder_new`, then `keep_new`)."""
        p = self._extend_pass(cache, tokens, parents, exact)
        compiled = self.step_layers is not None and tokens.shape[1] <= self.compiled_positions
        rider = self.rider if self.can_carry else None
        if rider is None:
            run_layers = self.step_layers.run_layers if compiled else self.family.run_layers
            out = run_layers(self.context_tower, p)
        else:
            self.rider = None  # one pass carries it
            out, carried = self.family.run_two(self.context_tower, p, self._extend_pass(rider.cache, rider.tokens))
            self._appended(rider.cache, rider.tokens, carried)
            rider.logits = self.ar_logits(carried.hidden, "last")
        self._appended(cache, tokens, out)
        return self.ar_logits(out.hidden, logits)

    def _extend_pass(self, cache: ContextCache, tokens: torch.Tensor, parents=None, exact: bool = False) -> LayerPass:
        """The context tower's pass over tokens (B, S) after the cache (`context_extend`)."""
        if parents is None:
            positions = cache.next_pos[:, None] + torch.arange(tokens.shape[1], device=tokens.device)
            mask = extend_mask(cache.valid, torch.ones_like(tokens, dtype=torch.bool))
        else:
            mask = tree_mask(cache.valid, parents)
            positions = cache.next_pos[:, None] + mask[:, 0, :, cache.length :].sum(-1) - 1  # depth: ancestors and itself
        embeds = self.context_tower.get_input_embeddings()(tokens)
        return LayerPass(embeds, positions, mask, cache.states, keep=Keep.end(), capture=self.denoiser.capture_layer, exact=exact)

    @staticmethod
    def _appended(cache: ContextCache, tokens: torch.Tensor, out) -> None:
        cache.append(out.states, torch.ones_like(tokens, dtype=torch.bool))
        cache.read(tokens, out.captured)

    @contextmanager
    def carrying(self, rider: Rider | None):
        """While inside, the next context pass (`context_extend`) also reads the rider's tokens
        into the rider's cache, in the same calls wherever the calls work row by row
        (`Family.run_two`), so the rider pays for its tokens but not for a pass of its own: the
        serving engine reads a long prompt's chunk so while rows decode. A compiled pass, or a
        family without `run_two`, leaves it unread (`Rider.logits` stays None)."""
        self.rider = rider
        try:
            yield rider
        finally:
            self.rider = None

    @torch.no_grad()
    def training_context(self, clean: torch.Tensor, block_size: int) -> TrainingContext:
        """The context tower over unpadded training sequences (B, n*S): what the denoiser reads
        of it (the states of its aligned layers: K,V of every position and, for Mamba layers, the
        state at every block boundary, folded: batch B*n; a shallow denoiser's anchors), and the
        AR model's final hidden states, from which the teacher's next-token logits come."""
        valid = torch.ones_like(clean, dtype=torch.bool)
        positions = torch.arange(clean.shape[1], device=clean.device)[None].expand(clean.shape[0], -1)
        embeds = self.context_tower.get_input_embeddings()(clean)
        keep, capture = Keep.block_starts(block_size), self.denoiser.capture_layer
        p = LayerPass(embeds, positions, prefill_mask(valid), keep=keep, capture=capture)
        hidden, states, captured = self.family.run_layers(self.context_tower, p)
        anchors = None if captured is None else captured[:, ::block_size]  # (B, n, H or k*H): the hidden states at x_{bS}
        return TrainingContext(ContextView(states, valid), anchors, hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """AR logits of the context tower over a whole sequence (B, T) -> (B, T, V), for scoring."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.context_prefill(input_ids, attention_mask, logits="all")[1]

    # ---------------------------------------------------------------- denoiser tower (denoiser.py)
    def denoise(self, *args, head=None, first: int = 0, **kwargs) -> torch.Tensor:
        """One denoiser pass over a block: float logits (B, S - first, V), the mask token
        forbidden, from slot `first` on; head: a `DraftHead`, logits (B, S - first, N) over its
        tokens only. Other arguments as `denoise_hidden`."""
        hidden = self.denoise_hidden(*args, **kwargs)[:, first:]
        return self.denoiser_logits(hidden) if head is None else head(hidden)

    def denoise_block(
        self, reads, block: torch.Tensor, t=None, slots=None, causal: bool = False, head=None, first: int = 0
    ) -> torch.Tensor:
        """One denoiser pass over the next block after a cache: reads = `layout.reads(cache,
        denoiser_device)`, block (B, S) the block's committed ids and mask ids (slot j = y_j),
        t (B,) or None, slots as `denoise_hidden`; causal: each slot attends to the slots before
        it only (mock-AR); head: a `DraftHead` (logits over its tokens only), else the full head;
        first: the first slot whose logits are wanted. Returns logits (B, S - first, V or N),
        output j for y_{first + j}."""
        inputs = self.layout.inputs(reads.anchor, block)
        mask = extend_mask(reads.view.valid, torch.ones_like(block, dtype=torch.bool)) if causal else None
        return self.denoise(
            reads.view, inputs, reads.start, t, mask=mask, anchor_hidden=reads.anchor_hidden, slots=slots, head=head, first=first
        )

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
        if mask is None:
            mask = self.layout.block_mask(view.valid, block_ids.shape[1], slots)
        compiled = self.step_layers is not None and blocks == 1 and block_ids.shape[1] <= self.compiled_positions
        run_layers = self.step_layers.run_layers if compiled and not torch.is_grad_enabled() else None
        return self.denoiser.hidden(view, block_ids, positions, mask, t, blocks, anchor_hidden, run_layers)

    def add_fusion(self, layers: list[int]) -> None:
        """Give a shallow denoiser without one a fusion of the anchor's features from `layers`
        (`config.fuse_layers`), zero at first, so that its output is unchanged: a trained
        checkpoint goes on training with it."""
        if self.denoiser.fusion is not None or self.denoiser.merged:
            raise TwoTowerError("this denoiser has a fusion already, or is prepared for generation")
        self.config.fuse_layers = list(layers)
        try:
            self.config.resolve_aligned_layers(len(self.context_tower.model.layers))
        except TwoTowerError:
            self.config.fuse_layers = None
            raise
        self.denoiser.add_fusion(layers)

    def draft_head(self, size: int):
        """The denoiser's LM head over the `size` most frequent tokens of the draft vocabulary
        (`Denoiser.draft_head`), or None: size 0, or no draft vocabulary. A head trained over N
        tokens only (`config.head_vocab`) gives at most those N (size 0: those N)."""
        trained = self.config.head_vocab if self.draft_vocab is not None else 0
        size = min(size or trained, trained or size)
        if not size or self.draft_vocab is None:
            return None
        return self.denoiser.draft_head(self.draft_vocab.top(size))

    def denoiser_logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """Logits (..., V) from the denoiser's final hidden states, the mask token forbidden
        (`Denoiser.logits`); a head trained over N tokens only (`config.head_vocab`): those N
        tokens' logits, fp32, every other token's -inf."""
        head = self.draft_head(self.config.head_vocab) if self.config.head_vocab else None
        if head is None:
            return self.denoiser.logits(hidden, float32)
        return head.spread(head(hidden), float("-inf"))

    # The denoiser's trained parts, as training reads them (train.build_model keeps them in fp32).
    lora = property(lambda self: self.denoiser.adapters, doc="The LoRA adapters per layer, or None.")
    time_conditioning = property(lambda self: self.denoiser.time_conditioning, doc="adaLN's tables, or None.")
    mask_embedding = property(lambda self: self.denoiser.mask_embedding, doc="The mask token's embedding (H,).")

    # ---------------------------------------------------------------- checkpoints (checkpoint.py)
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write config.json and denoiser.safetensors (`checkpoint.save`)."""
        from twotower.model import checkpoint

        checkpoint.save(self, path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *args, backbone=None, dtype=None, config=None, **kwargs):
        """Load a checkpoint written by `save_pretrained` (`checkpoint.from_pretrained`)."""
        from twotower.model import checkpoint

        return checkpoint.from_pretrained(cls, path, backbone=backbone, dtype=dtype, config=config, **kwargs)

    def load_trained_state(self, file) -> None:
        """Load a denoiser.safetensors into the denoiser (`checkpoint.load_trained_state`)."""
        from twotower.model import checkpoint

        checkpoint.load_trained_state(self, file)


AutoModelForCausalLM.register(TwoTowerConfig, TwoTowerForCausalLM, exist_ok=True)
