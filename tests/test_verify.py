"""Verify mode: drafts checked by the context tower. Greedy output must equal generate_ar token
for token; sampled output must follow the AR distribution (tests/test_sampling_rows.py: and be
AR's seeded reply token for token); the cache must hold exactly the committed tokens after a
rejection."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import PROMPTS, VOCAB, perturb_trained, tiny_two_tower

from twotower import GenerationSettings, TwoTowerError, generate_ar, generate_verify
from twotower.backbones.base import RowWise, exact_attention, linear, sdpa
from twotower.generate.common import left_pad
from twotower.generate.draft import DraftMemory, TokenHistory, batch_bucket, lookup_kind, lookup_match, static_cost
from twotower.generate.sampling import Sampling, filtered
from twotower.generate.verify import DraftPolicy, accept_drafts, lookup_draft
from twotower.model.masks import tree_mask

DRAFTS = ["auto", "denoiser", "lookup", "ar"]


def target_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """The distribution a sampled row draws from: softmax(top-p(logits / T))."""
    scalar = lambda value: torch.tensor(float(value))
    return filtered(logits.float() / temperature, scalar(logits.shape[-1]), scalar(top_p if top_p < 1 else 2), scalar(0)).softmax(
        -1
    )


def _model(kind="lora", trained=False, family="llama", **config):
    model = tiny_two_tower(denoiser=kind, block_size=8, family=family, **config)
    if trained:
        perturb_trained(model, scale=0.05)
    return model


@pytest.mark.parametrize("family", ["llama", "nemotron_h"])
@pytest.mark.parametrize("trained", [False, True], ids=["untrained", "perturbed"])
@pytest.mark.parametrize("draft", DRAFTS)
def test_greedy_verify_equals_ar_ragged_batch(denoiser_kind, draft, trained, family):
    model = _model(denoiser_kind, trained, family)
    expected = generate_ar(model, PROMPTS, max_new_tokens=40).tokens
    result = generate_verify(model, PROMPTS, max_new_tokens=40, draft=draft)
    assert result.tokens == expected
    # every row committed >= 1 token per cycle and the counts add up
    assert sum(result.details["draft_sources"].values()) <= result.details["cycles"] * len(PROMPTS)
    assert result.details["cycles"] <= 40


@pytest.mark.parametrize("draft", DRAFTS)
def test_greedy_verify_batch_one_equals_ar(draft):
    model = _model("full", trained=True)
    for prompt in PROMPTS:
        assert (
            generate_verify(model, [prompt], max_new_tokens=30, draft=draft).tokens
            == generate_ar(model, [prompt], max_new_tokens=30).tokens
        )


def test_verify_with_an_untrained_denoiser_accepts_its_drafts_first_token():
    """Shifted layout: in a one-token draft (block size 2) an untrained denoiser reads
    [anchor, pending], as the context tower does, so its draft is the AR choice and every
    denoiser cycle accepts it; a perturbed one gets rejections too, and the output is still AR's."""
    untrained = generate_verify(_model(), PROMPTS[:1], max_new_tokens=24, draft="denoiser", block_size=2)
    assert untrained.details["draft_sources"]["denoiser"] > 0
    assert untrained.details["accepted_drafts"] >= untrained.details["draft_sources"]["denoiser"]
    perturbed_model = _model(trained=True)
    perturbed = generate_verify(perturbed_model, PROMPTS, max_new_tokens=24, draft="denoiser")
    assert perturbed.details["draft_acceptance"] < 1.0
    assert perturbed.tokens == generate_ar(perturbed_model, PROMPTS, max_new_tokens=24).tokens


@pytest.mark.parametrize("family", ["llama", "nemotron_h"])
@pytest.mark.parametrize("weights", ["dense", "fused", "int8"])
def test_in_bf16_an_exact_pass_gives_each_position_a_one_token_passs_logits(weights, family):
    """bf16 kernels sum a query's keys in an order that depends on how many keys it reads: an
    exact pass (verify's) attends each query over as many keys as an AR step reads, so each
    position's logits are a one-token pass's bit for bit, on quantised weights too within the
    rows they serve, and on fused projections (`inference.fuse`). (Llama: every other op is row
    by row; the hybrid's Mamba scan is not, so there only the first position is checked.)"""
    model = tiny_two_tower(family=family).to(torch.bfloat16)
    model = model.fuse() if weights == "fused" else model.quantize(weights)
    prompt = torch.tensor([PROMPTS[0]])
    tokens = torch.tensor([[5, 9, 13, 2, 7, 11, 3, 8]])
    cache, _ = model.context_prefill(prompt, torch.ones_like(prompt), logits=None)
    one = torch.cat([model.context_extend(cache, tokens[:, i : i + 1], logits="all") for i in range(tokens.shape[1])], 1)
    checked = slice(None) if family == "llama" else slice(0, 1)
    for width in (2, 5, 8):
        cache, _ = model.context_prefill(prompt, torch.ones_like(prompt), logits=None)
        wide = model.context_extend(cache, tokens[:, :width], logits="all", exact=True)
        assert torch.equal(wide[:, checked], one[:, :width][:, checked]), width


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_exact_attention_gives_each_query_what_it_gets_alone(dtype):
    """Batch 2 with left padding in one row, 9 queries after 40 slots: each query's output is,
    bit for bit, one query's attention over the slots up to its own (unmasked when nothing in
    its row is masked, as in an AR step)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 9, 16, generator=g).to(dtype)
    keys, values = (torch.randn(2, 2, 49, 16, generator=g).to(dtype) for _ in range(2))
    valid = torch.ones(2, 49, dtype=torch.bool)
    valid[1, :5] = False  # row 1 is left-padded
    mask = (valid[:, None, :] & (torch.arange(49)[None, :] <= torch.arange(40, 49)[:, None])[None])[:, None]
    out = exact_attention(q, keys, values, mask, 0.25)
    for i in range(9):
        upto = 41 + i
        for b in range(2):
            row = mask[b : b + 1, :, i : i + 1, :upto]
            own = None if bool(row.all()) else row
            alone = sdpa(q[b : b + 1, :, i : i + 1], keys[b : b + 1, :, :upto], values[b : b + 1, :, :upto], own, 0.25)
            assert torch.equal(out[b : b + 1, :, i : i + 1], alone), (i, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_exact_attention_at_batch_one_is_the_ar_steps_call_at_any_key_count(dtype):
    """The default model's head shape (9 heads over 3 KV heads of 64), scores that spread wide,
    a 17-position pass after pasts of every residue of 64 keys and across 512: each query gets
    what an AR step's one call gets. (On AVX512-BF16 without AMX, a query over more keys with
    the extra ones masked rounds otherwise now and then, so grouping queries by key count is
    not exact there; an fp32 row's rounding depends on the thread that computes it.)"""
    g = torch.Generator().manual_seed(1)
    seq = 17
    for past in [*range(40, 104), 500]:
        slots = past + seq
        q = (2 * torch.randn(1, 9, seq, 64, generator=g)).to(dtype)
        keys, values = ((2 * torch.randn(1, 3, slots, 64, generator=g)).to(dtype) for _ in range(2))
        mask = (torch.arange(slots)[None, :] <= torch.arange(past, slots)[:, None])[None, None]
        out = exact_attention(q, keys, values, mask, 0.125)
        for i in range(seq):
            upto = past + i + 1
            step = sdpa(q[:, :, i : i + 1], keys[:, :, :upto], values[:, :, :upto], None, 0.125)
            assert torch.equal(out[:, :, i : i + 1], step), (past, i)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_exact_attention_over_a_tree_gives_each_node_its_paths_call_and_leaves_the_keys_as_they_came(dtype):
    """A token tree's pass (`masks.tree_mask`) in a cache's buffer: each node's output is, bit for
    bit, one query's call over the past slots then its path's own (root first, itself last), as
    an AR step over that path makes it; the keys and values it was handed (the cache's slots,
    written over while the nodes run depth first) hold the pass's own in node order after it,
    and the buffer past them is untouched."""
    g = torch.Generator().manual_seed(3)
    past, parents = 45, torch.tensor([[-1, 0, 0, 1, 1, 2, 3, 0, 6, 5]])  # siblings at every depth, a deep branch
    seq = parents.shape[1]
    q = (2 * torch.randn(1, 9, seq, 64, generator=g)).to(dtype)
    buf_k, buf_v = ((2 * torch.randn(1, 3, past + seq + 7, 64, generator=g)).to(dtype) for _ in range(2))
    before_k, before_v = buf_k.clone(), buf_v.clone()
    mask = tree_mask(torch.ones(1, past, dtype=torch.bool), parents)
    out = exact_attention(q, buf_k[:, :, : past + seq], buf_v[:, :, : past + seq], mask, 0.125)
    assert torch.equal(buf_k, before_k) and torch.equal(buf_v, before_v)
    for node in range(seq):
        path, at = [], node
        while at >= 0:
            path.insert(0, at)
            at = int(parents[0, at])
        reads = [*range(past), *(past + n for n in path)]
        alone = sdpa(q[:, :, node : node + 1], before_k[:, :, reads], before_v[:, :, reads], None, 0.125)
        assert torch.equal(out[:, :, node : node + 1], alone), node


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("width", [1, 5, 17, 18])
def test_a_few_queries_folded_are_grouped_query_attention(padded, width):
    """`sdpa`'s folded call (query heads folded onto their KV group, the mask repeated for each)
    computes grouped-query attention: 9 heads over 3 KV heads, one query to a block and the
    token before it (and a wider pass, not folded), with and without a causal padding mask,
    fp32."""
    g = torch.Generator().manual_seed(2)
    q, keys, values = (
        torch.randn(2, 9, width, 64, generator=g),
        torch.randn(2, 3, 30 + width, 64, generator=g),
        torch.randn(2, 3, 30 + width, 64, generator=g),
    )
    mask = torch.ones(width, 30 + width, dtype=torch.bool).tril(30).expand(2, 1, width, 30 + width).clone()
    mask[1, ..., :7] = not padded
    mask = mask if padded or width > 1 else None
    grouped = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=0.125, enable_gqa=True)
    assert torch.allclose(sdpa(q, keys, values, mask, 0.125), grouped, atol=1e-6)


def test_in_an_exact_pass_a_linear_gives_each_row_what_a_one_row_pass_gives_it():
    """bf16 over 1536 inputs (the default model's MLP down projection), where a CPU's matmul of
    several rows may sum a row otherwise than a one-row matmul (AVX512-BF16 without AMX does):
    in an exact pass (`RowWise`) every row of a 2- to 17-row pass is, bit for bit, what a
    one-row pass (an AR step, `linear` outside an exact pass) gives it."""
    g = torch.Generator().manual_seed(0)
    for bias in (False, True, False, True):
        module = torch.nn.Linear(1536, 576, bias=bias).to(torch.bfloat16)
        for rows in (2, 9, 17):
            x = (3 * torch.randn(1, rows, 1536, generator=g)).to(torch.bfloat16)
            with torch.no_grad(), RowWise(True):
                wide = linear(module, x)
            with torch.no_grad():
                alone = torch.cat([linear(module, x[:, i : i + 1]) for i in range(rows)], 1)
            assert torch.equal(wide, alone), (bias, rows)


def test_a_row_floor_is_measured_per_shape_and_a_pass_below_it_is_padded():
    """`row_floor` is what this machine's kernels give (1, 2, 4 or none), measured once per
    shape; `rows_apart_eager` computes fewer rows than the floor inside a padded call, and
    wider ones as one call: either way each row is what it gets in any other pass."""
    from twotower.backbones.base import FLOOR_OF, row_floor, rows_apart_eager

    w = (torch.randn(576, 1536) / 40).to(torch.bfloat16)
    floor = row_floor(w, None)
    assert floor in (1, 2, 4, None) and any(v == floor for v in FLOOR_OF.values())
    x = (3 * torch.randn(17, 1536)).to(torch.bfloat16)
    together = rows_apart_eager(x, w, None)
    assert all(torch.equal(rows_apart_eager(x[i : i + 1], w, None), together[i : i + 1]) for i in range(17))


@pytest.mark.parametrize("weights", ["dense", "int8"])
def test_greedy_verify_equals_ar_in_bf16_at_batch_one(weights):
    """With drafts rejected now and then, over 100-token replies, bf16 verify output is AR's
    token for token (on quantised weights too: its passes stay within the rows the quantised
    weights serve)."""
    model = tiny_two_tower()
    perturb_trained(model)
    model = model.to(torch.bfloat16).quantize(weights)
    for prompt in PROMPTS:
        ar = generate_ar(model, [prompt], max_new_tokens=100)
        for draft in ("denoiser", "lookup", "auto"):
            result = generate_verify(model, [prompt], max_new_tokens=100, draft=draft)
            assert result.tokens == ar.tokens, draft
            assert result.details["drafted"] > 0


def test_a_cycle_without_drafts_leaves_the_cache_as_an_ar_step_does(monkeypatch):
    """Unpadded prompts, one row stopping early at its EOS: verify cycles without drafts must
    give every pass the cache an AR step gives it (the finished row's pad token kept), or the
    next passes read a mask with a hole, which the attention kernels round otherwise in bf16
    (the real backbone's test: int4 verify at batch 8), and the other rows drift from AR."""
    model = tiny_two_tower()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16], [20, 21, 22, 23, 24, 25], [30, 31, 32, 33, 34, 35]]
    free = generate_ar(model, prompts, max_new_tokens=40)
    first, others = free.tokens[0], free.tokens[1:]
    stop = next(i for i, t in enumerate(first) if i >= 2 and t not in first[:i] and all(t not in r[: i + 8] for r in others))
    seen, extend = [], model.context_extend

    def recording(cache, tokens, **kwargs):
        seen.append((cache.valid.clone(), cache.next_pos.clone()))
        return extend(cache, tokens, **kwargs)

    monkeypatch.setattr(model, "context_extend", recording)
    ar = generate_ar(model, prompts, max_new_tokens=40, eos_token_id=first[stop])  # row 0 stops there
    assert len(ar.tokens[0]) == stop + 1 and min(len(row) for row in ar.tokens[1:]) > stop + 8
    ar_seen, seen[:] = list(seen), []
    verify = generate_verify(model, prompts, max_new_tokens=40, eos_token_id=first[stop], draft="ar")
    assert verify.tokens == ar.tokens
    assert len(seen) == len(ar_seen)
    for (valid, pos), (ar_valid, ar_pos) in zip(seen, ar_seen):
        assert torch.equal(valid, ar_valid) and torch.equal(pos, ar_pos)


def test_lookup_drafts_commit_several_tokens_per_context_pass():
    model = _model()
    free = generate_ar(model, [PROMPTS[2]], max_new_tokens=48)
    result = generate_verify(model, [PROMPTS[2]], max_new_tokens=48, draft="lookup")
    assert result.tokens == free.tokens
    # the tiny random model loops, so copies from its own history are accepted
    assert result.details["draft_sources"]["lookup"] > 0
    assert result.context_passes < 1 + len(result.tokens[0])


def test_greedy_verify_stops_at_eos_mid_draft(denoiser_kind):
    model = _model(denoiser_kind, trained=True)
    free = generate_ar(model, PROMPTS, max_new_tokens=24).tokens
    eos = free[0][5]
    expected = generate_ar(model, PROMPTS, max_new_tokens=24, eos_token_id=eos).tokens
    assert len(expected[0]) <= 6 and expected[0][-1] == eos
    for draft in DRAFTS:
        assert generate_verify(model, PROMPTS, max_new_tokens=24, eos_token_id=eos, draft=draft).tokens == expected


def test_verify_on_a_one_token_prompt_and_tight_budgets():
    model = _model(trained=True)
    for budget in (1, 2, 9):
        assert (
            generate_verify(model, [[40], [5, 6]], max_new_tokens=budget).tokens
            == generate_ar(model, [[40], [5, 6]], max_new_tokens=budget).tokens
        )


def test_verify_block_size_caps_the_draft_and_is_checked():
    model = _model(trained=True)
    small = generate_verify(model, PROMPTS, max_new_tokens=20, block_size=2, draft="denoiser")
    assert small.tokens == generate_ar(model, PROMPTS, max_new_tokens=20).tokens
    assert small.details["accepted_per_cycle"] <= 2
    with pytest.raises(TwoTowerError, match="larger than the trained block size"):
        generate_verify(model, PROMPTS, max_new_tokens=4, block_size=9)


def test_verify_refuses_bad_options():
    model = _model()
    with pytest.raises(TwoTowerError, match="draft must be one of"):
        generate_verify(model, PROMPTS, draft="oracle")
    with pytest.raises(TwoTowerError, match="draft_steps"):
        generate_verify(model, PROMPTS, draft_steps=0)
    same = _model(layout="same-position")
    with pytest.raises(TwoTowerError, match="shifted layout"):
        generate_verify(same, PROMPTS, draft="denoiser")
    # auto falls back to lookup / AR steps in the same-position layout and stays lossless
    assert generate_verify(same, PROMPTS, max_new_tokens=12).tokens == generate_ar(same, PROMPTS, max_new_tokens=12).tokens


# --- the cache after a rejection -----------------------------------------------------------


def _row_kv(cache, row):
    """Per layer, the K,V of the row's valid slots, in order, or its Mamba (conv, SSM) state."""
    keep = cache.valid[row]
    return [
        (e[0][row][:, keep], e[1][row][:, keep]) if isinstance(e, tuple) else (e.conv[row], e.ssm[row])
        for e in cache.kv
        if e is not None
    ]


@pytest.mark.parametrize("family", ["llama", "nemotron_h"])
@pytest.mark.parametrize("ragged", [False, True])
def test_cache_after_rejection_equals_ar_prefill_of_the_committed_tokens(ragged, family):
    """One verify cycle by hand: read [pending, drafts], accept a prefix per row, drop the
    rest. Each row's cache must then equal a plain prefill of its committed tokens (hybrid:
    the Mamba states too, recomputed from the pass's tail), and the next context pass must
    give the AR logits."""
    model = _model(family=family)
    prompts = [PROMPTS[0], PROMPTS[2]]
    ar = generate_ar(model, prompts, max_new_tokens=6).tokens
    # drafts: row 0 right for 3 tokens, then wrong; row 1 wrong at once (or right for 3 too)
    wrong = lambda t: (t + 1) % VOCAB or 3
    drafts = [[*ar[0][:3], wrong(ar[0][3]), ar[0][4]], [wrong(ar[1][0]), *ar[1][1:5]]]
    if not ragged:
        drafts[1] = [*ar[1][:3], wrong(ar[1][3]), ar[1][4]]
    ids, mask = left_pad(prompts, pad_id=0)
    cache, _ = model.context_prefill(ids[:, :-1], mask[:, :-1], logits=None)
    pending = ids[:, -1]
    draft_ids = torch.tensor(drafts)
    logits = model.context_extend(cache, torch.cat([pending[:, None], draft_ids], dim=1), logits="all")
    settings = GenerationSettings(temperature=0.0)
    accepted, following, _ = accept_drafts(logits, draft_ids, torch.tensor([5, 5]), Sampling.of(settings, 2), {})
    assert accepted.tolist() == ([3, 0] if ragged else [3, 3])
    assert following.tolist() == [ar[0][3], ar[1][accepted[1]]]
    cache.keep_new(6, 1 + accepted)

    for row, prompt in enumerate(prompts):
        committed = prompt + ar[row][: int(accepted[row])]  # all but the pending token
        ref_ids = torch.tensor([committed])
        ref, _ = model.context_prefill(ref_ids, torch.ones_like(ref_ids), logits=None)
        assert int(cache.next_pos[row]) == len(committed)
        for (k, v), (rk, rv) in zip(_row_kv(cache, row), _row_kv(ref, 0)):
            torch.testing.assert_close(k, rk, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v, rv, rtol=1e-5, atol=1e-5)

    # the next pass (reading the pending token) continues exactly like AR
    nxt = model.context_extend(cache, following[:, None], logits="last")
    for row in range(len(prompts)):
        position = int(accepted[row]) + 1
        assert int(nxt[row].argmax()) == ar[row][position]


# --- sampling: the output distribution is the AR one ----------------------------------------


def _exact_distribution_of_tokens_2_and_3(model, prompt, temperature):
    """The AR model's exact joint distribution of the 2nd and 3rd sampled tokens (the first comes from
    the prefill in every mode; verify drafts from the 2nd on): (V, V) matrix."""

    def next_distribution(rows):
        ids = torch.tensor(rows)
        _, logits = model.context_prefill(ids, torch.ones_like(ids), logits="last")
        return target_probs(logits.float(), temperature, 1.0)

    vocab = torch.arange(VOCAB).tolist()
    p1 = next_distribution([prompt])[0]  # (V,)
    p2 = next_distribution([[*prompt, a] for a in vocab])  # (V, V)
    p3 = next_distribution([[*prompt, a, b] for a in vocab for b in vocab]).view(VOCAB, VOCAB, VOCAB)
    return torch.einsum("a,ab,abc->bc", p1, p2, p3)


def _peaked_model():
    """Tiny model whose next-token distribution is concentrated enough for a sample-based test (the
    output norm is scaled so logits span several nats), with a denoiser perturbed just enough
    that about half of its drafts are accepted."""
    model = _model()
    perturb_trained(model, scale=0.02)
    with torch.no_grad():
        model.context_tower.model.norm.weight.mul_(6.0)
    return model


def _lookup_prompt(model):
    """A prompt [c, t, 30, 31, c] whose prompt-lookup draft (t, 30) is neither sure nor hopeless:
    t is the token whose AR probability after the prompt is closest to 1/2."""
    candidates = torch.tensor([[22, t, 30, 31, 22] for t in range(3, VOCAB)])
    _, logits = model.context_prefill(candidates, torch.ones_like(candidates), logits="last")
    p_t = logits.softmax(-1).gather(1, candidates[:, 1:2])[:, 0]
    return candidates[int((p_t - 0.5).abs().argmin())].tolist()


def _tv_tolerance(distribution: torch.Tensor, n: int) -> float:
    """E[TV(empirical of n samples, distribution)] <= 1/2 sum_i sqrt(distribution_i / n); TV moves by at most 1/n
    per sample, so by McDiarmid it exceeds that bound by 0.03 with probability
    < exp(-2 n 0.03^2) (< 1e-3 for n >= 4000)."""
    return 0.5 * distribution.sqrt().sum().item() / math.sqrt(n) + 0.03


@pytest.mark.parametrize("draft", ["denoiser", "lookup"])
def test_sampled_verify_follows_the_ar_distribution(draft):
    """Sample N replies of 4 tokens with verify mode (each row of one big batch is an
    independent sample; block size 2, so after the first token (the prefill's) the next cycle
    drafts token 2 and checks it, with token 3 from the context tower) and compare the joint
    distribution of tokens 2 and 3 with the exact AR distribution. The denoiser's drafts
    are rejected about half the time and its distribution is further from AR's than the tolerance, so
    accepting blindly or sampling the wrong correction would fail."""
    model = _peaked_model()
    prompt = PROMPTS[2] if draft == "denoiser" else [22, 30, 31, 22, 30, 31, 22]
    temperature, n = 1.0, 4000
    distribution = _exact_distribution_of_tokens_2_and_3(model, prompt, temperature)
    result = generate_verify(
        model,
        [prompt] * n,
        max_new_tokens=4,
        temperature=temperature,
        seed=0,
        draft=draft,
        block_size=2,
        threshold=0.05,
    )
    counts = torch.zeros(VOCAB, VOCAB)
    for row in result.tokens:
        counts[row[1], row[2]] += 1
    tv = 0.5 * (counts / n - distribution).abs().sum().item()
    tolerance = _tv_tolerance(distribution, n)
    assert tv < tolerance, (tv, tolerance)
    assert result.details["draft_sources"][draft] > n // 10
    if draft == "denoiser":
        assert 0.2 < result.details["draft_acceptance"] < 0.8
        # the denoiser's distribution for token 2 after the likeliest first token vs AR's
        first = int(distribution.sum(1).argmax())
        ids = torch.tensor([prompt])
        cache, logits = model.context_prefill(ids, torch.ones_like(ids), logits="last")
        x1 = int(target_probs(logits, temperature, 1.0)[0].argmax())
        # the draft block: [anchor, x1 (the pending token), ...] over the view without the anchor
        den = model.denoise(cache.view(drop_last=True), torch.tensor([[prompt[-1], x1]]), cache.next_pos - 1, torch.ones(1))
        q2 = target_probs(den[0, 1].float(), temperature, 1.0)
        after = torch.tensor([[*prompt, x1]])
        _, ar_logits = model.context_prefill(after, torch.ones_like(after), logits="last")
        p2 = target_probs(ar_logits.float(), temperature, 1.0)[0]
        assert 0.5 * (q2 - p2).abs().sum().item() > tolerance, first


@pytest.mark.parametrize("one_hot", [False, True], ids=["draft-distribution", "one-hot"])
@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.8)])
def test_accept_rule_keeps_the_target_distribution(one_hot, temperature, top_p):
    """The accept rule alone, on fixed distributions: drafts sampled from q (or fixed tokens,
    as prompt lookup proposes), targets p = softmax(top-p(logits / T)), every row with its own
    seed. The first output token must follow p1; the second, in rows whose first draft was
    accepted, p2."""
    g = torch.Generator().manual_seed(0)
    vocab, n = 8, 20000
    logits = torch.randn(1, 3, vocab, generator=g).mul(2).expand(n, -1, -1)
    p = target_probs(logits[0], temperature, top_p)  # (3, V)
    if one_hot:
        drafts = torch.tensor([[int(p[0].argmax()), int(p[1].argsort()[-2])]]).expand(n, -1)
    else:
        q_distribution = torch.randn(2, vocab, generator=g).mul(2).softmax(-1)
        drafts = torch.multinomial(q_distribution, n, replacement=True, generator=g).T  # (n, 2)
        assert 0.5 * (q_distribution[0] - p[0]).abs().sum() > 0.1  # a draft distribution unlike the target
    settings = GenerationSettings(temperature=temperature, top_p=top_p, seed=0)
    starts = dict.fromkeys(range(n), 0)
    accepted, following, _ = accept_drafts(logits, drafts, torch.full((n,), 2), Sampling.of(settings, n), starts)
    first = torch.where(accepted >= 1, drafts[:, 0], following)
    second = torch.where(accepted >= 2, drafts[:, 1], following)[accepted >= 1]
    for distribution, sample in ((p[0], first), (p[1], second)):
        empirical = torch.bincount(sample, minlength=vocab).float() / len(sample)
        tv = 0.5 * (empirical - distribution).abs().sum().item()
        assert tv < _tv_tolerance(distribution, len(sample)), (tv, len(sample))
    assert 0 < int((accepted == 0).sum()) < n  # both branches of the rule were taken


def test_sampled_verify_is_seeded():
    model = _model(trained=True)
    first = generate_verify(model, PROMPTS, max_new_tokens=12, temperature=0.9, top_p=0.9, seed=3)
    again = generate_verify(model, PROMPTS, max_new_tokens=12, temperature=0.9, top_p=0.9, seed=3)
    other = generate_verify(model, PROMPTS, max_new_tokens=12, temperature=0.9, top_p=0.9, seed=4)
    assert first.tokens == again.tokens != other.tokens


# --- the pieces --------------------------------------------------------------------------------


def test_lookup_draft_copies_what_followed_the_latest_match():
    history = [1, 2, 3, 9, 9, 1, 2, 3, 7, 5, 1, 2, 3]
    assert lookup_draft(history, 3) == [7, 5, 1]  # latest earlier "1 2 3" is followed by 7 5 1
    assert lookup_draft(history, 1) == [7]
    assert lookup_draft([4, 5, 6, 7], 4) == []  # nothing repeats
    assert lookup_draft([4, 5, 4], 4, ngram=3) == [5, 4]  # falls back to a 1-gram match
    assert lookup_draft([4], 4) == []


@pytest.mark.parametrize("ngram", [1, 2, 3, 4])
def test_token_history_finds_what_the_scan_finds_as_it_grows(ngram):
    """The indexed lookup equals the plain scan after every extension (by 1 to 5 tokens, as
    cycles commit them), over histories with many repeats and with none."""
    gen = torch.Generator().manual_seed(ngram)
    for vocab in (3, 12, 10_000):
        tokens = torch.randint(vocab, (4,), generator=gen).tolist()
        history = TokenHistory(tokens, ngram)
        for _ in range(120):
            for max_len in (1, 4, 9):
                assert history.match(max_len) == lookup_match(tokens, max_len, ngram)
            new = torch.randint(vocab, (int(torch.randint(1, 6, (1,), generator=gen)),), generator=gen).tolist()
            history.extend(new)
            tokens += new
        assert history.tokens == tokens
    assert TokenHistory([7], ngram).match(4) == ([], 0)


def test_draft_policy_prefers_the_faster_source_and_probes_the_others_less_and_less():
    policy = DraftPolicy(batch=2, sources=("denoiser", "lookup", "ar"), probe_every=4)
    speed = {"denoiser": 0.3, "lookup": 0.2, "ar": 0.1}  # seconds per one-token cycle
    picks = []
    for _ in range(100):
        source = policy.choose(0)
        picks.append(source)
        policy.record(0, source, tokens=1, cost=speed[source])
    assert picks[:3] == ["denoiser", "lookup", "ar"]  # every source once
    probes = [i for i, source in enumerate(picks[3:]) if source != "ar"]
    assert 4 <= len(probes) <= 12  # waits double: 4, 8, 16, 32 ... cycles
    assert {picks[3 + i] for i in probes} == {"denoiser", "lookup"}
    for source in ("denoiser", "lookup"):  # each source's probes get rarer
        at = [i for i, w in enumerate(picks) if w == source]
        gaps = [b - a for a, b in itertools.pairwise(at)]
        assert gaps == sorted(gaps) and gaps[-1] > gaps[0], (source, gaps)
    # no lookup match: lookup is not a candidate
    assert all(policy.choose(0, lookup_available=False) != "lookup" for _ in range(4))
    # the denoiser starts to be accepted: the next probe finds it faster and it is used from then on
    source = policy.choose(0)
    while source != "denoiser":
        policy.record(0, source, tokens=1, cost=speed[source])
        source = policy.choose(0)
    policy.record(0, "denoiser", tokens=8, cost=0.3)
    later = []
    for _ in range(10):
        source = policy.choose(0)
        later.append(source)
        policy.record(0, source, tokens=8 if source == "denoiser" else 1, cost=speed[source])
    assert later.count("denoiser") >= 8, later
    # row 1 is independent
    assert policy.choose(1) == "denoiser" and policy.rates[1]["ar"] is None


def test_a_policy_with_a_prior_starts_on_the_best_source_it_knows_and_still_probes():
    prior = {"ar": (10.0, None, 4), "denoiser": (4.0, 0.9, 2)}  # lookup never measured
    policy = DraftPolicy(batch=1, sources=("denoiser", "lookup", "ar"), probe_every=4, prior=prior)
    doubtful = DraftPolicy(batch=1, sources=("denoiser", "ar"), prior={**prior, "denoiser": (4.0, 0.05, 2)})
    # from the prior's acceptance: drafts that were accepted are long at once, the others short
    fresh = DraftPolicy(1, ("denoiser",)).draft_length(0, "denoiser", 16)
    assert policy.draft_length(0, "denoiser", room=16) > fresh > doubtful.draft_length(0, "denoiser", room=16)
    picks = [policy.choose(0, lookup_available=False) for _ in range(1)]
    assert picks == ["ar"]  # no first try of every source: the prior's best
    assert policy.choose(0, lookup_available=True) == "lookup"  # an unmeasured source is still tried
    for _ in range(6):
        source = policy.choose(0, lookup_available=False)
        picks.append(source)
        policy.record(0, source, tokens=1, cost=0.1 if source == "ar" else 0.3)
    assert "denoiser" in picks  # probed after probe_every cycles
    waited = DraftPolicy(batch=1, sources=("denoiser", "ar"), probe_every=4, prior={**prior, "denoiser": (4.0, 0.9, 64)})
    assert waited.wait[0] == {"denoiser": 64, "ar": 4}  # a source that kept losing is probed as rarely as it ended


def test_unseeded_verify_runs_leave_their_measurements_to_the_next_and_seeded_runs_neither_read_nor_write():
    model = tiny_two_tower()
    perturb_trained(model)
    ids, mask = left_pad(PROMPTS, 0)
    seeded = dict(max_new_tokens=12, temperature=0.8, seed=3)
    memory = DraftMemory()  # kept by whoever serves the requests, not by the model
    first = generate_verify(model, ids, mask, memory=memory, **seeded)
    assert not memory.seen and not memory.passes
    generate_verify(model, ids[:1], mask[:1], max_new_tokens=12, memory=memory)
    (key,) = [k for k in memory.seen if k[0] == "rows"]
    assert (
        key[-1] == 1 and set(memory.seen[key]) <= {"denoiser", "lookup", "ar", *map(lookup_kind, (1, 2, 3))} and memory.seen[key]
    )
    again = generate_verify(model, ids[:1], mask[:1], max_new_tokens=12, memory=memory)  # greedy: the same tokens
    assert again.tokens == generate_ar(model, ids[:1], mask[:1], max_new_tokens=12).tokens
    assert generate_verify(model, ids, mask, memory=memory, **seeded).tokens == first.tokens


def test_the_memory_keeps_token_trees_apart_from_chains():
    """A tree's drafts are accepted at another rate than a chain's: what one measured must not
    set the other's policy."""
    model = tiny_two_tower()
    perturb_trained(model)
    ids, mask = left_pad(PROMPTS[:1], 0)
    memory = DraftMemory()
    chain = generate_verify(model, ids, mask, max_new_tokens=12, memory=memory)
    tree = generate_verify(model, ids, mask, max_new_tokens=12, memory=memory, tree_nodes=4)
    assert chain.tokens == tree.tokens
    keys = [k for k in memory.seen if k[0] == "rows"]
    assert len(keys) == 2 and sorted(k[-2] for k in keys) == [0, 4] and {k[-1] for k in keys} == {1}
    generate_verify(model, *left_pad(PROMPTS[:2], 0), max_new_tokens=12, memory=memory, tree_nodes=4)  # batch 2: chains
    assert {k[-2] for k in memory.seen if k[0] == "rows" and k[-1] > 1} == {0}


def test_verify_without_a_memory_starts_from_a_fresh_one_and_leaves_nothing_on_the_model():
    from twotower.generate.common import drain, drive, start_run
    from twotower.generate.verify import VerifyDecoder

    model = tiny_two_tower()
    perturb_trained(model)
    memories = []
    for _ in range(2):
        decoder = VerifyDecoder(model, start_run(model, PROMPTS[:1], None, "verify", {"max_new_tokens": 12}))
        drain(drive(decoder))
        memories.append(decoder.memory)
    assert memories[0] is not memories[1] and all(m.seen for m in memories)
    assert not hasattr(model, "draft_memory")


def test_the_engine_keeps_one_draft_memory_for_its_verify_requests():
    from conftest import tiny_tokenizer

    from twotower.serve.engine import Engine, Job

    model = tiny_two_tower()
    perturb_trained(model)
    engine = Engine(model, tiny_tokenizer())
    for prompt in PROMPTS[:2]:
        job = engine.submit(Job(prompt, "verify", {"max_new_tokens": 8}))
        while engine.step():
            pass
        events = [job.events.get_nowait() for _ in range(job.events.qsize())]
        assert events[-1][0] == "done"
    (key,) = [k for k in engine.draft_memory.seen if k[0] == "rows"]
    assert engine.draft_memory.seen[key] and engine.draft_memory.passes
    assert not hasattr(model, "draft_memory")


def test_a_draft_is_as_long_as_pays_for_what_a_wider_pass_costs():
    dear = lambda width, denoiser: 1.0 if width <= 2 else 2.2  # int4 weights: 3+ positions take the dense ones
    cheap = lambda width, denoiser: 1.0 + (width - 1) / 100  # wide passes nearly free
    policies = {
        name: DraftPolicy(batch=1, sources=("denoiser", "lookup", "ar"), cost=cost)
        for name, cost in (("dear", dear), ("cheap", cheap))
    }
    for policy in policies.values():
        assert policy.draft_length(0, "ar", room=16) == 0
        assert policy.draft_length(0, "lookup", room=0) == 0
    assert policies["dear"].draft_length(0, "lookup", room=16) == 1  # acceptance unknown (1/2): not worth 2.2x
    assert policies["cheap"].draft_length(0, "lookup", room=16) > 4
    for policy in policies.values():
        for _ in range(10):
            policy.record(0, "lookup", tokens=9, cost=1.0, accepted=8, drafted=8)
        assert policy.draft_length(0, "lookup", room=16) == 16  # accepted every time: as long as there is room
        assert policy.draft_length(0, "lookup", room=5) == 5
        for _ in range(10):
            policy.record(0, "lookup", tokens=1, cost=1.0, accepted=0, drafted=4)
        assert policy.acceptance(0, "lookup") < 0.5  # a recent rejection counts more than an old acceptance
    assert policies["dear"].draft_length(0, "lookup", room=16) == 1  # rejected: one token, the cheapest probe
    assert policies["cheap"].draft_length(0, "lookup", room=16) < 8


def test_a_denoiser_draft_is_verified_as_far_as_its_confidence_pays():
    """confident_length: the drafts the denoiser is sure of are verified, the run after an
    unlikely one is not; a dearer wide pass keeps fewer; drafts that are rejected more often
    than their confidence says make the policy trust the same confidences less."""
    cheap = lambda width, denoiser: 1.0 + (width - 1) / 100 + 0.2 * denoiser
    dear = lambda width, denoiser: (1.0 if width <= 2 else 2.2) + 0.2 * denoiser
    policy = DraftPolicy(batch=2, sources=("denoiser", "ar"), cost=cheap, skip_unpaid=True)
    assert policy.confident_length(0, [0.95] * 7) == 7
    assert policy.confident_length(0, [0.9, 0.9, 0.01, 0.9, 0.9]) == 2  # what follows an unlikely token is not verified
    assert policy.confident_length(0, [0.001, 0.9]) == 0  # outside a probe: an AR step's width
    assert policy.confident_length(0, [0.001, 0.9], least=1) == 1
    assert DraftPolicy(1, ("denoiser", "ar"), cost=dear).confident_length(0, [0.5] * 7) == 1  # 3+ positions: 2x dearer
    sure = [0.9] * 7
    before = policy.confident_length(0, [0.6] * 7)
    for _ in range(10):
        policy.record_confidence(0, sure, accepted=0)  # confident drafts, rejected at once
    assert policy.calibration(0) < 0.5 < policy.calibration(1) == 1.0
    assert policy.confident_length(0, [0.6] * 7) < before == policy.confident_length(1, [0.6] * 7)
    for _ in range(10):
        policy.record_confidence(0, sure, accepted=7)
    assert policy.calibration(0) > 0.9
    # a token tree's nodes, parents first, by their chance of being accepted: the likely ones pay
    chances = [0.9, 0.5, 0.3, 0.05, 0.01]
    assert policy.confident_nodes(1, chances) == 4
    assert DraftPolicy(1, ("denoiser", "ar"), cost=dear).confident_nodes(0, chances) == 1


def test_a_source_whose_drafts_would_lose_drafts_nothing_except_when_probed():
    """skip_unpaid (draft="auto"): a draft's expected tokens are weighed against a plain AR
    step's too, so a source that is rarely accepted, where a wider pass is dear, is not used even
    when its measured rate is the best; it is still probed (drafting at least one token, or its
    acceptance could never be measured again), and once its drafts are accepted it is back in
    use. A source the caller forces always drafts."""
    dear = lambda width, denoiser: 1.0 if width == 1 else 1.8 + float(denoiser)
    prior = {"lookup": (10.0, 0.1, 4), "ar": (9.0, None, 4)}  # lookup was the faster, but is rarely accepted
    policy = DraftPolicy(batch=1, sources=("lookup", "ar"), probe_every=4, prior=prior, cost=dear, skip_unpaid=True)
    forced = DraftPolicy(batch=1, sources=("lookup", "ar"), probe_every=4, prior=prior, cost=dear)
    assert not policy.pays(0, "lookup", room=8) and policy.pays(0, "ar", room=8)
    assert policy.choose(0, room=8) == "ar" and forced.choose(0, room=8) == "lookup"
    assert policy.draft_length(0, "lookup", room=8) == 0 and forced.draft_length(0, "lookup", room=8) >= 1
    picks = []
    for _ in range(12):
        source = policy.choose(0, room=8)
        picks.append(source)
        if source == "lookup":  # a probe, or (once the probes' drafts were accepted) a source that pays
            assert policy.probing[0] or policy.pays(0, "lookup", room=8)
            assert policy.draft_length(0, "lookup", room=8) >= 1
            policy.record(0, source, tokens=2, cost=1.8, accepted=1, drafted=1)  # its draft is accepted
        else:
            policy.record(0, source, tokens=1, cost=1.0)
    assert "lookup" in picks  # probed within its wait
    for _ in range(3):
        policy.record(0, "lookup", tokens=5, cost=1.8, accepted=4, drafted=4)
    assert policy.pays(0, "lookup", room=8) and policy.choose(0, room=8) == "lookup" and not policy.probing[0]
    cheap = DraftPolicy(batch=1, sources=("lookup", "ar"), prior=prior, cost=lambda w, d: 1.0 + (w - 1) / 100, skip_unpaid=True)
    assert cheap.choose(0, room=8) == "lookup" and cheap.draft_length(0, "lookup", room=8) >= 1  # nearly free: pays


def test_lookup_drafts_keep_their_acceptance_by_the_length_of_their_match():
    """A 3-token match is accepted far more often than a 1-token one: each kind keeps its own
    acceptance, so where a wider pass is dear the policy drafts after long matches only, and a
    finished row leaves the kinds to the memory, from which the next request starts."""
    assert lookup_match([4, 5, 6, 9, 4, 5, 6], 2) == ([9, 4], 3)
    assert lookup_match([4, 5, 7, 5], 3) == ([7, 5], 1) and lookup_match([4, 5], 3) == ([], 0)
    dear = lambda width, denoiser: 1.0 if width == 1 else 1.6
    policy = DraftPolicy(batch=1, sources=("lookup", "ar"), cost=dear, skip_unpaid=True)
    for _ in range(6):
        policy.record(0, "lookup", tokens=4, cost=1.6, accepted=3, drafted=3, kind=lookup_kind(3))
        policy.record(0, "lookup", tokens=1, cost=1.6, accepted=0, drafted=3, kind=lookup_kind(1))
    policy.record(0, "ar", tokens=1, cost=1.0)
    assert policy.acceptance(0, "lookup3") > 0.8 > 0.25 > policy.acceptance(0, "lookup1")
    assert policy.pays(0, "lookup", 8, "lookup3") and not policy.pays(0, "lookup", 8, "lookup1")
    assert policy.choose(0, True, 8, "lookup3") == "lookup" and policy.draft_length(0, "lookup", 8, kind="lookup3") >= 3
    assert policy.choose(0, True, 8, "lookup1") == "ar"
    memory = DraftMemory()
    memory.add("key", policy.rates[0], policy.measured_acceptance(0), policy.wait[0])
    prior = memory.prior("key")
    assert prior["lookup3"][0] is None and prior["lookup3"][1] == policy.acceptance(0, "lookup3")
    fresh = DraftPolicy(batch=1, sources=("lookup", "ar"), cost=dear, skip_unpaid=True, prior=prior)
    assert fresh.pays(0, "lookup", 8, "lookup3") and not fresh.pays(0, "lookup", 8, "lookup1")


def test_rows_that_share_a_pass_share_one_draft_length_that_pays_for_the_batch():
    """One pass serves every row and is as wide as the longest draft: the batch's draft length
    weighs every row's expected tokens against the cost of the pass, so one row's long draft
    is cut when it would make the other rows' pass dearer than it gains, and a batch whose drafts
    are rarely accepted takes a plain AR cycle (a probe of the batch gate still drafts)."""
    from twotower.generate.verify import Drafts, batch_width, cap_drafts

    def batch(alpha: float, cost):
        policy = DraftPolicy(batch=4, sources=("lookup", "ar"), cost=cost, skip_unpaid=True)
        for _ in range(8):
            policy.record(0, "lookup", 1, 1.0, accepted=round(6 * alpha), drafted=6, kind="lookup3")
        drafts = Drafts([[7] * 6, [], [], []], {0: "lookup", 1: "ar", 2: "ar", 3: "ar"}, kinds={0: "lookup3"})
        return policy, drafts

    steep = lambda width, denoiser: 1.0 if width <= 3 else 2.0  # past 3 positions the pass turns dear
    flat = lambda width, denoiser: 1.0 + 0.01 * (width - 1)
    policy, drafts = batch(1.0, flat)
    assert batch_width(drafts, policy) == 6  # accepted, nearly free: all of it
    policy, drafts = batch(1.0, steep)
    assert batch_width(drafts, policy) == 2  # cut where the pass turns dear
    policy, drafts = batch(0.0, lambda width, denoiser: 1.0 + 0.2 * (width - 1))
    assert batch_width(drafts, policy) == 0  # rarely accepted: an AR cycle
    assert batch_width(drafts, policy, least=1) == 1  # the gate's probe
    assert cap_drafts(drafts, 0).source[0] == "ar" and drafts.tokens[0] == []


def test_the_draft_memory_measures_what_each_pass_width_costs():
    memory = DraftMemory()
    assert memory.cycle_cost(1) is static_cost  # nothing measured yet: counted in passes
    assert static_cost(17, False) == 2.0 and static_cost(1, True) == 2.0
    memory.add_cycle(1, 1, 0.020, None)
    memory.add_cycle(1, 9, 0.040, None)
    cost = memory.cycle_cost(1)
    assert cost(1, False) == 0.020 and cost(9, False) == 0.040
    assert cost(5, False) == pytest.approx(0.030)  # between measured widths: linear
    assert cost(17, False) == 0.040  # past them: flat, so that a wider pass gets tried
    assert cost(1, True) == pytest.approx(0.040)  # a denoiser draft, until measured, as dear as a one-position pass
    memory.add_cycle(1, 1, 0.030, 0.005)
    assert cost(1, False) == pytest.approx(0.7 * 0.020 + 0.3 * 0.030)  # a mean that follows the machine
    assert cost(1, True) == pytest.approx(cost(1, False) + 0.005)
    assert memory.cycle_cost(8) is static_cost  # per batch size, in powers of two
    memory.add_cycle(6, 1, 0.050, None)
    assert memory.cycle_cost(8)(1, False) == 0.050 and memory.cycle_cost(5)(1, False) == 0.050
    assert [batch_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]


def test_accept_rule_greedy_counts_the_matching_prefix():
    logits = torch.full((2, 4, 10), -5.0)
    for pos, tok in enumerate([3, 4, 5, 6]):
        logits[:, pos, tok] = 5.0
    drafts = torch.tensor([[3, 4, 9], [3, 4, 5]])
    settings = GenerationSettings(temperature=0.0)
    accepted, following, _ = accept_drafts(logits, drafts, torch.tensor([3, 2]), Sampling.of(settings, 2), {})
    assert accepted.tolist() == [2, 2]  # row 1: only 2 drafted, both right -> bonus token
    assert following.tolist() == [5, 5]


def test_max_draft_caps_every_cycle_and_keeps_ar_output(monkeypatch):
    """A knob added in one place (VerifyOptions.max_draft) reaches the library, the command
    line and the server: no cycle drafts more than it, and the output stays AR's."""
    model = tiny_two_tower(block_size=8)
    perturb_trained(model)
    prompt = PROMPTS[0]
    ar = generate_ar(model, [prompt], max_new_tokens=40)
    # a policy that verifies every draft it is given (a random model's drafts are not confident)
    monkeypatch.setattr(DraftPolicy, "confident_length", lambda self, row, confidence, least=None: len(confidence))
    options = dict(max_new_tokens=40, draft="denoiser")
    capped = generate_verify(model, [prompt], max_draft=1, **options)
    free = generate_verify(model, [prompt], **options)
    assert capped.tokens == ar.tokens == free.tokens
    assert capped.details["drafted"] <= capped.details["cycles"]
    assert free.details["drafted"] > free.details["cycles"]  # uncapped, some cycles draft more than one
