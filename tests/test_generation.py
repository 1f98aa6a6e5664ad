"""Generation modes on tiny random backbones: parity with transformers, mock-AR = AR, the AR
token that starts every diffusion block, blocks that end at their committed prefix, batching,
EOS, sampling, streaming and statistics."""

from __future__ import annotations

import pytest
import torch
from conftest import EOS, FAMILIES, PROMPTS, VOCAB, perturb_trained, tiny_two_tower

from twotower import generate, generate_ar, generate_mask_diffusion, generate_mock_ar, stream
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fewer_op_norm_and_rotation_are_transformers_bit_for_bit(dtype):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from twotower.backbones.llama import rms_norm, rope, rope_tables

    backbone = tiny_two_tower().context_tower.to(dtype)
    norm = backbone.model.layers[0].input_layernorm
    with torch.no_grad():
        norm.weight.add_(torch.randn(norm.weight.shape).to(dtype) * 0.1)  # not all ones
        x = (torch.randn(2, 5, norm.weight.shape[0]) * 3).to(dtype)
        assert torch.equal(rms_norm(norm, x), norm(x))
        positions = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
        cos, sin = rope_tables(backbone, positions, dtype)  # (B, 1, T, D)
        q, k = torch.randn(2, 4, 5, cos.shape[-1]).to(dtype), torch.randn(2, 2, 5, cos.shape[-1]).to(dtype)
        both = rope(torch.cat([q, k], dim=1), cos, sin)
        hf_q, hf_k = apply_rotary_pos_emb(q, k, cos[:, 0], sin[:, 0])
    assert torch.equal(both[:, :4], hf_q) and torch.equal(both[:, 4:], hf_k)


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


@pytest.mark.parametrize("mode", ["ar", "verify", "diffusion"])
def test_ignore_eos_writes_max_new_tokens_past_an_eos(mode):
    model = tiny_two_tower(block_size=8)
    options = {"max_new_tokens": 16, "threshold": 0.05} if mode == "diffusion" else {"max_new_tokens": 16}
    free = generate(model, mode, PROMPTS, **options).tokens
    eos = free[0][3]  # row 0 writes it early
    stopped = generate(model, mode, PROMPTS, eos_token_id=eos, **options).tokens
    kept = generate(model, mode, PROMPTS, eos_token_id=eos, ignore_eos=True, **options).tokens
    assert len(stopped[0]) <= 4 and stopped[0][-1] == eos
    assert kept == free and all(len(row) == 16 for row in kept)


@pytest.mark.parametrize("family", ["llama", "qwen3", "nemotron_h"])
def test_untrained_mock_ar_equals_ar(denoiser_kind, family):
    model = tiny_two_tower(denoiser_kind, family=family)
    ar = generate_ar(model, PROMPTS, max_new_tokens=20)
    mock = generate_mock_ar(model, PROMPTS, max_new_tokens=20)
    assert mock.tokens == ar.tokens
    blocks = len(mock.details["block_starts"][0])  # each block's first token is a context pass's
    assert mock.denoiser_passes == 20 - blocks and mock.context_passes == blocks


@pytest.mark.parametrize("family", ["llama", "nemotron_h"])
def test_mock_ar_uses_the_denoiser(denoiser_kind, family):
    model = tiny_two_tower(denoiser_kind, family=family)
    ar = generate_ar(model, PROMPTS, max_new_tokens=20)
    perturb_trained(model, scale=0.5)
    assert generate_mock_ar(model, PROMPTS, max_new_tokens=20).tokens != ar.tokens
    assert generate_ar(model, PROMPTS, max_new_tokens=20).tokens == ar.tokens  # context tower untouched


def ar_next_token(model, prefix: list[int]) -> int:
    return int(model(torch.tensor([prefix]))[0, -1].argmax())


def assert_blocks_start_with_the_ar_token(model, prompts, result):
    """Every block starts where a context pass ended, with that pass's own (AR) token."""
    for prompt, out, starts in zip(prompts, result.tokens, result.details["block_starts"]):
        assert starts[0] == 0 and starts == sorted(set(starts)) and starts[-1] < len(out)
        for start in starts:
            assert out[start] == ar_next_token(model, prompt + out[:start]), (prompt, start)


@pytest.mark.parametrize("family", ["llama", "nemotron_h"])
@pytest.mark.parametrize("threshold", [0.05, 0.8])
@pytest.mark.parametrize("trained", [False, True])
def test_every_context_pass_commits_the_ar_token(denoiser_kind, threshold, family, trained):
    """The first token of every block is the context tower's own choice, however the denoiser
    is trained: training can never make it worse."""
    model = tiny_two_tower(denoiser_kind, block_size=4, family=family)
    if trained:
        perturb_trained(model, scale=0.3)
    result = generate_mask_diffusion(model, PROMPTS, max_new_tokens=16, block_size=4, threshold=threshold)
    assert all(len(out) == 16 for out in result.tokens)
    assert_blocks_start_with_the_ar_token(model, PROMPTS, result)
    assert result.context_passes == result.details["cycles"]


@pytest.mark.parametrize("family", ["llama", "nemotron_h"])
@pytest.mark.parametrize("scale", [0.0, 0.5])
def test_a_denoiser_that_is_never_confident_writes_the_ar_text(family, scale):
    """No slot passes the threshold: nothing is forced into the text, every block ends at its
    AR token, and the reply is AR's, token for token (a weak denoiser degrades to AR)."""
    model = tiny_two_tower("lora", block_size=8, family=family)
    perturb_trained(model, scale=scale)
    ar = generate_ar(model, PROMPTS, max_new_tokens=14)
    diff = generate_mask_diffusion(model, PROMPTS, max_new_tokens=14, block_size=8, threshold=1.0)
    assert diff.tokens == ar.tokens
    assert diff.details["cycles"] == 14  # one token per context pass
    assert diff.row_nfe == [13] * len(PROMPTS)  # one denoiser pass per block but the last (no room left)


@pytest.mark.parametrize("family", ["llama", "nemotron_h"])
def test_diffusion_rows_are_independent_of_batching(denoiser_kind, family):
    """Per-row time and stopping: a batch gives each row what it would get alone, also with a
    trained-looking denoiser whose adaLN depends on t (hybrid: left padding leaves the Mamba
    states of a row as they are alone)."""
    model = tiny_two_tower(denoiser_kind, block_size=4, family=family)
    perturb_trained(model, scale=0.05)
    options = dict(max_new_tokens=14, block_size=4, threshold=0.3)
    batched = generate_mask_diffusion(model, PROMPTS, **options)
    for b, prompt in enumerate(PROMPTS):
        alone = generate_mask_diffusion(model, [prompt], **options)
        assert batched.tokens[b] == alone.tokens[0]
        assert batched.row_nfe[b] == alone.row_nfe[0]


def test_diffusion_commits_several_tokens_per_pass_at_low_threshold():
    model = tiny_two_tower(block_size=8)
    loose = generate_mask_diffusion(model, PROMPTS, max_new_tokens=16, block_size=8, threshold=0.01)
    assert loose.tokens_per_nfe == 8.0  # everything above 0.01 in a near-uniform model: one pass per block
    assert loose.context_passes == 2  # prefill + one extension between the two blocks
    assert loose.details["block_starts"] == [[0, 8]] * len(PROMPTS)
    few_steps = generate_mask_diffusion(model, PROMPTS, max_new_tokens=16, block_size=8, steps_per_block=1, threshold=0.01)
    assert few_steps.tokens == loose.tokens and few_steps.denoiser_passes == 2


def test_diffusion_eos_mid_block_stops_the_row_and_truncates():
    model = tiny_two_tower(block_size=8)
    free = generate_mask_diffusion(model, PROMPTS, max_new_tokens=16, block_size=8, threshold=0.05).tokens
    eos = free[2][3]
    result = generate_mask_diffusion(model, PROMPTS, max_new_tokens=16, block_size=8, threshold=0.05, eos_token_id=eos)
    row = result.tokens[2]
    assert row[-1] == eos and eos not in row[:-1] and len(row) <= 4
    assert result.tokens[2] == free[2][: len(row)]


def _stub_denoiser(model, monkeypatch):
    """A stub denoiser over a block [y_0, y_1, ...]: slot 1 predicts token 60 with probability
    0.84, slot 2 EOS with 0.90, slots 3-7 token 50 with 0.89 (after normalisation)."""

    def denoise(view, block_ids, start_pos, t=None, anchor_hidden=None, slots=None, **pass_options):
        probs = torch.full((*block_ids.shape, VOCAB), 1e-3)
        probs[:, 1:2, 60], probs[:, 2:3, EOS], probs[:, 3:, 50] = 0.5, 0.9, 0.8
        return probs.log()

    monkeypatch.setattr(model, "denoise", denoise)


def test_diffusion_spends_no_slot_after_a_committed_eos(monkeypatch):
    model = tiny_two_tower(block_size=8)
    _stub_denoiser(model, monkeypatch)
    first = generate_ar(model, [PROMPTS[0]], max_new_tokens=1).tokens[0]
    options = dict(max_new_tokens=8, block_size=8, threshold=0.4)
    without_eos = generate_mask_diffusion(model, [PROMPTS[0]], **options)
    assert without_eos.tokens[0] == [*first, 60, EOS, 50, 50, 50, 50, 50] and without_eos.nfe == 1
    with_eos = generate_mask_diffusion(model, [PROMPTS[0]], eos_token_id=EOS, **options)
    assert with_eos.tokens[0] == [*first, 60, EOS] and with_eos.nfe == 1


def test_a_block_ends_at_its_committed_prefix(monkeypatch):
    """Slots 2-7 pass the threshold (0.87) but slot 1 never does: the block ends after its AR
    token and the tokens committed after the gap never reach the text."""
    model = tiny_two_tower(block_size=8)
    _stub_denoiser(model, monkeypatch)
    ar = generate_ar(model, [PROMPTS[0]], max_new_tokens=6).tokens
    result = generate_mask_diffusion(model, [PROMPTS[0]], max_new_tokens=6, block_size=8, threshold=0.87)
    assert result.tokens == ar
    assert result.details["block_starts"] == [list(range(6))]
    # rooms 6, 5, 4, 3: a pass that commits slots 2.., then one that commits nothing; room 2: slot 1
    # alone, one pass that commits nothing; room 1: no slot for the denoiser
    assert result.nfe == 4 * 2 + 1


def test_same_position_layout_runs_and_fills_blocks():
    model = tiny_two_tower(layout="same-position", block_size=4)
    result = generate_mask_diffusion(model, PROMPTS, max_new_tokens=10, block_size=4, threshold=0.01)
    assert [len(t) for t in result.tokens] == [10] * len(PROMPTS)
    assert all(0 <= tok < model.num_embeddings for row in result.tokens for tok in row)
    assert result.details["block_starts"] == [[0, 4, 8]] * len(PROMPTS)  # blocks of 4, 4, 2
    assert_blocks_start_with_the_ar_token(model, PROMPTS, result)


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
            stream(model, mode, PROMPTS, max_new_tokens=10, threshold=0.3)
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
    assert diff.context_passes == diff.details["cycles"] == len(diff.details["block_starts"][0])
    assert diff.nfe == diff.denoiser_passes
    assert diff.tokens_per_nfe == pytest.approx(9 / diff.nfe)
    assert diff.stats()["seconds"] > 0


def test_eos_at_the_first_token():
    model = tiny_two_tower()
    first = generate_ar(model, PROMPTS, max_new_tokens=5).tokens[0][0]
    for fn in (generate_ar, generate_mock_ar, generate_mask_diffusion):
        assert fn(model, PROMPTS, max_new_tokens=5, eos_token_id=[first, EOS]).tokens[0] == [first]


def test_a_top_p_that_underflows_keeps_the_likeliest_token():
    """top_p = 5e-324 is 0 in fp32 (found by the server's schema fuzzing): sampling stays greedy
    instead of sampling from an empty set."""
    model = tiny_two_tower()
    greedy = generate_ar(model, PROMPTS, max_new_tokens=6).tokens
    assert generate_ar(model, PROMPTS, max_new_tokens=6, temperature=1.0, top_p=5e-324, seed=0).tokens == greedy
    for mode in ("ar", "verify"):  # a temperature below 1e-5 would overflow logits / T: it is greedy
        assert generate(model, mode, PROMPTS, max_new_tokens=6, temperature=5e-324, seed=0).tokens == greedy
