"""Mask-diffusion mode (and mock-AR, its one-token special case).

Per block: start with every slot masked; repeat (at most steps_per_block times): t = masked
fraction of the row's block; one denoiser pass; predict every masked slot; commit the
confident ones (`choose_commits`); committed tokens are never revisited. Then the context
tower reads the block in one pass and the next block starts.

The block layout (`twotower.model.layout.BlockLayout`, docs/METHOD.md section 3.1) says what
the denoiser reads: shifted, [x_{n-1}, y_0 .. y_{S-2}] over the context without x_{n-1};
same-position, [y_0 .. y_{S-1}] over the whole context; output j predicts y_j either way.
"""

from __future__ import annotations

import torch

from twotower.config import TwoTowerError
from twotower.generate.common import start_run
from twotower.generate.sampling import choose_commits, sample_tokens


def committed_prefix(masked: torch.Tensor) -> torch.Tensor:
    """(B, S) bool -> (B,) number of leading slots already committed."""
    return torch.where(masked.any(1), masked.int().argmax(1), masked.shape[1])


def first_eos(block: torch.Tensor, masked: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """(B,) slot of the first committed EOS per row, or S when there is none."""
    hit = torch.isin(block, eos) & ~masked
    return torch.where(hit.any(1), hit.int().argmax(1), block.shape[1])


@torch.inference_mode()
def diffusion_stream(
    model, input_ids, attention_mask=None, *, mask_token_id=None, time_conditioning=True, mode="diffusion", **options
):
    """Yields a StreamEvent whenever a row's committed prefix grows; returns a GenerationResult.

    Options: GenerationSettings fields (max_new_tokens, block_size, steps_per_block,
    confidence_threshold, temperature, top_p, seed, eos_token_id).
    """
    run = start_run(model, input_ids, attention_mask, mode, options)
    s = run.settings
    if mask_token_id is not None and mask_token_id != model.mask_token_id:
        raise TwoTowerError(f"mask_token_id {mask_token_id} differs from the model's mask token {model.mask_token_id}")
    mask_id, layout, den = model.mask_token_id, model.layout, model.denoiser_device
    batch = run.ids.shape[0]

    cache, _ = model.context_prefill(run.ids, run.attention_mask, logits=None)
    run.context_passes += 1
    anchor = run.ids[:, -1].to(den)  # last committed token of each row (prompts are left-padded)
    eos = run.eos.to(den)
    produced = 0
    while True:
        size = min(s.block_size, s.max_new_tokens - produced)
        view = layout.view(cache).to(den)  # moved once per block, not per step
        start = layout.start(cache).to(den)
        block = torch.full((batch, size), mask_id, dtype=torch.long, device=den)
        masked = (~run.done).to(den)[:, None].repeat(1, size)  # (B, S)
        emitted = [0] * batch
        slots = torch.arange(size, device=den)[None]  # (1, S)
        for step in range(s.steps_per_block):
            if not masked.any():
                break
            inputs = layout.inputs(anchor, block)
            t = masked.sum(1).float() / size if time_conditioning else None
            logits = model.denoise(view, inputs, start, t)  # (B, S, V)
            run.denoiser_passes += 1
            run.count_pass(masked.any(1).cpu())
            tokens, confidence = sample_tokens(logits, s.temperature, s.top_p, run.generator)
            commit = choose_commits(confidence, masked, s.confidence_threshold, s.steps_per_block - step)
            block = torch.where(commit, tokens, block)
            masked &= ~commit
            masked &= slots <= first_eos(block, masked, eos)[:, None]  # slots after a committed EOS are never emitted
            ready = committed_prefix(masked).tolist()
            rows = block.tolist()
            event = run.emit([rows[b][emitted[b] : ready[b]] for b in range(batch)])
            emitted = ready
            masked &= ~run.done.to(den)[:, None]  # a row that reached EOS stops filling its block
            yield event
        produced += size
        if run.done.all() or produced >= s.max_new_tokens:
            break
        block = block.masked_fill(block == mask_id, run.pad_id)  # slots a finished row left unfilled
        model.context_extend(cache, block.to(cache.valid.device), logits=None)
        run.context_passes += 1
        anchor = block[:, -1]
    return run.result()


def mock_ar_stream(model, input_ids, attention_mask=None, **options):
    """Mock-AR: the denoiser as a one-token-per-pass predictor over the context caches (fed the
    last committed token with the context view without it, no time conditioning). With an
    untrained denoiser it reproduces AR exactly; a check that the two towers line up."""
    for name in ("block_size", "steps_per_block", "confidence_threshold"):
        if name in options:
            raise TwoTowerError(f"mock-ar commits one token per pass; {name} does not apply")
    return (
        yield from diffusion_stream(
            model, input_ids, attention_mask, time_conditioning=False, mode="mock-ar", block_size=1, steps_per_block=1, **options
        )
    )
