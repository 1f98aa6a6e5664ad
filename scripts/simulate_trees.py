"""Simulated tokens per verify cycle, chain against token trees (`twotower.eval.drafting`):
`python scripts/simulate_trees.py --num-prompts 16 --out trees.json`. A measurement for
choosing `--tree-nodes`, not a user command: counts, not timings.

The sequences are built-in evaluation prompts (held out of the shipped denoiser's training)
with the AR model's greedy replies, written here first; prints one line per way of drafting
and writes the figures, the settings and the command to --out.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import twotower
from twotower.eval.drafting import simulate_cycles
from twotower.eval.tasks import builtin_tasks, interleave_categories


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="a twotower checkpoint folder, or 'default'")
    parser.add_argument("--num-prompts", type=int, default=16, help="built-in prompts, categories interleaved")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="length of each AR reply")
    parser.add_argument("--trees", default="4,8,16", help="tree sizes (nodes), comma-separated")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per AR batch")
    parser.add_argument("--draft-vocab", type=int, default=0, help="drafts pick among the model's N most frequent "
                        "training tokens, as verify's --draft-vocab N (0: the whole vocabulary)")  # fmt: skip
    parser.add_argument("--out", help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    model, tokenizer = twotower.load_model(args.model, dtype=torch.bfloat16, merge=True)
    tasks = interleave_categories(builtin_tasks())[: args.num_prompts]
    prompts = [twotower.encode_prompt(tokenizer, task.prompt) for task in tasks]
    eos = twotower.eos_token_ids(model, tokenizer)
    replies = []
    for lo in range(0, len(prompts), args.batch_size):
        batch = prompts[lo : lo + args.batch_size]
        replies += twotower.generate_ar(model, batch, max_new_tokens=args.max_new_tokens, eos_token_id=eos).tokens
    sequences = [p + r for p, r in zip(prompts, replies, strict=True)]
    sizes = tuple(int(n) for n in args.trees.split(","))
    result = simulate_cycles(model, sequences, [len(p) for p in prompts], sizes, draft_vocab=args.draft_vocab)
    result["settings"] = {**vars(args), "block_size": model.config.block_size, "command": " ".join(sys.argv)}
    for name, rate in result["tokens_per_cycle"].items():
        print(f"{name:>18}: {rate:.3f} tokens per cycle")
    print(f"{result['cycles']} cycles; chain top-1 per slot: {result['slot_top1']}")
    for row in result["calibration"]:
        if row["drafts"]:
            low, high = row["confidence"]
            print(f"  drafts of confidence {low:.1f}-{high:.1f}: {row['drafts']:5d}, accepted {row['accepted']:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
