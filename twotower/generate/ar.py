"""AR mode: the context tower alone, KV-cached, one token per pass. The baseline every other
mode is measured against, and token-identical to transformers' greedy `generate`."""

from __future__ import annotations

import torch

from twotower.generate.common import NextTokenDecoder, drive, start_run


class ARDecoder(NextTokenDecoder):
    """One cycle: each live row samples its next token from the logits of the last context pass
    (the prefill's at first), and the context tower reads those tokens unless every row is
    finished. Between cycles every row holds its next-token logits, so rows join by stacking."""

    def cycle(self):
        run = self.run
        tokens, logprobs = run.next_tokens(self.logits)  # (B,)
        run.count_pass(run.live_rows())
        event = run.emit([[t] for t in tokens.tolist()], logprobs)
        if not run.finished:
            self.logits = self.model.context_extend(self.cache, run.context_inputs(tokens), logits="last")
            run.context_passes += 1
        yield event


@torch.inference_mode()
def ar_stream(model, input_ids, attention_mask=None, **options):
    """Yields a StreamEvent per token; returns a GenerationResult. Options: GenerationSettings
    fields (max_new_tokens, temperature, top_p, top_k, min_p, penalties, logit_bias, seed,
    logprobs, eos_token_id)."""
    run = start_run(model, input_ids, attention_mask, "ar", options)
    return (yield from drive(ARDecoder(model, run)))
