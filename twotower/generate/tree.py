"""Token trees for verify mode: several drafts per cycle, checked in one context pass.

A chain draft is lost at its first wrong token. A tree holds, after the pending token (its
root), the denoiser's likeliest tokens for each slot as siblings, so that when the first
choice for a slot is wrong a second one may still be right; the context tower checks every
node in one pass (`TwoTowerForCausalLM.context_extend` with parents: each node attends to the
cache and its ancestors, at position = the cache's next position + its depth), and the
cycle commits the longest path of nodes that are the context tower's own choices.

The shape follows the draft's probabilities, as EAGLE-2 does with its draft model's (and
Medusa with one head per slot): one denoiser pass over a block of masked slots gives each
slot's distribution; a path's score is the product of its tokens' probabilities (the slots'
distributions taken as independent, as Medusa's heads are), and the tree is the N nodes of
highest score, found best-first (`build_tree`: a child scores at most its parent, so every
node's parent is in the tree before it). Where prompt lookup finds a match, its draft is a
branch too, given up to half the nodes first (its tokens are often right in long runs).

Exactness: at batch 1 a tree pass is exact (`backbones.base.exact_attention` reads, for each
node, the cached keys then its path's, as an AR step over that path reads them), so every
node's logits are AR's after its path bit for bit, greedy verification commits AR's tokens,
and the cache keeps exactly the accepted path's K,V (`ContextCache.reorder_new`, then the
cycle's usual `keep_new`). Trees are used for greedy rows at batch 1 on attention backbones;
sampled rows, batches and recurrent (Mamba) backbones draft a chain (docs/verify.md).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import torch

from twotower.generate.draft import lookup_kind
from twotower.model.protocol import DecodingModel


@dataclass
class TokenTree:
    """Nodes after a root (the pending token): node i holds tokens[i] and follows parents[i]
    (-1: the root); a parent comes before its children, and siblings hold distinct tokens."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)  # how likely each node is to be accepted (its path's)

    def child(self, parent: int, token: int) -> int | None:
        """The node holding `token` after `parent`, or None."""
        for i, (t, p) in enumerate(zip(self.tokens, self.parents)):
            if p == parent and t == token:
                return i
        return None

    def add(self, parent: int, token: int, score: float = 1.0) -> tuple[int, bool]:
        """The node of `token` after `parent` (with `score`), added unless it is there; and
        whether it was added."""
        found = self.child(parent, token)
        if found is not None:
            return found, False
        self.tokens.append(token)
        self.parents.append(parent)
        self.depths.append(1 if parent < 0 else self.depths[parent] + 1)
        self.scores.append(score)
        return len(self.tokens) - 1, True

    def add_branch(self, tokens: list[int], budget: int, acceptance: float = 1.0) -> int:
        """A chain of tokens after the root (a lookup draft), merged with the nodes already there;
        at most `budget` new nodes, the one at depth d scored acceptance ** d. Returns how many it added."""
        node, added = -1, 0
        for depth, token in enumerate(tokens, 1):
            if added == budget and self.child(node, token) is None:
                break
            node, new = self.add(node, token, acceptance**depth)
            added += new
        return added

    def prefix(self, nodes: int) -> TokenTree:
        """Its first `nodes` nodes: a tree too, since a parent comes before its children."""
        return TokenTree(self.tokens[:nodes], self.parents[:nodes], self.depths[:nodes], self.scores[:nodes])


def build_tree(probs: torch.Tensor, nodes: int, lookup: list[int] | None = None, lookup_acceptance: float = 1.0) -> TokenTree:
    """The tree of at most `nodes` nodes for one row: the lookup branch first (at most half the
    nodes, scored by `lookup_acceptance`, `TokenTree.add_branch`), then the paths of highest
    score (the product of their tokens' probabilities; one probability row per slot: probs
    (W, V), slot d = depth d + 1) best-first. A node's first child and its next sibling are its
    successors in the search, so that every slot's tokens are read in order of probability and
    no node is scored before its parent."""
    tree = TokenTree()
    if lookup:
        tree.add_branch(lookup[: probs.shape[0]], nodes // 2, lookup_acceptance)
    top = probs.float().topk(min(nodes, probs.shape[-1]), dim=-1)  # no slot needs more than `nodes` tokens
    values, ids = top.values.tolist(), top.indices.tolist()  # (W, k) each
    # Candidates: (-score, the parent's score, parent node, depth, rank of the token in its slot).
    frontier = [(-values[0][0], 1.0, -1, 0, 0)]
    while frontier and len(tree.tokens) < nodes:
        neg, above, parent, depth, rank = heapq.heappop(frontier)
        node, _ = tree.add(parent, ids[depth][rank], -neg)
        if rank + 1 < len(ids[depth]):  # the next sibling
            heapq.heappush(frontier, (-above * values[depth][rank + 1], above, parent, depth, rank + 1))
        if depth + 1 < len(ids):  # the first child
            heapq.heappush(frontier, (neg * values[depth + 1][0], -neg, node, depth + 1, 0))
    return tree


@torch.no_grad()
def slot_probs(model: DecodingModel, cache, pending: torch.Tensor, width: int, head=None) -> torch.Tensor:
    """One denoiser pass over a block of `width` masked slots after the pending token (as
    `draft.denoiser_draft`'s first pass): each slot's distribution (B, W, V). head: a
    `DraftHead`, whose tokens alone get logits (as a chain's draft does), the rest probability 0."""
    den = model.denoiser_device
    reads = model.layout.reads(cache, den)
    block = torch.full((pending.shape[0], width + 1), model.mask_token_id, dtype=torch.long, device=den)
    block[:, 0] = pending.to(den)
    t = torch.ones(pending.shape[0], device=den)
    probs = model.denoise_block(reads, block, t, head=head, first=1).softmax(-1)
    return probs if head is None else head.spread(probs)


def tree_drafts(model: DecodingModel, cache, pending, drafts, history, nodes: int, depth: dict[int, int], run, policy, head=None):
    """Step 2 for trees: the denoiser rows' drafts as token trees of at most `nodes` nodes and
    depth[b] levels (one denoiser pass; head: the draft vocabulary's, as `slot_probs`), with the
    row's lookup draft as a branch; each row's tree is cut to the nodes that pay, by their scores
    (`DraftPolicy.confident_nodes`); every row's nodes go into drafts.tokens, and their parents
    (B, N) into drafts.parents."""
    rows = list(drafts.den_rows)
    probs = slot_probs(model, cache, pending, max(depth[b] for b in rows), head)
    run.denoiser_passes += 1
    run.count_pass(rows, 1)
    drafts.passes = 1
    trees = {}
    for b in rows:
        found, match = history[b].match(depth[b])
        tree = build_tree(probs[b, : depth[b]], nodes, found, policy.acceptance(b, lookup_kind(match)))
        trees[b] = tree.prefix(policy.confident_nodes(b, tree.scores))
    for b, tree in trees.items():
        drafts.tokens[b] = tree.tokens
    width = max(len(d) for d in drafts.tokens)
    parents = torch.arange(-1, width - 1)[None].repeat(len(drafts.tokens), 1)  # rows without a tree: chains
    for b, tree in trees.items():
        parents[b, : len(tree.parents)] = torch.tensor(tree.parents)
    drafts.parents = parents.to(pending.device)
    return drafts


def accept_path(logits: torch.Tensor, drafts, cache) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy verification of token trees. logits: (B, N+1, V) the context tower's after the
    root (slot 0) and every node (slot i + 1); drafts.tokens / drafts.parents as `tree_drafts`
    left them. Walks each row from the root to the child that holds the context tower's own
    choice, while there is one; moves that path's nodes first in the cache (and in
    drafts.tokens), so that the cycle's `commit` keeps them. Returns accepted (B,) and the
    token after them (B,), the last accepted node's choice, and the logits in the cache's new
    order (root, the path, the rest)."""
    choice = logits.argmax(-1).tolist()  # (B, N+1)
    parents = drafts.parents.tolist()
    width = len(choice[0])
    accepted, following, order = [], [], []
    for b, tokens in enumerate(drafts.tokens):
        children = {(parents[b][i], t): i for i, t in enumerate(tokens)}
        path, node = [], -1
        while (node, choice[b][node + 1]) in children:
            node = children[(node, choice[b][node + 1])]
            path.append(node)
        rest = [i for i in range(width - 1) if i not in path]
        order.append([0, *(i + 1 for i in path), *(i + 1 for i in rest)])
        drafts.tokens[b] = [tokens[i] for i in path + rest if i < len(tokens)]
        accepted.append(len(path))
        following.append(choice[b][node + 1])
    cache.reorder_new(width, torch.tensor(order, device=cache.valid.device))
    device = logits.device
    order = torch.tensor(order, device=device)
    logits = logits[torch.arange(len(order), device=device)[:, None], order]
    return torch.tensor(accepted, device=device), torch.tensor(following, device=device), logits
