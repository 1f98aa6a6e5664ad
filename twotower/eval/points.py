"""Operating points (mode, block size, threshold, temperature) and running one over a prompt
set: the part that `quality.run_eval` and `speed.run_bench` share."""

from __future__ import annotations

from dataclasses import dataclass

from twotower.config import BLOCK_MODES, resolve_block_size
from twotower.generate import generate
from twotower.settings import TREE_DRAFTS


@dataclass(frozen=True)
class OperatingPoint:
    mode: str
    block_size: int | None = None
    threshold: float = 0.8
    temperature: float = 0.0
    seed: int = 0
    tree_nodes: int = 0  # verify mode: drafts as a token tree of this many nodes (0: a chain)
    draft: str = "auto"  # verify mode: the draft source (`VerifyOptions.draft`)

    @property
    def label(self) -> str:
        if self.mode in BLOCK_MODES:
            text = f"{self.mode} S={self.block_size} g={self.threshold}"
        else:
            text = self.mode
        text += f" draft={self.draft}" if self.draft != "auto" else ""
        text += f" tree={self.tree_nodes}" if self.tree_nodes else ""
        return text + (f" T={self.temperature}" if self.temperature else "")

    def options(self) -> dict:
        opts = {"temperature": self.temperature, "seed": self.seed if self.temperature else None}
        if self.mode in BLOCK_MODES:
            opts.update(block_size=self.block_size, threshold=self.threshold)
        if self.tree_nodes:
            opts.update(tree_nodes=self.tree_nodes)
        if self.draft != "auto":
            opts.update(draft=self.draft)
        return opts


AR = OperatingPoint("ar")


def operating_points(
    modes, block_sizes, thresholds, temperatures, trained_block_size: int, trees=(0,), drafts=("auto",)
) -> list[OperatingPoint]:
    """AR greedy first (the reference), then every requested combination (a block size of None
    is the trained block size; verify mode once per draft source and tree size, trees only for
    the sources that build them: auto and denoiser)."""
    points = [AR]
    for temperature in temperatures:
        for mode in modes:
            if mode in BLOCK_MODES:
                for size in block_sizes:
                    size = resolve_block_size(size, trained_block_size)  # None: the trained block size
                    nodes = trees if mode == "verify" else (0,)
                    sources = drafts if mode == "verify" else ("auto",)
                    points += [
                        OperatingPoint(mode, size, g, temperature, tree_nodes=n, draft=d)
                        for g in thresholds
                        for d in sources
                        for n in nodes
                        if not n or d in TREE_DRAFTS
                    ]
            else:
                points.append(OperatingPoint(mode, None, 0.8, temperature))
    unique = []
    for p in points:
        if p not in unique:
            unique.append(p)
    return unique


@dataclass
class Reply:
    tokens: list[int]
    text: str
    nfe: int


def generate_replies(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new: list[int],
    point: OperatingPoint,
    batch_size: int,
    eos: list[int],
    bar=None,
    memory=None,
) -> tuple[list[Reply], dict]:
    """Replies in prompt order, generated in batches of prompts that share max_new_tokens.
    Returns the replies and the pass counts / seconds summed over batches. memory: the
    DraftMemory verify mode starts from and adds to (None: a fresh one per batch)."""
    replies: list[Reply | None] = [None] * len(prompts)
    totals = {"seconds": 0.0, "new_tokens": 0, "nfe": 0, "denoiser_passes": 0, "context_passes": 0}
    by_length: dict[int, list[int]] = {}
    verify = {"memory": memory} if point.mode == "verify" else {}
    for i, n in enumerate(max_new):
        by_length.setdefault(n, []).append(i)
    for n, indices in sorted(by_length.items()):
        for start in range(0, len(indices), batch_size):
            group = indices[start : start + batch_size]
            result = generate(
                model, point.mode, [prompts[i] for i in group], max_new_tokens=n, eos_token_id=eos, **point.options(), **verify
            )
            for row, i in enumerate(group):
                toks = result.tokens[row]
                text = tokenizer.decode(toks, skip_special_tokens=True) if tokenizer is not None else ""
                replies[i] = Reply(toks, text, result.row_nfe[row])
            for key in ("seconds", "new_tokens", "nfe", "denoiser_passes", "context_passes"):
                totals[key] += getattr(result, key)
            add_counts(totals, result.details)
            if bar is not None:
                bar.update(len(group))
    return replies, totals


def add_counts(totals: dict, part: dict, numbers=(int,)) -> None:
    """Sum a part's numbers of these types, and dicts of them, into a total; other values are
    left out (a mode's integer statistics, verify's cycles, drafted and draft sources, summed
    over batches without its ratios; the benchmark sums whole totals, seconds included)."""
    for key, value in part.items():
        if isinstance(value, dict):
            add_counts(totals.setdefault(key, {}), value, numbers)
        elif isinstance(value, numbers):
            totals[key] = totals.get(key, 0) + value
