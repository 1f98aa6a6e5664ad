"""Generation modes on tiny random backbones: parity with transformers, mock-AR = AR,
shifted-layout first tokens, batching, EOS, sampling, streaming and statistics."""

from __future__ import annotations

import pytest
import torch
from conftest import EOS, FAMILIES, PROMPTS, VOCAB, perturb_trained, tiny_two_tower

from twotower import generate_ar, generate_mask_diffusion, generate_mock_ar, stream
from twotower.generate.common import left_pad


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_ar_matches_transformers_greedy_generate(family):
    model = tiny_two_tower(family=family)
    ids, mask = left_pad(PROMPTS, pad_id=0)
    expected = model.context_tower.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None
    )[:, ids.shape[1] :].tolist()
    result = generate_ar(model, ids, mask, max_new_tokens=24)
    assert result.tokens == expected
    assert len(set(expected[0])) > 3  # the tiny model does not just repeat one token


def test_ar_stops_each_row_at_its_own_eos():
    model = tiny_two_tower()
    free = generate_ar(model, PROMPTS, max_new_tokens=20).tokens
    eos = free[0][6]  # a token row 0 writes mid-way: rows must stop at their own first occurrence
    result = generate_ar(model, PROMPTS, max_new_tokens=20, eos_token_id=eos)
    for row, full in zip(result.tokens, free):
        cut = full[: full.index(eos) + 1] if eos in full else full
        assert row == cut
    assert result.tokens[0][-1] == eos and len(result.tokens[0]) <= 7
    assert result.row_nfe == [len(t) for t in result.tokens]


@pytest.mark.parametrize("family", ["llama", "qwen3", "nemotron_h"])
def test_untrained_mock_ar_equals_ar(denoiser_kind, family):
    model = tiny_two_tower(denoiser_kind, family=family)
    ar = generate_ar(model, PROMPTS, max_new_tokens=20)
    mock = generate_mock_ar(model, PROMPTS, max_new_tokens=20)
    assert mock.tokens == ar.tokens
    assert mock.denoiser_passes == 20 and mock.tokens_per_nfe == 1.0


@pytest.mark.parametrize("family", ["llama", "nemotron_h"])
def test_mock_ar_uses_the_denoiser(denoiser_kind, family):
    model = tiny_two_tower(denoiser_kind, family=family)
    ar = generate_ar(model, PROMPTS, max_new_tokens=20)
    perturb_trained(model, scale=0.5)
    assert generate_mock_ar(model, PROMPTS, max_new_tokens=20).tokens != ar.tokens
    assert generate_ar(model, PROMPTS, max_new_tokens=20).tokens == ar.tokens  # context tower untouched


def ar_next_token(model, prefix: list[int]) -> int:
    return int(model(torch.tensor([prefix]))[0, -1].argmax())


@pytest.mark.parametrize("family", ["llama", "nemotron_h"])
@pytest.mark.parametrize("threshold", [0.05, 0.8])
def test_shifted_layout_first_token_of_every_block_is_ar_choice(denoiser_kind, threshold, family):
    model = tiny_two_tower(denoiser_kind, block_size=4, family=family)
    for prompt in PROMPTS:
        out = generate_mask_diffusion(model, [prompt], max_new_tokens=16, block_size=4, confidence_threshold=threshold).tokens[0]
        assert len(out) == 16
        for start in range(0, 16, 4):
            assert out[start] == ar_next_token(model, prompt + out[:start]), (prompt, start)


@pytest.mark.parametrize("family", ["llama", "nemotron_h"])
def test_diffusion_rows_are_independent_of_batching(denoiser_kind, family):
    """Per-row time and stopping: a batch gives each row what it would get alone, also with a
    trained-looking denoiser whose adaLN depends on t (hybrid: left padding leaves the Mamba
    states of a row as they are alone)."""
    model = tiny_two_tower(denoiser_kind, block_size=4, family=family)
    perturb_trained(model, scale=0.05)
    options = dict(max_new_tokens=14, block_size=4, confidence_threshold=0.3)
    batched = generate_mask_diffusion(model, PROMPTS, **options)
    for b, prompt in enumerate(PROMPTS):
        alone = generate_mask_diffusion(model, [prompt], **options)
        assert batched.tokens[b] == alone.tokens[0]
        assert batched.row_nfe[b] == alone.row_nfe[0]


def test_diffusion_commits_several_tokens_per_pass_at_low_threshold():
    model = tiny_two_tower(block_size=8)
    strict = generate_mask_diffusion(model, PROMPTS, max_new_tokens=16, block_size=8, confidence_threshold=1.0)
    loose = generate_mask_diffusion(model, PROMPTS, max_new_tokens=16, block_size=8, confidence_threshold=0.01)
    assert strict.tokens_per_nfe == 1.0  # nothing is above 1.0: one commit per pass
    assert loose.tokens_per_nfe == 8.0  # everything above 0.01 in a near-uniform model: one pass per block
    assert loose.context_passes == 2  # prefill + one extension between the two blocks
    few_steps = generate_mask_diffusion(
        model, PROMPTS, max_new_tokens=16, block_size=8, steps_per_block=2, confidence_threshold=1.0
    )
    assert few_steps.denoiser_passes == 4  # the last step of a block commits every slot left


def test_diffusion_eos_mid_block_stops_the_row_and_truncates():
    model = tiny_two_tower(block_size=8)
    free = generate_mask_diffusion(model, PROMPTS, max_new_tokens=16, block_size=8).tokens
    eos = free[2][3]
    result = generate_mask_diffusion(model, PROMPTS, max_new_tokens=16, block_size=8, eos_token_id=eos)
    row = result.tokens[2]
    assert row[-1] == eos and eos not in row[:-1] and len(row) <= 4
    assert result.tokens[2] == free[2][: len(row)]


def test_diffusion_spends_no_pass_on_slots_after_a_committed_eos(monkeypatch):
    """A stub denoiser: slot 2 predicts EOS most confidently, slots 3-7 a token with 0.8, slots
    0-1 a token with 0.5. One commit per pass (threshold 1.0): EOS goes first; then only slots
    0 and 1 are left to fill, because slots after a committed EOS are never emitted."""
    model = tiny_two_tower(block_size=8)

    def denoise(view, block_ids, start_pos, t=None):
        probs = torch.full((*block_ids.shape, VOCAB), 1e-3)
        probs[:, 2, EOS], probs[:, 3:, 50], probs[:, :2, 60] = 0.9, 0.8, 0.5
        return probs.log()

    monkeypatch.setattr(model, "denoise", denoise)
    options = dict(max_new_tokens=8, block_size=8, confidence_threshold=1.0)
    without_eos = generate_mask_diffusion(model, [PROMPTS[0]], **options)
    assert without_eos.tokens[0] == [60, 60, EOS, 50, 50, 50, 50, 50] and without_eos.nfe == 8
    with_eos = generate_mask_diffusion(model, [PROMPTS[0]], eos_token_id=EOS, **options)
    assert with_eos.tokens[0] == [60, 60, EOS]
    assert with_eos.nfe == 3


def test_same_position_layout_runs_and_fills_blocks():
    model = tiny_two_tower(layout="same-position", block_size=4)
    result = generate_mask_diffusion(model, PROMPTS, max_new_tokens=10, block_size=4)
    assert [len(t) for t in result.tokens] == [10] * len(PROMPTS)
    assert all(0 <= tok < model.num_embeddings for row in result.tokens for tok in row)
    assert result.context_passes == 3  # prefill + two extensions (blocks of 4, 4, 2)


@pytest.mark.parametrize("mode_fn", [generate_ar, generate_mock_ar, generate_mask_diffusion])
def test_sampling_is_seeded(mode_fn):
    model = tiny_two_tower()
    a = mode_fn(model, PROMPTS, max_new_tokens=12, temperature=1.0, seed=7).tokens
    b = mode_fn(model, PROMPTS, max_new_tokens=12, temperature=1.0, seed=7).tokens
    c = mode_fn(model, PROMPTS, max_new_tokens=12, temperature=1.0, seed=8).tokens
    greedy = mode_fn(model, PROMPTS, max_new_tokens=12).tokens
    assert a == b and a != c and a != greedy
    nucleus = mode_fn(model, PROMPTS, max_new_tokens=12, temperature=1.0, top_p=1e-6, seed=7).tokens
    assert nucleus == greedy  # top-p that keeps one token is greedy


@pytest.mark.parametrize("mask_token_id", [None, VOCAB - 1])
def test_mask_token_is_never_generated(mask_token_id):
    """A new id (vocab size) or a reused unused id: the denoiser never emits it."""
    model = tiny_two_tower(mask_token_id=mask_token_id)
    assert model.mask_token_id == (VOCAB if mask_token_id is None else VOCAB - 1)
    result = generate_mask_diffusion(model, PROMPTS, max_new_tokens=16, temperature=5.0, seed=0)
    assert all(tok != model.mask_token_id for row in result.tokens for tok in row)


def test_stream_events_add_up_to_the_result():
    model = tiny_two_tower(block_size=4)
    for mode in ("ar", "mock-ar", "diffusion"):
        events = (
            stream(model, mode, PROMPTS, max_new_tokens=10, confidence_threshold=0.3)
            if mode == "diffusion"
            else stream(model, mode, PROMPTS, max_new_tokens=10)
        )
        seen = [[] for _ in PROMPTS]
        while True:
            try:
                event = next(events)
            except StopIteration as stop:
                result = stop.value
                break
            for b, toks in enumerate(event.tokens):
                seen[b].extend(toks)
        assert seen == result.tokens, mode


def test_statistics_count_passes():
    model = tiny_two_tower(block_size=4)
    ar = generate_ar(model, [PROMPTS[0]], max_new_tokens=9)
    assert (ar.nfe, ar.context_passes, ar.denoiser_passes) == (9, 9, 0)
    diff = generate_mask_diffusion(model, [PROMPTS[0]], max_new_tokens=9, block_size=4)
    assert diff.context_passes == 3 and diff.nfe == diff.denoiser_passes
    assert diff.tokens_per_nfe == pytest.approx(9 / diff.nfe)
    assert diff.stats()["seconds"] > 0


def test_eos_at_the_first_token():
    model = tiny_two_tower()
    first = generate_ar(model, PROMPTS, max_new_tokens=5).tokens[0][0]
    for fn in (generate_ar, generate_mock_ar, generate_mask_diffusion):
        assert fn(model, PROMPTS, max_new_tokens=5, eos_token_id=[first, EOS]).tokens[0] == [first]
