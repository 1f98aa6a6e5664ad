"""What the decoders call on a model: `DecodingModel`, the whole interface between
`twotower.generate` (every mode, the server's engine through it) and the two towers.

`TwoTowerForCausalLM` implements it; so may a stand-in (a test's fake with fixed logits, a
wrapper), which the decoders drive as they drive the model. Shapes: B rows, T prompt positions,
S positions of a pass or slots of a block, V the vocabulary (LM head width), H the hidden width.
The benchmark (`eval/speed.py`) also reads what only the concrete model has (`context_tower` for
transformers' generate, `family`, `step_layers`), and the server's engine `context_tower`'s
generation config (its EOS ids): those are measurements and set-up, not decoding.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from twotower.config import TwoTowerConfig
from twotower.model.cache import ContextCache
from twotower.model.layout import BlockLayout, BlockReads


@runtime_checkable
class DecodingModel(Protocol):
    """Everything `twotower.generate` reads of a model: four numbers, three devices and limits,
    the block layout, three passes (`context_prefill`, `context_extend`, `denoise_block`) and the draft head."""

    config: TwoTowerConfig
    """Read: `config.block_size`, the block size the denoiser was trained on (the default and
    the largest block of diffusion and verify mode)."""

    layout: BlockLayout
    """Where a block sits: `layout.reads(cache, device)` gives what a denoiser pass over the next
    block reads of a cache; `layout.anchored` says whether slot 0 holds the last committed token
    (verify mode drafts with the denoiser only then)."""

    num_embeddings: int
    """The backbone's vocabulary: prompt ids must lie in [0, num_embeddings)."""

    mask_token_id: int
    """The id of a masked slot in a block given to `denoise_block`."""

    @property
    def max_context(self) -> int:
        """The most positions a row may hold (prompt + reply)."""
        ...

    @property
    def context_device(self) -> torch.device:
        """Where prompts, caches and the context tower's logits live."""
        ...

    @property
    def denoiser_device(self) -> torch.device:
        """Where blocks, denoiser logits and the sampling generator of the denoising modes live."""
        ...

    @property
    def exact_rows(self) -> int | None:
        """The most rows (batch x positions) a context pass may hold and still give each row a
        one-row pass's logits bit for bit (quantised weights); None: any. Verify mode keeps its
        drafts within it."""
        ...

    def context_prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits: str | None = "last"
    ) -> tuple[ContextCache, torch.Tensor | None]:
        """Read left-padded prompts: input_ids (B, T) long and attention_mask (B, T) (zeros first)
        on `context_device`. Returns a new cache holding them and the float AR logits after them:
        (B, V) for "last", (B, T, V) for "all", None for None. Decoders call the cache's `join`,
        `select` and `keep_new` and read its `valid` (B, T') mask."""
        ...

    @property
    def verifies_trees(self) -> bool:
        """Whether `context_extend` reads token trees (parents): the cache can keep one path of
        one (attention K,V can, a recurrent state cannot)."""
        ...

    def context_extend(
        self,
        cache: ContextCache,
        tokens: torch.Tensor,
        logits: str | torch.Tensor | None = None,
        exact: bool = False,
        parents: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Read S tokens per row (B, S) after what the cache holds and append them to it. Returns
        the float AR logits: None for None, (B, V) for "last", (B, S, V) for "all", and (B, V) at
        one position per row for a (B,) long tensor. exact: each position's logits are a
        one-token pass's bit for bit (verify mode at batch 1). parents: None, or (B, S) long, a
        token tree (each token's parent among them, -1: the cache's last token; `verifies_trees`)."""
        ...

    def draft_head(self, size: int):
        """The denoiser's LM head over the `size` most frequent tokens of its training data (a
        `DraftHead`: logits (..., N), `ids` (N,) their token ids), or None where there is no such
        vocabulary or size is 0: drafts then read the whole head."""
        ...

    def denoise_block(
        self,
        reads: BlockReads,
        block: torch.Tensor,
        t: torch.Tensor | None = None,
        slots: torch.Tensor | None = None,
        causal: bool = False,
        head=None,
        first: int = 0,
    ) -> torch.Tensor:
        """One denoiser pass over the next block after a cache: reads = `layout.reads(cache,
        denoiser_device)`; block (B, S) long, each slot's committed id or `mask_token_id`; t (B,)
        float, the share of the block still masked (None: no time conditioning); slots (B, S)
        bool, the slots of each row's own block (None: all); causal: each slot attends to the
        slots before it only; head: a `DraftHead`, logits over its tokens only (None: the whole
        vocabulary); first: the first slot whose logits are wanted. Returns float logits
        (B, S - first, V or N), output j predicting slot first + j, the mask token never chosen."""
        ...
