"""Drafts that never cost more than AR (first timings dropped, unpaid sources not chosen), the
draft vocabulary (a cheaper draft head, stored with the checkpoint, exact verify), and mock-AR
for an AR-first denoiser."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import EOS, PROMPTS, VOCAB, perturb_trained, tiny_backbone, tiny_two_tower

from twotower import TwoTowerForCausalLM, generate_ar, generate_mask_diffusion, generate_mock_ar, generate_verify
from twotower.generate.draft import DraftMemory, DraftPolicy, denoiser_draft
from twotower.generate.sampling import Sampling
from twotower.model import draft_vocab
from twotower.model.checkpoint import SHIPPED
from twotower.settings import GenerationSettings


# ------------------------------------------------------------------ the policy
def test_a_first_timing_of_each_shape_is_dropped():
    """A pass over a new width pays one-time set-up: its time is neither the memory's cost of
    that width nor (the decoder passes cost None) a row's rate."""
    memory = DraftMemory()
    assert memory.first_timing(1, 5, 4)  # a new width and a new draft: set-up
    assert not memory.first_timing(1, 5, 4)
    assert memory.first_timing(1, 5, 2)  # a new draft shape alone counts too
    assert memory.first_timing(2, 5, 4) and not memory.first_timing(2, 5, None)  # per batch size
    assert memory.first_timing(1, 1, None) and not memory.first_timing(1, 1, None)
    assert memory.estimate(1, 3, True) is None  # nothing kept yet: the cycle has no cost
    memory.add_cycle(1, 1, 0.045, None)
    memory.add_cycle(1, 5, 0.060, 0.020)
    assert memory.estimate(1, 3, True) == pytest.approx(0.0525 + 0.020)  # what kept timings say
    assert memory.estimate(2, 3, True) is None


def test_a_first_sample_outlier_does_not_decide_the_source():
    """Fake clock: a denoiser cycle commits 3 tokens in 70 ms, an AR step 1 in 45 ms, but the
    denoiser's first cycle took 150 ms (set-up). Kept, that outlier ranks the denoiser below AR
    (3 / 0.150 = 20 tokens/s against 22); dropped, its rate is its real one and it is chosen."""
    policy = DraftPolicy(batch=1, sources=("denoiser", "ar"), skip_unpaid=False)
    memory = DraftMemory()
    clock = {("denoiser", True): 0.150, ("denoiser", False): 0.070, ("ar", True): 0.045, ("ar", False): 0.045}
    for _ in range(4):
        source = policy.choose(0, room=4)
        width, draft = (3, 2) if source == "denoiser" else (1, None)
        first = memory.first_timing(1, width, draft)
        tokens = 3 if source == "denoiser" else 1
        policy.record(0, source, tokens, None if first else clock[(source, first)], accepted=tokens - 1, drafted=tokens - 1)
    assert policy.rates[0]["denoiser"] == 3 / 0.070 and policy.rates[0]["ar"] == 1 / 0.045
    assert policy.choose(0, room=4) == "denoiser"
    kept = DraftPolicy(batch=1, sources=("denoiser", "ar"))  # what keeping the first timing does
    kept.record(0, "denoiser", 3, 0.150, accepted=2, drafted=2)
    kept.record(0, "ar", 1, 0.045)
    assert kept.choose(0, room=4) == "ar"


def test_a_source_whose_pay_off_is_below_ars_is_not_chosen():
    """From the policy's own measurements: a denoiser cycle over 3 positions costs what 3 AR
    steps cost, and its drafts are accepted a third of the time, so it is expected to commit
    fewer tokens per second than AR steps: AR is chosen, even though its measured rate is
    lower, and a denoiser row drafts nothing outside a probe."""
    cost = lambda width, denoiser: 0.045 * (3.0 if denoiser else 1.0 + (width - 1) / 16)
    prior = {"denoiser": (30.0, 1 / 3, 64), "ar": (22.0, None, 64)}
    policy = DraftPolicy(batch=1, sources=("denoiser", "ar"), prior=prior, cost=cost, skip_unpaid=True)
    assert not policy.pays(0, "denoiser", room=4)
    assert policy.choose(0, room=4) == "ar"
    assert policy.draft_length(0, "denoiser", room=4) == 0
    cheap = DraftPolicy(batch=1, sources=("denoiser", "ar"), prior=prior, cost=lambda w, d: 0.045 * (1 + 0.2 * d))
    cheap.skip_unpaid = True
    assert cheap.pays(0, "denoiser", room=4) and cheap.choose(0, room=4) == "denoiser"


def test_auto_chooses_by_expected_pay_off_not_by_the_last_cycles_luck():
    """A denoiser whose drafts were accepted 60% of the time, at a cycle cost of 1.2 AR steps and
    a little more per drafted position: two unlucky cycles (nothing accepted) sink its measured
    rate below AR's, yet with the acceptance left (about 38%) it is still expected to commit
    more tokens per second than AR steps, and auto (skip_unpaid) keeps choosing it, by
    acceptance over cost. A policy that ranks by measured rate alone turns to AR."""
    cost = lambda width, denoiser: 0.045 * (1.0 + 0.2 * denoiser + (width - 1) / 16)
    prior = {"denoiser": (25.0, 0.6, 8), "ar": (22.0, None, 8)}
    for skip_unpaid, chosen in ((True, "denoiser"), (False, "ar")):
        policy = DraftPolicy(batch=1, sources=("denoiser", "ar"), prior=prior, cost=cost, skip_unpaid=skip_unpaid)
        for _ in range(2):
            policy.record(0, "denoiser", 1, cost(4, True), accepted=0, drafted=3)
        assert policy.rates[0]["denoiser"] < policy.rates[0]["ar"]
        assert policy.expected_rate(0, "denoiser", 4) > policy.expected_rate(0, "ar", 4)
        assert policy.choose(0, room=4) == chosen


def test_unseeded_auto_verify_with_a_set_up_cycle_equals_ar():
    model = tiny_two_tower("lora")
    perturb_trained(model, scale=0.3)
    ar = generate_ar(model, PROMPTS, max_new_tokens=16, eos_token_id=EOS).tokens
    memory = DraftMemory()
    for _ in range(2):  # the second run starts from what the first measured
        assert generate_verify(model, PROMPTS, max_new_tokens=16, eos_token_id=EOS, memory=memory).tokens == ar
    assert memory.timed and memory.passes


# ------------------------------------------------------------------ the draft vocabulary
def test_the_draft_vocabulary_counts_tokens_most_frequent_first():
    vocab = draft_vocab.count_tokens([[5, 5, 7, 9], [5, 7, 3]], vocab_size=12)
    assert vocab.ids.tolist() == [5, 7, 3, 9] and vocab.counts.tolist() == [3, 2, 1, 1] and vocab.total == 7
    assert vocab.coverage(2) == 5 / 7 and vocab.coverage(100) == 1.0
    assert vocab.top(2).tolist() == [5, 7]


def test_the_draft_vocabulary_travels_with_the_checkpoint(tmp_path):
    model = tiny_two_tower("lora")
    model.draft_vocab = draft_vocab.count_tokens([[5, 6, 7, 5], [40, 5]], VOCAB)
    model.save_pretrained(tmp_path)
    loaded = TwoTowerForCausalLM.from_pretrained(tmp_path, backbone=tiny_backbone(), dtype=torch.float32)
    assert loaded.draft_vocab.ids.tolist() == [5, 6, 7, 40] and loaded.draft_vocab.total == 6
    assert loaded.draft_head(2).ids.tolist() == [5, 6] and loaded.draft_head(0) is None
    (tmp_path / draft_vocab.FILE_NAME).unlink()
    assert TwoTowerForCausalLM.from_pretrained(tmp_path, backbone=tiny_backbone()).draft_head(16) is None


def test_the_draft_head_gives_the_full_heads_logits_of_its_tokens():
    model = tiny_two_tower("lora")
    model.draft_vocab = draft_vocab.count_tokens([list(range(3, 40))], VOCAB)
    head = model.draft_head(20)
    hidden = torch.randn(2, 3, model.context_tower.config.hidden_size)
    full = model.denoiser_logits(hidden)
    assert torch.allclose(head(hidden), full[..., head.ids], atol=1e-5)
    probs = torch.rand(2, 3, 20)
    spread = head.spread(probs)  # (2, 3, V), zero outside the ids
    assert torch.equal(spread[..., head.ids], probs) and torch.allclose(spread.sum(-1), probs.sum(-1))


def test_a_head_trained_over_a_draft_vocabulary_gives_those_tokens_only_in_every_mode():
    """config.head_vocab N (a model trained with --draft-vocab N): the denoiser's logits are its
    N tokens' (the whole head's there), -inf elsewhere, so diffusion and mock-AR write among
    them; verify's draft head holds at most those N; AR's output is untouched."""
    model = tiny_two_tower("full", block_size=4)
    perturb_trained(model, scale=0.3)
    model.draft_vocab = draft_vocab.count_tokens([list(range(3, 40)), list(range(3, 12))], VOCAB)
    hidden = torch.randn(2, 3, model.context_tower.config.hidden_size)
    full = model.denoiser_logits(hidden)
    ar = generate_ar(model, PROMPTS, max_new_tokens=12).tokens
    model.config.head_vocab = 10
    kept = model.draft_vocab.top(10)
    restricted = model.denoiser_logits(hidden)
    torch.testing.assert_close(restricted[..., kept], full[..., kept], rtol=1e-5, atol=1e-5)
    others = torch.ones(restricted.shape[-1], dtype=torch.bool)
    others[kept] = False
    assert bool(torch.isinf(restricted[..., others]).all())
    for result in (
        generate_mask_diffusion(model, PROMPTS, max_new_tokens=12, threshold=0.3),
        generate_mock_ar(model, PROMPTS, max_new_tokens=12),
    ):
        for row, starts in zip(result.tokens, result.details["block_starts"]):  # a block's first token is AR's
            denoised = [t for i, t in enumerate(row) if i not in starts]
            assert denoised and set(denoised) <= set(kept.tolist())
    assert [len(model.draft_head(n).ids) for n in (0, 4, 10, 30)] == [10, 4, 10, 10]
    assert generate_verify(model, PROMPTS, max_new_tokens=12, draft="denoiser").tokens == ar


def _with_vocab(model, ids):
    model.draft_vocab = draft_vocab.DraftVocab(torch.tensor(ids), torch.ones(len(ids), dtype=torch.long), len(ids))
    return model


def test_denoiser_drafts_pick_among_the_draft_vocabulary_and_verify_stays_ar():
    model = tiny_two_tower("full", block_size=4)
    perturb_trained(model, scale=0.3)
    ar = generate_ar(model, PROMPTS, max_new_tokens=16, eos_token_id=EOS).tokens
    allowed = list(range(3, VOCAB, 2))
    _with_vocab(model, allowed)
    ids = torch.tensor([p[-3:] for p in PROMPTS[:1]])
    cache, logits = model.context_prefill(ids, torch.ones_like(ids))
    sampling = Sampling.of(GenerationSettings(temperature=0.0), 1)
    tokens, _, _ = denoiser_draft(model, cache, logits.argmax(-1), 3, 1e-9, sampling, {}, 1, model.draft_head(len(allowed)))
    assert set(tokens.flatten().tolist()) <= set(allowed)
    for size in (0, 8, len(allowed)):
        result = generate_verify(model, PROMPTS, max_new_tokens=16, eos_token_id=EOS, draft="denoiser", draft_vocab=size)
        assert result.tokens == ar, size
    sampled = generate_verify(model, PROMPTS, max_new_tokens=8, temperature=0.8, seed=3, draft="denoiser", draft_vocab=8)
    assert all(len(row) == 8 for row in sampled.tokens)


def test_token_trees_pick_among_the_draft_vocabulary_and_verify_stays_ar(monkeypatch):
    """A tree's nodes come from the draft head as a chain's drafts do (the lookup branch aside),
    and the reply stays AR's."""
    from twotower.generate import tree as tree_module

    model = tiny_two_tower("full", block_size=4)
    perturb_trained(model, scale=0.3)
    ar = generate_ar(model, PROMPTS[:1], max_new_tokens=16, eos_token_id=EOS).tokens
    allowed = list(range(3, VOCAB, 2))
    _with_vocab(model, allowed)
    monkeypatch.setattr(tree_module.TokenTree, "add_branch", lambda self, tokens, budget, acceptance=1.0: 0)  # no lookup branch
    nodes, real = [], tree_module.build_tree
    monkeypatch.setattr(tree_module, "build_tree", lambda *a, **k: nodes.append(real(*a, **k)) or nodes[-1])
    result = generate_verify(model, PROMPTS[:1], max_new_tokens=16, eos_token_id=EOS, draft="denoiser", tree_nodes=6)
    assert result.tokens == ar and nodes
    assert {t for tree in nodes for t in tree.tokens} <= set(allowed)
    nodes.clear()
    assert (
        generate_verify(
            model, PROMPTS[:1], max_new_tokens=16, eos_token_id=EOS, draft="denoiser", tree_nodes=6, draft_vocab=0
        ).tokens
        == ar
    )
    assert any(t % 2 == 0 for tree in nodes for t in tree.tokens)  # the whole vocabulary: other tokens too


def test_sampled_drafts_from_the_draft_vocabulary_leave_the_reply_ars():
    """Seeded sampling: the denoiser's drafts pick among the draft vocabulary with each
    position's own noise, and the reply is AR's sampled reply with that seed token for token,
    also where AR picks a token outside the vocabulary."""
    model = tiny_two_tower("full", block_size=4)
    perturb_trained(model, scale=0.3)
    _with_vocab(model, list(range(3, VOCAB, 2)))
    options = dict(max_new_tokens=16, eos_token_id=EOS, temperature=0.9, seed=5)
    ar = generate_ar(model, PROMPTS, **options).tokens
    assert any(t % 2 == 0 for row in ar for t in row)  # AR writes tokens the drafts cannot
    for size in (0, 8):
        assert generate_verify(model, PROMPTS, draft="denoiser", draft_vocab=size, **options).tokens == ar, size


def test_the_shipped_checkpoint_states_the_coverage_of_its_draft_vocabulary():
    vocab = draft_vocab.load(SHIPPED)
    assert vocab is not None and len(vocab.ids) > 4096 and vocab.coverage(4096) > 0.9
    card = (SHIPPED / "MODEL_CARD.md").read_text()
    assert draft_vocab.card_line(vocab) in card.splitlines()
    docs = (Path(__file__).parent.parent / "docs" / "verify.md").read_text()
    assert f"> {draft_vocab.card_line(vocab)}" in docs.splitlines()  # the figures the command wrote, not typed


def test_the_model_card_line_is_replaced_not_repeated(tmp_path):
    (tmp_path / "MODEL_CARD.md").write_text("# card\n")
    for data in ([[5, 5, 6]], [[7, 7, 7, 8]]):
        assert draft_vocab.write_card_line(tmp_path, draft_vocab.count_tokens(data, VOCAB))
    text = (tmp_path / "MODEL_CARD.md").read_text()
    assert text.count(draft_vocab.CARD_MARK) == 1 and "4 tokens" in text
    assert not draft_vocab.write_card_line(tmp_path / "none", draft_vocab.count_tokens([[5]], VOCAB))


# ------------------------------------------------------------------ mock-AR
def test_mock_ar_opens_every_block_with_the_context_towers_token():
    """However the denoiser is trained, each block of the trained size starts with the context
    pass's own token (an AR-first denoiser never learned that slot), and the denoiser commits one
    slot per pass after it."""
    model = tiny_two_tower("lora", block_size=4)
    perturb_trained(model, scale=0.5)
    result = generate_mock_ar(model, PROMPTS, max_new_tokens=10)
    for prompt, out, starts in zip(PROMPTS, result.tokens, result.details["block_starts"]):
        assert starts == [0, 4, 8]
        for start in starts:
            ar_next = int(model(torch.tensor([prompt + out[:start]]))[0, -1].argmax())
            assert out[start] == ar_next
    assert result.denoiser_passes == 10 - 3 and result.context_passes == 3
    assert result.tokens != generate_ar(model, PROMPTS, max_new_tokens=10).tokens  # the other slots: the denoiser's


def test_mock_ar_with_a_denoiser_that_predicts_ars_next_token_is_ar(denoiser_kind):
    """An untrained denoiser is the backbone: each slot, attending to the slots before it
    only, predicts the AR model's next token, so mock-AR is AR exactly, across blocks and with
    rows that end mid-block."""
    model = tiny_two_tower(denoiser_kind, block_size=4)
    ar = generate_ar(model, PROMPTS, max_new_tokens=13, eos_token_id=EOS).tokens
    mock = generate_mock_ar(model, PROMPTS, max_new_tokens=13, eos_token_id=EOS)
    assert mock.tokens == ar and mock.details["block_starts"][2] == [0, 4, 8, 12]


def test_the_draft_head_is_gathered_again_when_the_head_is_cast():
    model = _with_vocab(tiny_two_tower("lora"), list(range(3, 30)))
    assert model.draft_head(8) is model.draft_head(8)  # gathered once
    model.to(torch.bfloat16)
    assert model.draft_head(8).weight.dtype == torch.bfloat16


def test_the_draft_vocab_command_stores_a_checkpoints_vocabulary(tmp_path, capsys):
    import json

    from conftest import tiny_tokenizer

    from twotower import load_model
    from twotower.cli import main

    backbone_folder, checkpoint = tmp_path / "backbone", tmp_path / "checkpoint"
    tiny_tokenizer().save_pretrained(backbone_folder)
    tiny_backbone().save_pretrained(backbone_folder)
    model, _ = load_model(str(backbone_folder), dtype=torch.float32)
    model.save_pretrained(checkpoint)
    (checkpoint / "MODEL_CARD.md").write_text("# a card\n")
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": "w5 w6", "response": f"w7 w7 w7 w{i}"}) for i in range(8, 11)) + "\n")
    assert main(["draft-vocab", str(checkpoint), str(data)]) == 0
    vocab = draft_vocab.load(checkpoint)
    assert vocab.ids[0] == 7 and vocab.counts[0] == 9  # "w7" three times in each of the three rows
    assert capsys.readouterr().out.strip() == draft_vocab.card_line(vocab)
    assert draft_vocab.card_line(vocab) in (checkpoint / "MODEL_CARD.md").read_text()
    assert main(["draft-vocab", str(backbone_folder), str(data)]) == 2  # not a checkpoint: one line, no traceback
    assert "not a twotower checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_a_denoiser_draft_fills_its_width_and_gives_each_token_its_confidence(steps):
    """Every pass but the last drafts the confident run (at least one slot), the last drafts
    every slot left: a draft holds its whole width, each token with its probability."""
    model = tiny_two_tower("full", block_size=4)
    perturb_trained(model, scale=0.3)
    ids = torch.tensor([p[-3:] for p in PROMPTS[:2]])
    cache, logits = model.context_prefill(ids, torch.ones_like(ids))
    sampling = Sampling.of(GenerationSettings(temperature=0.0), 2)
    tokens, confidence, passes = denoiser_draft(model, cache, logits.argmax(-1), 3, 1.0, sampling, {}, steps)
    assert tokens.shape == confidence.shape == (2, 3)
    assert passes == min(steps, 3)  # nothing is above a threshold of 1: one slot a pass until the last
    assert (tokens != model.mask_token_id).all() and ((confidence > 0) & (confidence <= 1)).all()
