"""Sampling settings per row: rows with different settings share one run (and one engine
group) and each writes the tokens it writes alone; top-k, min-p, logit_bias, penalties and
logprobs do what they say; bad values are refused naming the field."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import EOS, PROMPTS, perturb_trained, tiny_tokenizer, tiny_two_tower

from twotower.generate import DECODERS, generate, stream
from twotower.generate.common import start_run
from twotower.settings import TwoTowerError

MODES = ("ar", "mock-ar", "diffusion", "verify")
# (prompt, options): greedy, seeded samplers of every kind, a greedy row with sampling knobs that
# greedy ignores, penalties, a bias, and different lengths
ROWS = [
    (PROMPTS[0], dict(max_new_tokens=14)),
    (PROMPTS[1], dict(max_new_tokens=12, temperature=0.7, top_p=0.9, seed=5)),
    (PROMPTS[2], dict(max_new_tokens=14, temperature=1.0, top_k=20, seed=9, frequency_penalty=0.5)),
    (PROMPTS[3], dict(max_new_tokens=9, temperature=0.0, top_p=0.5, presence_penalty=1.0)),
    (PROMPTS[0], dict(max_new_tokens=14, temperature=1.3, min_p=0.05, seed=2, logit_bias={40: 3.0})),
    (PROMPTS[1], dict(max_new_tokens=11, temperature=1.0, seed=5)),
]


@pytest.fixture(scope="module")
def model():
    model = tiny_two_tower(block_size=4)
    perturb_trained(model, scale=0.02)
    return model


def decoder_of(model, mode: str, prompt: list[int], options: dict):
    """One request's decoder after its prefill, as the server's engine starts it."""
    run = start_run(model, [prompt], None, mode, dict(options, eos_token_id=EOS))
    decoder = DECODERS[mode](model, run)
    for _ in decoder.start():
        pass
    return decoder


def run_joined(model, mode: str, rows, join_after: int = 2) -> list[list[int]]:
    """The rows in one group: the first half from the start, the rest joining after
    `join_after` cycles (continuous batching). Returns each row's tokens."""
    half = len(rows) // 2
    group = decoder_of(model, mode, *rows[0])
    for prompt, options in rows[1:half]:
        other = decoder_of(model, mode, prompt, options)
        group.run.join(other.run)
        group.join(other)
    for _ in range(join_after):
        for _ in group.cycle():
            pass
    for prompt, options in rows[half:]:
        other = decoder_of(model, mode, prompt, options)
        group.run.join(other.run)
        group.join(other)
    while not group.run.finished:
        for _ in group.cycle():
            pass
    return group.run.tokens


@pytest.mark.parametrize("mode", MODES)
def test_rows_with_different_sampling_write_what_they_write_alone(model, mode):
    alone = [generate(model, mode, [prompt], eos_token_id=EOS, **options).tokens[0] for prompt, options in ROWS]
    assert run_joined(model, mode, ROWS) == alone
    assert alone[1] != alone[5]  # the same prompt and seed, another temperature: the settings are the row's own


@pytest.mark.parametrize("draft", ["auto", "denoiser", "lookup"])
def test_sampled_verify_is_ar_token_for_token(model, draft):
    """A verify row picks what AR picks at every position (the position's own noise), so its
    seeded reply is AR's, whatever it drafted and whatever rows share its passes."""
    options = dict(max_new_tokens=16, temperature=1.0, seed=11, top_k=30, presence_penalty=0.3)
    ar = generate(model, "ar", PROMPTS, **options)
    verify = generate(model, "verify", PROMPTS, draft=draft, threshold=0.05, **options)
    assert verify.tokens == ar.tokens
    assert verify.details["accepted_drafts"] > 0


def test_a_call_seeds_row_b_with_seed_plus_b(model):
    options = dict(max_new_tokens=10, temperature=1.0)
    batch = generate(model, "ar", PROMPTS, seed=3, **options).tokens
    assert batch[2] == generate(model, "ar", [PROMPTS[2]], seed=5, **options).tokens[0]
    assert generate(model, "ar", [PROMPTS[0]] * 2, seed=3, **options).tokens[0] != batch[1]


def test_the_engine_puts_mixed_sampling_in_one_group(model):
    from twotower.serve.engine import Engine, Job

    engine = Engine(model, tiny_tokenizer(), max_batch=8)
    jobs = [Job(prompt, "verify", dict(options)) for prompt, options in ROWS]
    jobs.append(Job(PROMPTS[0], "verify", {"max_new_tokens": 4, "block_size": 2}))  # another pass shape
    for job in jobs:
        engine.submit(job)
    engine._admit()
    engine._read_prompts()  # the short prompts in one turn
    sizes = sorted(len(group.rows) for group in engine.groups.values())
    assert sizes == [1, len(ROWS)]


def test_greedy_ignores_top_p_top_k_min_p_and_filters_that_keep_one_token_are_greedy(model):
    greedy = generate(model, "ar", PROMPTS, max_new_tokens=10).tokens
    assert generate(model, "ar", PROMPTS, max_new_tokens=10, top_p=0.01, top_k=2, min_p=0.9).tokens == greedy
    for one in (dict(top_k=1), dict(min_p=1.0)):
        assert generate(model, "ar", PROMPTS, max_new_tokens=10, temperature=1.5, seed=0, **one).tokens == greedy
    assert generate(model, "ar", PROMPTS, max_new_tokens=10, temperature=1.5, seed=0, top_k=3).tokens != greedy


@pytest.mark.parametrize("mode", MODES)
def test_logit_bias_forces_and_bans(model, mode):
    options = dict(max_new_tokens=8, threshold=0.05) if mode in ("diffusion", "verify") else dict(max_new_tokens=8)
    forced = generate(model, mode, PROMPTS, logit_bias={17: 100}, temperature=1.0, seed=1, **options).tokens
    assert all(row == [17] * 8 for row in forced)
    greedy = generate(model, mode, PROMPTS, **options).tokens
    common = Counter(t for row in greedy for t in row).most_common(1)[0][0]
    banned = generate(model, mode, PROMPTS, logit_bias={str(common): -100}, **options).tokens
    assert all(common not in row for row in banned) and banned != greedy


def _most_repeated(rows) -> int:
    return max(max(Counter(row).values()) for row in rows)


@pytest.mark.parametrize("name", ["frequency_penalty", "presence_penalty"])
def test_penalties_push_a_repeating_greedy_reply_the_expected_way(model, name):
    plain = generate(model, "ar", PROMPTS, max_new_tokens=24).tokens
    assert _most_repeated(plain) >= 8  # the tiny model repeats itself
    less = generate(model, "ar", PROMPTS, max_new_tokens=24, **{name: 2.0}).tokens
    more = generate(model, "ar", PROMPTS, max_new_tokens=24, **{name: -2.0}).tokens
    assert _most_repeated(less) < _most_repeated(plain)
    assert sum(len(set(r)) for r in less) > sum(len(set(r)) for r in plain) >= sum(len(set(r)) for r in more)
    assert generate(model, "verify", PROMPTS, max_new_tokens=24, **{name: 2.0}).tokens == less  # verify == AR


@pytest.mark.parametrize(
    ("option", "field"),
    [
        (dict(top_k=-1), "top_k"),
        (dict(min_p=1.5), "min_p"),
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(frequency_penalty=-3), "frequency_penalty"),
        (dict(logit_bias={5: 101}), "logit_bias"),
        (dict(logit_bias={"x": 1}), "logit_bias"),
        (dict(logit_bias={5: True}), "logit_bias"),
        (dict(logit_bias={500: 1.0}), "logit_bias"),
        (dict(logprobs=21), "logprobs"),
    ],
)
def test_bad_sampling_values_are_refused_naming_the_field(model, option, field):
    with pytest.raises(TwoTowerError, match=field):
        generate(model, "ar", PROMPTS, max_new_tokens=2, **option)


def test_the_server_takes_logit_bias_and_the_new_knobs():
    from pydantic import ValidationError

    from twotower.serve.protocol import ChatRequest

    messages = [{"role": "user", "content": "w5"}]
    body = ChatRequest(messages=messages, logit_bias={"5": 100}, top_k=3, min_p=0.1, presence_penalty=-1)
    assert body.logit_bias == {"5": 100.0} and body.top_k == 3
    with pytest.raises(ValidationError, match="logit_bias"):
        ChatRequest(messages=messages, logit_bias={"5": 200})


def _teacher_forced_logprobs(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """log_softmax of the context tower's logits before each generated token (one forward)."""
    ids = torch.tensor([prompt + tokens[:-1]])
    _, logits = model.context_prefill(ids, torch.ones_like(ids), logits="all")
    return logits[0, len(prompt) - 1 :].float().log_softmax(-1)  # (N, V)


@pytest.mark.parametrize("mode", ["ar", "verify"])
def test_logprobs_are_the_context_towers_own(model, mode):
    """With temperature, penalties and a bias, a token's logprob is still the model's own
    distribution's (the context tower's for ar and verify), with the k likeliest tokens."""
    options = dict(max_new_tokens=10, temperature=1.4, seed=4, frequency_penalty=1.0, logit_bias={9: 2.0}, logprobs=3)
    result = generate(model, mode, PROMPTS, eos_token_id=EOS, **options)
    for prompt, tokens, logprobs in zip(PROMPTS, result.tokens, result.logprobs):
        reference = _teacher_forced_logprobs(model, prompt, tokens)
        assert [lp.token for lp in logprobs] == tokens
        torch.testing.assert_close(
            torch.tensor([lp.logprob for lp in logprobs]), reference.gather(1, torch.tensor(tokens)[:, None])[:, 0]
        )
        top = reference.topk(3, dim=-1)
        assert [[i for i, _ in lp.top] for lp in logprobs] == top.indices.tolist()
        torch.testing.assert_close(torch.tensor([[v for _, v in lp.top] for lp in logprobs]), top.values)


@pytest.mark.parametrize("mode", ["mock-ar", "diffusion"])
def test_stream_events_carry_logprobs_aligned_with_tokens(model, mode):
    """Only the rows that ask get logprobs, one per token, in the events and in the result;
    a row that asks for k = 0 alternatives gets none."""
    joined = [(PROMPTS[0], dict(max_new_tokens=9, logprobs=2)), (PROMPTS[2], dict(max_new_tokens=9))]
    joined += [(PROMPTS[1], dict(max_new_tokens=9, temperature=1.0, seed=1, logprobs=0))]
    group = decoder_of(model, mode, *joined[0])
    for prompt, options in joined[1:]:
        other = decoder_of(model, mode, prompt, options)
        group.run.join(other.run)
        group.join(other)
    seen = [[], None, []]
    while not group.run.finished:
        for event in group.cycle():
            assert event.logprobs[1] is None
            for b in (0, 2):
                assert [lp.token for lp in event.logprobs[b]] == event.tokens[b]
                seen[b] += event.logprobs[b]
    run = group.run
    assert run.logprobs[1] is None and len(run.logprobs[0]) == len(run.tokens[0]) > 0
    assert [lp.token for lp in run.logprobs[0]] == run.tokens[0] and run.logprobs[0] == seen[0]
    assert all(len(lp.top) == 2 and lp.logprob <= 0 for lp in run.logprobs[0])
    assert all(lp.top == [] for lp in run.logprobs[2])
    assert not any(event.logprobs for event in stream(model, mode, PROMPTS, max_new_tokens=4))


@pytest.mark.parametrize("scale", [0.1, 1.0, 5.0])
def test_filtering_over_the_likeliest_candidates_keeps_what_ranking_the_whole_vocabulary_keeps(monkeypatch, scale):
    """`filtered` ranks the likeliest CANDIDATES of each position and the whole vocabulary only
    where they do not decide (a flat distribution: scale 0.1 here, with 16 candidates of 300):
    the kept tokens are those of ranking the whole vocabulary, for top_k, top_p and min_p alone
    and together, rows of different settings side by side."""
    from twotower.generate import sampling

    monkeypatch.setattr(sampling, "CANDIDATES", 16)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 300, generator=g, dtype=torch.float64).float() * scale
    top_k = torch.tensor([300, 40, 300, 10, 300.0])[:, None, None]
    top_p = torch.tensor([0.9, 2.0, 2.0, 0.5, 0.3])[:, None, None]
    min_p = torch.tensor([0.0, 0.0, 0.2, 0.0, 0.01])[:, None, None]
    ranked, order = x.sort(dim=-1, descending=True)
    probs = ranked.softmax(-1)
    rank = torch.arange(300)
    drop = (rank >= top_k) | ((probs.cumsum(-1) - probs) >= top_p) | (probs < min_p * probs[..., :1])
    drop[..., 0] = False
    whole = torch.zeros_like(drop).scatter(-1, order, drop)
    assert torch.equal(sampling.filtered(x, top_k, top_p, min_p).isinf(), whole)
