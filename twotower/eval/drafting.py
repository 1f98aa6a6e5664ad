"""Simulated tokens per verify cycle: what a chain draft and token trees of N nodes would
commit per cycle, counted (not timed) on replies the AR model wrote itself.

Teacher-forced: each sequence is a prompt and the AR model's greedy reply, so the reply's
tokens are exactly what verify mode accepts. One denoiser pass over all blocks at once (the
training pass, `objective.training_hidden`, every slot after the first masked, t = 1: the
pass a draft makes) gives, at every block start inside the reply, each slot's distribution
given the tokens before it and the pending token; a cycle there commits the pending token's
successors that its draft holds, plus one (the context tower's own token). The chain is the
likeliest token of every slot (no threshold); a tree is `tree.build_tree` of N nodes, with and
without the prompt-lookup branch. Cycles start at block boundaries only (every S-th position),
a sample of the positions a real run starts them at.
"""

from __future__ import annotations

import torch

from twotower.eval.metrics import common_prefix
from twotower.generate.draft import lookup_match
from twotower.generate.tree import TokenTree, build_tree
from twotower.objective import Noise, training_hidden


def accepted_along(tree: TokenTree, truth: list[int]) -> int:
    """How many of `truth`'s tokens a greedy verification of `tree` accepts: the longest path
    from the root that spells their beginning."""
    node, accepted = -1, 0
    for token in truth:
        node = tree.child(node, token)
        if node is None:
            break
        accepted += 1
    return accepted


@torch.no_grad()
def block_drafts(model, ids: list[int], head=None) -> tuple[torch.Tensor, list[int]]:
    """The denoiser's slot distributions at every block start of one sequence: (n, S-1, V) for
    the slots after the pending token, and the position of each block's pending token (the
    shifted layout: block b reads the anchor x_{bS} and the pending token x_{bS+1}). head: a
    draft vocabulary's head (`TwoTowerForCausalLM.draft_head`), as verify's drafts read it
    (zero outside its tokens), or None: the whole vocabulary."""
    s = model.config.block_size
    n = (len(ids) - 1) // s
    seq = torch.tensor([ids[: n * s + 1]], device=model.context_device)
    masked = torch.ones(1, n, s, dtype=torch.bool)
    masked[:, :, 0] = False  # the pending token: the context tower's own, known
    noise = Noise(torch.ones(1, device=seq.device), masked.to(seq.device))
    hidden, _, _ = training_hidden(model, seq, noise)
    hidden = hidden.reshape(n, s, -1)[:, 1:]
    if head is not None:
        probs = head.spread(head(hidden).softmax(-1))
    else:
        probs = model.denoiser_logits(hidden).softmax(-1)
    return probs.float().cpu(), [b * s + 1 for b in range(n)]


def simulate_cycles(
    model, sequences: list[list[int]], starts: list[int], tree_sizes=(4, 8, 16), ngram: int = 3, draft_vocab: int = 0
) -> dict:
    """Per way of drafting ("chain"; "lookup-else-chain", prompt lookup's draft where it finds a
    match; "tree{N}"; "tree{N}-no-lookup"): cycles, tokens committed
    and tokens per cycle, over the block starts whose pending token lies in a reply (sequence i's
    reply begins at starts[i]); and the chain's top-1 accuracy per slot after the pending token.
    draft_vocab: drafts pick among the model's N most frequent training tokens, as verify's
    `--draft-vocab N` (0, or a model without a draft vocabulary: the whole vocabulary).
    "calibration": the chain's drafts that were judged (each accepted run and the draft that
    broke it), by their confidence: how many, and the share accepted, which verify's policy
    expects to be about the confidence (`DraftPolicy.confident_length`)."""
    if not model.layout.anchored:
        raise ValueError("simulated verify cycles need the shifted layout (the denoiser drafts after the pending token)")
    names = ["chain", "lookup-else-chain", *(f"tree{n}" for n in tree_sizes), *(f"tree{n}-no-lookup" for n in tree_sizes)]
    tokens = dict.fromkeys(names, 0)
    head = model.draft_head(draft_vocab)
    width = model.config.block_size - 1
    right, judged, cycles = [0] * width, [0] * width, 0
    bins = [[0, 0] for _ in range(CALIBRATION_BINS)]  # per confidence bin: chain drafts judged, accepted
    for ids, start in zip(sequences, starts, strict=True):
        probs, pending = block_drafts(model, ids, head)
        for block, at in enumerate(pending):
            if at < start:
                continue
            truth = ids[at + 1 : at + 1 + width]
            cycles += 1
            chain = probs[block, : len(truth)].argmax(-1).tolist()
            for d, (guess, token) in enumerate(zip(chain, truth)):
                right[d] += guess == token
                judged[d] += 1
            run = common_prefix(chain, truth)
            tokens["chain"] += 1 + run
            for d in range(min(run + 1, len(truth))):  # the accepted run and the draft that broke it
                where = bins[min(int(probs[block, d, chain[d]] * CALIBRATION_BINS), CALIBRATION_BINS - 1)]
                where[0] += 1
                where[1] += d < run
            lookup = lookup_match(ids[: at + 1], len(truth), ngram)[0]
            tokens["lookup-else-chain"] += 1 + common_prefix(lookup or chain, truth)  # lookup where it finds a match
            for n in tree_sizes:
                tokens[f"tree{n}"] += 1 + accepted_along(build_tree(probs[block, : len(truth)], n, lookup), truth)
                tokens[f"tree{n}-no-lookup"] += 1 + accepted_along(build_tree(probs[block, : len(truth)], n), truth)
    return {
        "cycles": cycles,
        "tokens": tokens,
        "tokens_per_cycle": {name: round(count / max(cycles, 1), 4) for name, count in tokens.items()},
        "slot_top1": [round(r / j, 4) if j else None for r, j in zip(right, judged)],
        "calibration": [
            {
                "confidence": [i / CALIBRATION_BINS, (i + 1) / CALIBRATION_BINS],
                "drafts": n,
                "accepted": round(a / n, 4) if n else None,
            }
            for i, (n, a) in enumerate(bins)
        ],
    }


CALIBRATION_BINS = 10  # the chain's judged drafts by their confidence, in bins this wide: 0.1
