"""Token trees in verify mode (twotower/generate/tree.py): the tree mask, greedy tree
verification equal to AR token for token (fp32; bf16 at batch 1), more tokens accepted than a
chain when the right token is a side branch, the cache after a tree cycle equal to AR's, the
chain where trees do not apply, and the knob's checks."""

from __future__ import annotations

import importlib
import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import PROMPTS, VOCAB, perturb_trained, tiny_two_tower

from twotower import TwoTowerError, VerifyOptions, generate_ar, generate_verify
from twotower.generate import tree as tree_module
from twotower.generate.tree import build_tree
from twotower.model import draft_vocab
from twotower.model.masks import extend_mask, tree_mask

verify_module = importlib.import_module("twotower.generate.verify")  # the package's name is also a function's


def _model(dtype=torch.float32, family="llama"):
    model = tiny_two_tower(denoiser="full", block_size=8, family=family)
    perturb_trained(model, scale=0.05)
    return model.to(dtype)


def test_the_tree_mask_of_a_chain_is_the_extend_mask():
    ctx_valid = torch.tensor([[False, True, True], [True, True, True]])
    chain = torch.arange(-1, 4)[None].repeat(2, 1)  # node i follows node i - 1
    assert torch.equal(tree_mask(ctx_valid, chain), extend_mask(ctx_valid, torch.ones(2, 5, dtype=torch.bool)))


def test_the_tree_mask_lets_a_node_see_its_ancestors_and_itself_only():
    parents = torch.tensor([[-1, -1, 0, 1, 2]])  # two branches from the root: 0 -> 2 -> 4, 1 -> 3
    own = tree_mask(torch.ones(1, 2, dtype=torch.bool), parents)[0, 0, :, 2:]
    ancestors = {0: {0}, 1: {1}, 2: {0, 2}, 3: {1, 3}, 4: {0, 2, 4}}
    for i, j in itertools.product(range(5), range(5)):
        assert bool(own[i, j]) == (j in ancestors[i])


def test_build_tree_keeps_the_paths_of_highest_probability():
    """Best-first over the slots' top tokens gives the N paths whose products of probabilities
    are highest, each node after its parent; found by brute force over every path here."""
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(3, 6, generator=g).pow(3).softmax(-1)  # (W, V): distinct, uneven
    tree = build_tree(probs, nodes=7)
    assert all(p < i for i, p in enumerate(tree.parents))
    paths = [tuple(tree.tokens[n] for n in _path(tree, i)) for i in range(len(tree.tokens))]
    score = lambda path: torch.tensor([probs[d, t] for d, t in enumerate(path)]).prod().item()
    every = [p for depth in (1, 2, 3) for p in itertools.product(range(6), repeat=depth)]
    best = sorted(every, key=score, reverse=True)[:7]
    assert sorted(map(score, paths)) == pytest.approx(sorted(map(score, best)))
    assert tree.scores == pytest.approx([score(path) for path in paths])  # each node's: its path's product
    assert tree.prefix(4).tokens == tree.tokens[:4] and all(p < 4 for p in tree.prefix(4).parents)


def test_build_tree_takes_the_lookup_draft_as_a_branch_within_half_the_nodes():
    probs = torch.full((4, VOCAB), 1.0 / VOCAB)
    probs[:, 7] = 0.5
    tree = build_tree(probs, nodes=6, lookup=[9, 10, 11, 12], lookup_acceptance=0.6)
    branch = [tree.child(-1, 9)]
    for token in (10, 11):
        branch.append(tree.child(branch[-1], token))
    assert None not in branch and tree.child(branch[-1], 12) is None  # 3 = 6 // 2 nodes of it
    assert len(tree.tokens) == 6 and tree.child(-1, 7) is not None  # the rest from the denoiser
    assert [tree.scores[n] for n in branch] == pytest.approx([0.6, 0.36, 0.216])  # lookup: its acceptance per token


def _path(tree, node):
    path = []
    while node >= 0:
        path.append(node)
        node = tree.parents[node]
    return path[::-1]


@pytest.mark.parametrize("nodes", [4, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_greedy_tree_verify_is_ar_token_for_token(dtype, nodes, monkeypatch):
    model = _model(dtype)
    calls = []
    real = tree_module.tree_drafts
    monkeypatch.setattr(verify_module, "tree_drafts", lambda *a: calls.append(1) or real(*a))
    for prompt in PROMPTS:
        expected = generate_ar(model, [prompt], max_new_tokens=40).tokens
        for draft in ("denoiser", "auto"):
            assert generate_verify(model, [prompt], max_new_tokens=40, draft=draft, tree_nodes=nodes).tokens == expected
    assert calls  # trees were drafted


def _planted(model, reference: list[int]):
    """A stand-in for the denoiser's slot distributions that knows AR's reply (`reference`:
    the prompt and the reply, by position): each slot's likeliest token is wrong, the second is AR's."""

    def slot_probs(model, cache, pending, width, head=None):
        at = int(cache.next_pos[0])  # the pending token's position
        probs = torch.zeros(1, width, VOCAB)
        for d in range(width):
            right = reference[at + 1 + d] if at + 1 + d < len(reference) else 3
            probs[0, d, (right + 1) % VOCAB] = 0.6
            probs[0, d, right] = 0.4
        return probs

    return slot_probs


def test_a_tree_accepts_the_right_token_on_a_side_branch_where_a_chain_does_not(monkeypatch):
    model = _model()
    prompt = PROMPTS[0]
    ar = generate_ar(model, [prompt], max_new_tokens=30).tokens
    monkeypatch.setattr(tree_module, "slot_probs", _planted(model, prompt + ar[0]))
    monkeypatch.setattr(tree_module.TokenTree, "add_branch", lambda self, tokens, budget, acceptance=1.0: 0)  # no lookup branch
    accepted = {}
    for nodes in (1, 16):  # one node: the chain of the likeliest token
        result = generate_verify(model, [prompt], max_new_tokens=30, draft="denoiser", tree_nodes=nodes)
        assert result.tokens == ar
        accepted[nodes] = result.details["accepted_drafts"]
    assert accepted[1] == 0 and accepted[16] >= 10


def _ar_cache(model, prompt, tokens):
    """The cache of AR steps: the prompt's prefill, then one token per pass."""
    cache, _ = model.context_prefill(torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long))
    for token in tokens:
        model.context_extend(cache, torch.tensor([[token]]))
    return cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_cache_after_a_tree_cycle_is_the_cache_of_ar_steps_over_its_tokens(dtype, monkeypatch):
    """One cycle whose right tokens lie on side branches: the cache keeps exactly the accepted
    path's K,V (and its anchor), as AR steps over the same tokens leave them."""
    model, prompt = _model(dtype), PROMPTS[2]
    ar = generate_ar(model, [prompt], max_new_tokens=12).tokens[0]
    reference = prompt + ar
    cache, logits = model.context_prefill(torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long))
    pending = logits.argmax(-1)
    assert int(pending) == ar[0]
    monkeypatch.setattr(tree_module, "slot_probs", _planted(model, reference))
    drafts = verify_module.Drafts([[]], {0: "denoiser"}, {0: 7})

    class Run:  # what tree_drafts and commit read of a run
        denoiser_passes = 0
        count_pass = staticmethod(lambda rows, n=1: None)
        room = staticmethod(lambda b: 100)

    history = [tree_module.TokenTree()]  # no lookup match: a stand-in whose match finds nothing
    history[0].match = lambda n: ([], 0)
    keep_all = type("Policy", (), {"acceptance": lambda self, b, kind: 0.5, "confident_nodes": lambda self, b, s: len(s)})()
    drafts = tree_module.tree_drafts(model, cache, pending, drafts, history, 12, {0: 7}, Run, keep_all)
    draft_ids, _ = drafts.padded(0, pending.device)
    logits = verify_module.verify_pass(model, cache, pending, draft_ids, drafts.parents)
    accepted, following, _ = tree_module.accept_path(logits, drafts, cache)
    history = [type("H", (), {"extend": lambda self, t: None})()]
    new = verify_module.commit(cache, Run, drafts, [0], accepted.tolist(), following.tolist(), history)
    n = int(accepted[0])
    assert n >= 2 and new[0] == ar[1 : n + 2]  # the accepted drafts, then the context tower's token
    expected = _ar_cache(model, prompt, ar[: n + 1])  # the pending token and the accepted ones
    assert torch.equal(cache.next_pos, expected.next_pos) and torch.equal(cache.valid, expected.valid)
    assert int(cache.anchor[0]) == ar[n]
    for mine, theirs in zip(cache.kv, expected.kv, strict=True):
        assert torch.equal(mine[0], theirs[0]) and torch.equal(mine[1], theirs[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_each_node_of_a_tree_pass_gets_the_logits_of_ar_steps_over_its_path(dtype):
    """Bit for bit: a node's logits do not depend on its siblings or on the pass's width. (The
    LM head is read row by row here: it runs outside the exact pass's row-wise linears, and a
    wide fp32 matmul may round a row otherwise than a one-row one, for chains as for trees.)"""
    model, prompt = _model(dtype), PROMPTS[1]
    head = model.context_tower.lm_head
    head.forward = lambda h: torch.cat([F.linear(row, head.weight) for row in h.reshape(-1, 1, h.shape[-1])]).reshape(
        *h.shape[:-1], -1
    )
    g = torch.Generator().manual_seed(1)
    probs = torch.randn(5, VOCAB, generator=g).mul(3).softmax(-1)
    tree = build_tree(probs, nodes=12)
    assert max(tree.depths) >= 2 and tree.depths.count(1) >= 2  # branches, and paths longer than one token
    tokens = torch.tensor([[40, *tree.tokens]])  # the root (a pending token), then the nodes
    parents = torch.tensor([[-1, *(p + 1 for p in tree.parents)]])
    logits = model.context_extend(_ar_cache(model, prompt, []), tokens, logits="all", exact=True, parents=parents)
    for node in range(len(tree.tokens)):
        path = [40, *(tree.tokens[n] for n in _path(tree, node))]
        expected = model.context_extend(_ar_cache(model, prompt, path[:-1]), torch.tensor([[path[-1]]]), logits="last")
        assert torch.equal(logits[0, node + 1], expected[0]), node


def test_where_trees_do_not_apply_verify_drafts_a_chain(monkeypatch):
    """A hybrid (Mamba-2) backbone, batches and sampled rows draft chains: the same output as
    without trees, and no tree is drafted."""
    monkeypatch.setattr(verify_module, "tree_drafts", lambda *a: pytest.fail("a tree was drafted"))
    hybrid = _model(family="nemotron_h")
    assert not hybrid.verifies_trees
    prompt = PROMPTS[0]
    assert (
        generate_verify(hybrid, [prompt], max_new_tokens=24, draft="denoiser", tree_nodes=8).tokens
        == generate_ar(hybrid, [prompt], max_new_tokens=24).tokens
    )
    model = _model()
    for options in (dict(), dict(temperature=0.8, seed=3)):
        rows = PROMPTS if not options else PROMPTS[:1]
        with_trees = generate_verify(model, rows, max_new_tokens=24, draft="denoiser", tree_nodes=8, **options)
        assert with_trees.tokens == generate_verify(model, rows, max_new_tokens=24, draft="denoiser", **options).tokens


@pytest.mark.parametrize(
    "options, field",
    [
        (dict(tree_nodes=-1), "tree_nodes"),
        (dict(tree_nodes=65), "tree_nodes"),
        (dict(tree_nodes=2.5), "tree_nodes"),
        (dict(tree_nodes=8, draft="lookup"), "tree_nodes"),
        (dict(tree_nodes=8, draft="ar"), "tree_nodes"),
    ],
)
def test_tree_nodes_is_checked(options, field):
    with pytest.raises(TwoTowerError, match=field):
        VerifyOptions(**options)
    with pytest.raises(TwoTowerError, match=field):
        generate_verify(_model(), PROMPTS[:1], max_new_tokens=4, **options)


def test_the_simulated_cycles_read_the_draft_a_cycle_makes_and_count_nested_trees():
    """`eval.drafting`: the one-pass distributions at a block start are the ones a verify cycle's
    draft gets there (`slot_probs` after the same tokens); larger trees without the lookup branch
    hold the smaller ones, so they commit at least as much; every cycle commits >= 1 token."""
    from twotower.eval.drafting import block_drafts, simulate_cycles

    model = _model()
    prompt = PROMPTS[2]
    sequence = prompt + generate_ar(model, [prompt], max_new_tokens=40).tokens[0]
    probs, pending = block_drafts(model, sequence)
    for block in (1, 3):
        at = pending[block]
        cache = _ar_cache(model, sequence[:at], [])
        drafted = tree_module.slot_probs(model, cache, torch.tensor([sequence[at]]), model.config.block_size - 1)
        torch.testing.assert_close(probs[block], drafted[0], atol=1e-5, rtol=1e-4)
    model.draft_vocab = draft_vocab.count_tokens([sequence], model.num_embeddings)
    head = model.draft_head(6)  # drafts among the sequence's 6 most frequent tokens, as verify's --draft-vocab 6
    probs, _ = block_drafts(model, sequence, head)
    assert set(probs[1].nonzero()[:, 1].tolist()) <= set(head.ids.tolist())
    cache = _ar_cache(model, sequence[: pending[1]], [])
    drafted = tree_module.slot_probs(model, cache, torch.tensor([sequence[pending[1]]]), model.config.block_size - 1, head)
    torch.testing.assert_close(probs[1], drafted[0], atol=1e-5, rtol=1e-4)
    model.draft_vocab = None
    result = simulate_cycles(model, [sequence], [len(prompt)], tree_sizes=(2, 4, 16))
    rates = result["tokens_per_cycle"]
    assert result["cycles"] > 0 and min(rates.values()) >= 1
    assert rates["tree2-no-lookup"] <= rates["tree4-no-lookup"] <= rates["tree16-no-lookup"]
    assert all(0 <= a <= 1 for a in result["slot_top1"])
    judged = sum(row["drafts"] for row in result["calibration"])
    accepted = sum(row["drafts"] * row["accepted"] for row in result["calibration"] if row["drafts"])
    assert judged >= result["cycles"]  # every cycle judges its first draft
    assert round(accepted) == round((rates["chain"] - 1) * result["cycles"])  # the accepted runs, by bin


def test_a_tree_may_hold_more_nodes_than_the_block_but_no_more_than_max_draft(monkeypatch):
    model, sizes = _model(), []
    real = tree_module.tree_drafts
    monkeypatch.setattr(verify_module, "tree_drafts", lambda *a: sizes.append(a[5]) or real(*a))
    for options, most in ((dict(), 16), (dict(max_draft=3), 3)):
        sizes.clear()
        result = generate_verify(model, PROMPTS[:1], max_new_tokens=24, draft="denoiser", tree_nodes=16, **options)
        assert result.tokens == generate_ar(model, PROMPTS[:1], max_new_tokens=24).tokens
        assert sizes and set(sizes) == {most}  # the block holds 8 slots
