"""AR mode: the context tower alone, KV-cached, one token per pass. The baseline every other
mode is measured against, and token-identical to transformers' greedy `generate`."""

from __future__ import annotations

import torch

from twotower.generate.common import start_run
from twotower.generate.sampling import sample_tokens


@torch.inference_mode()
def ar_stream(model, input_ids, attention_mask=None, **options):
    """Yields a StreamEvent per token; returns a GenerationResult. Options: GenerationSettings
    fields (max_new_tokens, temperature, top_p, seed, eos_token_id)."""
    run = start_run(model, input_ids, attention_mask, "ar", options)
    s = run.settings
    cache, logits = model.context_prefill(run.ids, run.attention_mask, logits="last")  # (B, V)
    run.context_passes += 1
    for step in range(s.max_new_tokens):
        tokens, _ = sample_tokens(logits, s.temperature, s.top_p, run.generator)  # (B,)
        run.count_pass(~run.done)
        yield run.emit([[t] for t in tokens.tolist()])
        if run.done.all() or step == s.max_new_tokens - 1:
            break
        tokens = tokens.masked_fill(run.done, run.pad_id)
        logits = model.context_extend(cache, tokens[:, None], logits="last")
        run.context_passes += 1
    return run.result()
