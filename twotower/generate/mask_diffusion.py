"""Mask-diffusion mode, and mock-AR (the denoiser as a one-token-per-pass predictor).

Diffusion, one cycle per context pass, in named steps:
  1. the context pass that read the committed text gives the AR distribution of the next
     token: its token y_0 is committed as it is (`open_block`), so every context pass commits
     at least one exact AR token and no training can make that token worse;
  2. `fill_block`: the denoiser fills y_1 .. y_{S-1}. Repeat (at most steps_per_block
     times): t = the row's masked share of its block; one denoiser pass; every masked slot
     predicted above the confidence threshold is committed; committed tokens are never
     revisited. A row whose pass commits nothing ends its block there: a low-confidence
     denoiser token is never forced into the text;
  3. `extend_context`: the context tower reads each row's committed prefix [y_0 .. y_j] in one
     pass (rows may keep different numbers), which gives the next cycle's y_0.
Mock-AR is the same cycle with another step 2 (`fill_left_to_right`, docs/METHOD.md section
3.9): the denoiser commits one slot per pass, left to right, whatever its confidence.
Tokens committed after a row's first still-masked slot are dropped with the block: only the
committed prefix becomes text. A weak denoiser therefore degrades to AR's text at a little
less than AR's speed, not to garbage; a trained one commits several tokens per pass.

The block layout (`twotower.model.layout.BlockLayout`, docs/METHOD.md section 3.1) says what
the denoiser reads: shifted, [x_{n-1}, y_0 .. y_{S-2}] over the context without x_{n-1};
same-position, [y_0 .. y_{S-1}] over the whole context; output j predicts y_j either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from twotower.config import TwoTowerError
from twotower.generate.common import NextTokenDecoder, drive, start_run
from twotower.generate.sampling import TokenLogprob
from twotower.model.protocol import DecodingModel


def committed_prefix(filled: torch.Tensor) -> torch.Tensor:
    """(B, S) bool, True = committed -> (B,) number of leading committed slots."""
    return filled.long().cumprod(1).sum(1)


def first_eos(block: torch.Tensor, filled: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """(B,) slot of the first committed EOS per row, or S when there is none."""
    hit = torch.isin(block, eos) & filled
    return torch.where(hit.any(1), hit.int().argmax(1), block.shape[1])


@dataclass
class Block:
    """One row-batch of blocks being filled. Slot j holds y_j (the mask id until committed)."""

    tokens: torch.Tensor  # (B, S) long
    filled: torch.Tensor  # (B, S) bool: committed
    allowed: torch.Tensor  # (B, S) bool: slots the row may still commit (its room, nothing after an EOS)
    slots: torch.Tensor  # (B, S) bool: the row's own block (its room): the denoiser attends to these only
    emitted: list[int]  # per row: slots already streamed
    logprobs: list[list[TokenLogprob | None] | None] | None = None  # per row asking: each committed slot's (None: no row asks)

    @property
    def masked(self) -> torch.Tensor:
        return self.allowed & ~self.filled

    def prefix(self) -> torch.Tensor:
        return committed_prefix(self.filled & self.allowed)


def open_block(run, first: torch.Tensor, size: int, mask_id: int, device, first_logprobs=None) -> Block:
    """Step 1: a block whose slot 0 is the context tower's own token (with its logprobs, per
    row asking for them); the row's other slots up to its room are masked. Finished rows get no slot."""
    batch = first.shape[0]
    room = torch.tensor([run.room(b) for b in range(batch)], device=device)
    live = room > 0
    slots = torch.arange(size, device=device)[None]
    tokens = torch.full((batch, size), mask_id, dtype=torch.long, device=device)
    tokens[:, 0] = first.to(device)
    filled = (slots == 0) & live[:, None]
    allowed = (slots < room[:, None]) & live[:, None]
    logprobs = None
    if first_logprobs is not None:
        logprobs = [None if lp is None else [*lp, *[None] * (size - 1)] for lp in first_logprobs]
    return Block(tokens, filled, allowed, allowed | (slots == 0), [0] * batch, logprobs)


def emit_prefix(run, block: Block):
    """Stream each row's committed prefix beyond what was streamed; a committed EOS closes the
    slots after it."""
    eos = run.eos.to(block.tokens.device)
    slots = torch.arange(block.tokens.shape[1], device=block.tokens.device)[None]
    first = first_eos(block.tokens, block.filled & block.allowed, eos)
    first = torch.where(run.ends_at_eos().to(first.device), first, block.tokens.shape[1])
    block.allowed &= slots <= first[:, None]
    ready = block.prefix().tolist()
    rows = block.tokens.tolist()
    logprobs = None
    if block.logprobs is not None:
        logprobs = [None if lp is None else lp[e:r] for lp, e, r in zip(block.logprobs, block.emitted, ready)]
    event = run.emit([rows[b][block.emitted[b] : ready[b]] for b in range(len(rows))], logprobs)
    block.emitted = [max(e, r) for e, r in zip(block.emitted, ready)]
    block.allowed &= ~run.done.to(block.tokens.device)[:, None] | block.filled  # a finished row fills no more
    return event


def fill_block(model: DecodingModel, run, cache, block: Block):
    """Step 2: denoiser passes over the block until no row commits anything, every slot is
    committed, or steps_per_block passes were made. Yields a StreamEvent per pass."""
    s = run.settings
    reads = model.layout.reads(cache, model.denoiser_device)
    maskable = (block.allowed.sum(1) - 1).clamp(min=1)
    live = block.masked.any(1)
    for _ in range(s.steps_per_block):
        if not live.any():
            break
        masked = block.masked
        t = masked.sum(1).float() / maskable
        logits = model.denoise_block(reads, block.tokens, t, slots=block.slots)
        run.denoiser_passes += 1
        run.count_pass(live.cpu())
        noise = run.sampling.fresh_noise(logits, live.nonzero().flatten().tolist(), s.block_size)
        tokens = run.sampling.pick(logits, noise)  # (B, S)
        confidence = logits.softmax(-1).gather(-1, tokens[..., None])[..., 0]  # the denoiser's own probability
        commit = masked & (confidence > s.threshold) & live[:, None]
        block.tokens = torch.where(commit, tokens, block.tokens)
        block.filled |= commit
        keep_logprobs(run, block, logits, tokens, commit)
        event = emit_prefix(run, block)
        live &= commit.any(1) & block.masked.any(1)
        yield event


def keep_logprobs(run, block: Block, logits: torch.Tensor, tokens: torch.Tensor, commit: torch.Tensor) -> None:
    """The logprobs of the slots this pass committed, under the denoiser's logits (B, S, V),
    for the rows that ask."""
    found = run.sampling.logprobs(logits, tokens)
    if found is None:
        return
    for b, slots in enumerate(commit.tolist()):
        if found[b] is not None:
            block.logprobs[b] = [found[b][j] if now else old for j, (now, old) in enumerate(zip(slots, block.logprobs[b]))]


def extend_context(model: DecodingModel, run, cache, block: Block) -> torch.Tensor:
    """Step 3: the context tower reads each row's committed prefix in one pass (the longest
    one's width; the rest of each row is dropped from the cache again). Returns the AR logits
    (B, V) after each row's prefix."""
    keep = block.prefix().clamp(min=1).to(cache.valid.device)
    width = int(keep.max())
    tokens = block.tokens[:, :width].to(cache.valid.device)
    slots = torch.arange(width, device=tokens.device)[None]
    tokens = torch.where(slots < keep[:, None], tokens, run.pad_id)  # never feed the mask id to the context tower
    logits = model.context_extend(cache, tokens, logits=keep - 1)  # (B, V): the LM head at each row's last kept slot
    run.context_passes += 1
    if bool((keep < width).any()):
        cache.keep_new(width, keep)
    return logits


class DiffusionDecoder(NextTokenDecoder):
    """One cycle per context pass: the pass's own token opens each live row's block, the
    denoiser fills the block, and the context tower reads each row's committed prefix (unless
    every row is finished). Between cycles every row holds its next-token logits."""

    def start(self):
        yield from super().start()
        self.starts = [[] for _ in self.run.tokens]  # per row: where each block (each context pass's token) starts

    def cycle(self):
        model, run = self.model, self.run
        first, logprobs = run.next_tokens(self.logits.to(model.denoiser_device))  # AR's
        live = run.live_rows()
        for b in live:
            self.starts[b].append(len(run.tokens[b]))
        size = min(self.block_size(), max(run.room(b) for b in live))
        block = open_block(run, first, size, model.mask_token_id, model.denoiser_device, logprobs)
        yield emit_prefix(run, block)
        yield from self.fill(block)
        if not run.finished:
            self.logits = extend_context(model, run, self.cache, block)

    def block_size(self) -> int:
        return self.run.settings.block_size

    def fill(self, block: Block):
        """Step 2: the denoiser's passes over the block (`fill_block`)."""
        return fill_block(self.model, self.run, self.cache, block)

    def join(self, other: DiffusionDecoder) -> None:
        super().join(other)
        self.starts += other.starts

    def keep_rows(self, rows: list[int]) -> None:
        super().keep_rows(rows)
        self.starts = [self.starts[b] for b in rows]

    def details(self) -> dict:
        return {"cycles": self.run.context_passes, "block_starts": self.starts}


def fill_left_to_right(model: DecodingModel, run, cache, block: Block):
    """Mock-AR's step 2: one denoiser pass per slot, left to right, each committing the row's
    first masked slot whatever its confidence. Each slot attends to the slots before it only
    (`causal`), so that an untrained full-depth denoiser, which is the backbone, gives each
    slot the AR model's next token (a shallow one's slots after the anchor enter an upper layer
    as token embeddings: only training teaches them). Each row picks by its own sampling.
    Yields a StreamEvent per pass."""
    reads = model.layout.reads(cache, model.denoiser_device)
    slots = torch.arange(block.tokens.shape[1], device=block.tokens.device)[None]
    maskable = (block.allowed.sum(1) - 1).clamp(min=1)
    while bool(block.masked.any()):
        masked = block.masked
        live = masked.any(1)
        first = masked.int().argmax(1)[:, None]  # (B, 1): each live row's first masked slot
        t = masked.sum(1).float() / maskable
        logits = model.denoise_block(reads, block.tokens, t, causal=True)
        run.denoiser_passes += 1
        run.count_pass(live.cpu())
        noise = run.sampling.fresh_noise(logits, live.nonzero().flatten().tolist(), model.config.block_size)
        tokens = run.sampling.pick(logits, noise)
        commit = (slots == first) & live[:, None]
        block.tokens = torch.where(commit, tokens, block.tokens)
        block.filled |= commit
        keep_logprobs(run, block, logits, tokens, commit)
        yield emit_prefix(run, block)


class MockARDecoder(DiffusionDecoder):
    """Mock-AR for an AR-first denoiser (docs/METHOD.md section 3.9): one cycle per context
    pass, whose own token opens each row's block as in diffusion mode; the denoiser then commits
    one slot per pass, left to right, to the block's end (`fill_left_to_right`); the context
    tower reads the block. The denoiser's own next-token slot, which an AR-first denoiser is
    never trained on, is not used."""

    def block_size(self) -> int:
        return self.model.config.block_size  # the trained one: mock-AR takes no block size

    def fill(self, block: Block):
        return fill_left_to_right(self.model, self.run, self.cache, block)


@torch.inference_mode()
def diffusion_stream(model, input_ids, attention_mask=None, *, mask_token_id=None, **options):
    """Yields a StreamEvent whenever a row's committed prefix grows; returns a GenerationResult
    (nfe counts denoiser passes; the context passes that give each block's first token are
    `context_passes`).

    Options: GenerationSettings fields (max_new_tokens, block_size, steps_per_block,
    threshold, temperature, top_p, seed, eos_token_id).
    """
    run = start_run(model, input_ids, attention_mask, "diffusion", options)
    if mask_token_id is not None and mask_token_id != model.mask_token_id:
        raise TwoTowerError(f"mask_token_id {mask_token_id} differs from the model's mask token {model.mask_token_id}")
    return (yield from drive(DiffusionDecoder(model, run)))


@torch.inference_mode()
def mock_ar_stream(model, input_ids, attention_mask=None, **options):
    """Mock-AR: the denoiser as a one-token-per-pass predictor for an AR-first denoiser: each
    block's first token is the context pass's own, then one denoiser pass per slot, left to
    right, in blocks of the trained size (`MockARDecoder`). With an untrained full-depth
    denoiser it reproduces AR exactly; a check that the two towers line up. nfe counts
    denoiser passes."""
    for name in ("block_size", "steps_per_block", "threshold"):
        if name in options:
            raise TwoTowerError(f"mock-ar commits one token per pass; {name} does not apply")
    run = start_run(model, input_ids, attention_mask, "mock-ar", options)
    return (yield from drive(MockARDecoder(model, run)))
