"""The training objective and the trainer, on tiny random models and tiny local data."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, perturb_trained, tiny_backbone, tiny_tokenizer, tiny_two_tower

from twotower import TwoTowerError, generate_ar
from twotower.data import pack, read_rows
from twotower.model.cache import ContextView
from twotower.objective import (
    Noise,
    ar_first,
    context_features,
    layout_offset,
    masked_loss_sum,
    sample_noise,
    training_hidden,
    training_logits,
)
from twotower.train import TrainConfig, load_config, train, trainable_parameters

S, BLOCKS = 4, 3


def _sequences(batch: int, layout: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, BLOCKS * S + layout_offset(layout)), generator=g)


# --- the objective --------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "nemotron_h"])
@pytest.mark.parametrize("layout", ["shifted", "same-position"])
def test_training_pass_equals_the_generation_pass_of_every_block(denoiser_kind, layout, family):
    """The one-pass block-causal training forward gives, for every block, the logits that the
    generation-time denoiser pass gives on that block with the context cache of the clean
    tokens before it (same mask, positions and time conditioning; hybrid: the same Mamba
    states at the block boundary, the blocks folded into the batch)."""
    model = tiny_two_tower(denoiser_kind, layout, block_size=S, family=family)
    perturb_trained(model)
    ids = _sequences(2, layout)
    noise = sample_noise(2, BLOCKS, S, torch.Generator().manual_seed(1))
    logits, targets = training_logits(model, ids, noise)
    o = layout_offset(layout)
    for b in range(BLOCKS):
        block_inputs = torch.where(noise.masked[:, b], model.mask_token_id, ids[:, o + b * S : o + (b + 1) * S])
        if layout == "shifted":
            block_inputs = torch.cat([ids[:, b * S : b * S + 1], block_inputs[:, :-1]], dim=1)
        if b == 0:
            view = model.empty_context(2).view()
        else:
            view = ContextView(_context_kv(model, ids[:, : b * S]), torch.ones(2, b * S, dtype=torch.bool))
        expected = model.denoise(view, block_inputs, torch.full((2,), b * S), noise.t)
        torch.testing.assert_close(logits[:, b * S : (b + 1) * S], expected, rtol=1e-4, atol=1e-4)
        assert torch.equal(targets[:, b * S : (b + 1) * S], ids[:, o + b * S : o + (b + 1) * S])


def _context_kv(model, ids):
    cache, _ = model.context_prefill(ids, torch.ones_like(ids), logits=None)
    return cache.kv


@pytest.mark.parametrize("family", ["llama", "nemotron_h"])
def test_untrained_first_slot_of_every_block_is_the_ar_logit(denoiser_kind, family):
    model = tiny_two_tower(denoiser_kind, "shifted", block_size=S, family=family)
    ids = _sequences(3, "shifted")
    noise = sample_noise(3, BLOCKS, S, torch.Generator().manual_seed(2))
    logits, _ = training_logits(model, ids, noise)
    ar = model(ids)  # (B, T, V) AR logits
    for b in range(BLOCKS):
        torch.testing.assert_close(logits[:, b * S], ar[:, b * S], rtol=1e-4, atol=1e-4)


def test_masking_rate_matches_t():
    noise = sample_noise(4000, 8, 16, torch.Generator().manual_seed(0), t_min=1e-3)
    rate = noise.masked.float().mean(dim=(1, 2))  # per sequence
    assert noise.t.min() >= 1e-3 and noise.t.max() <= 1
    assert (rate - noise.t).abs().mean() < 0.04  # binomial(128, t) noise: sd <= 0.045
    assert abs(rate.mean() - noise.t.mean()) < 0.005
    for low in (0.0, 0.5):  # both halves of the t range
        band = (noise.t >= low) & (noise.t < low + 0.5)
        assert abs(rate[band].mean() - noise.t[band].mean()) < 0.01


def test_masked_loss_at_t_one_is_plain_cross_entropy():
    model = tiny_two_tower("lora", "shifted", block_size=S)
    perturb_trained(model)
    ids = _sequences(2, "shifted")
    everything = Noise(torch.ones(2), torch.ones(2, BLOCKS, S, dtype=torch.bool))
    loss_sum, count = masked_loss_sum(model, ids, everything)
    logits, targets = training_logits(model, ids, everything)
    assert count == 2 * BLOCKS * S
    torch.testing.assert_close(loss_sum / count, F.cross_entropy(logits.flatten(0, 1), targets.flatten()))
    nothing = Noise(torch.full((2,), 1e-3), torch.zeros(2, BLOCKS, S, dtype=torch.bool))
    assert masked_loss_sum(model, ids, nothing)[1] == 0


def test_training_sequence_length_is_checked():
    model = tiny_two_tower("lora", "shifted", block_size=S)
    with pytest.raises(TwoTowerError, match="n\\*S \\+ 1"):
        training_logits(model, _sequences(1, "same-position"), sample_noise(1, BLOCKS, S))


# --- data -------------------------------------------------------------------------------------


def _write_data(path, rows=60, seed=0):
    """Learnable chat rows: the reply continues a counting pattern started in the prompt."""
    g = torch.Generator().manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(rows):
            start = int(torch.randint(3, 60, (1,), generator=g))
            prompt = " ".join(f"w{start + k}" for k in range(3))
            reply = " ".join(f"w{start + 3 + k}" for k in range(10))
            f.write(json.dumps({"id": i, "prompt": prompt, "response": reply}) + "\n")
    return path


def test_packing_refuses_heldout_prompts_and_reads_formats(tmp_path):
    from twotower.data import heldout_prompts

    rows = read_rows(_write_data(tmp_path / "d.jsonl", rows=10))
    held = sorted(heldout_prompts())[0]
    rows.append({"prompt": held.upper(), "response": "w5"})
    packed = pack(rows, tiny_tokenizer(), seq_len=9, heldout=heldout_prompts())
    assert packed.refused == 1 and packed.rows == 10
    assert packed.sequences.shape[1] == 9 and len(packed.sequences) == (10 * 17) // 9  # 17 tokens per row
    with pytest.raises(TwoTowerError, match="does not exist"):
        read_rows(tmp_path / "missing.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(TwoTowerError, match="unknown data format"):
        read_rows(tmp_path / "d.csv")
    with pytest.raises(TwoTowerError, match="needs 'prompt' and 'response'"):
        pack([{"question": "x"}], tiny_tokenizer(), seq_len=4)


def test_several_data_files_are_read_in_order_and_max_rows_counts_them_together(tmp_path):
    from twotower.data import read_sources

    first = read_rows(_write_data(tmp_path / "a.jsonl", rows=5))
    (tmp_path / "b").mkdir()
    second = [{"prompt": f"q{i}", "response": f"r{i}"} for i in range(4)]
    (tmp_path / "b" / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in second))
    both = f"{tmp_path / 'a.jsonl'}, {tmp_path / 'b' / 'b.jsonl'}"
    assert read_sources(both) == first + second
    assert read_sources(both, max_rows=7) == first + second[:2]
    assert read_sources(both, max_rows=3) == first[:3]
    assert read_sources(str(tmp_path / "a.jsonl")) == first
    with pytest.raises(TwoTowerError, match=r"missing\.jsonl does not exist"):  # named after max_rows is reached too
        read_sources(f"{tmp_path / 'a.jsonl'},{tmp_path / 'missing.jsonl'}", max_rows=2)
    with pytest.raises(TwoTowerError, match="names no data"):
        read_sources(" , ")
    commas = tmp_path / "a,b.jsonl"  # a path that exists as given is one source, commas and all
    commas.write_text((tmp_path / "a.jsonl").read_text())
    assert read_sources(str(commas)) == first


# --- the trainer ------------------------------------------------------------------------------


def _config(tmp_path, **overrides):
    values = dict(
        data=str(_write_data(tmp_path / "data.jsonl")),
        out=str(tmp_path / "run"),
        block_size=S,
        blocks_per_sequence=BLOCKS,
        batch_size=4,
        lr=3e-3,
        warmup_steps=2,
        max_steps=6,
        eval_every=0,
        eval_sequences=2,
        save_every=2,
        lora_rank=4,
    )
    values.update(overrides)
    return TrainConfig(**values)


def _model(kind="lora", seed=0, family="llama"):
    return tiny_two_tower(kind, "shifted", block_size=S, seed=seed, family=family)


def test_loss_falls(tmp_path):
    config = _config(tmp_path, max_steps=40, eval_every=20, lr=3e-3, warmup_steps=4, denoiser="full", nfe_prompts=2)
    state = train(config, _model("full"), tiny_tokenizer(), progress=False)
    first, last = sum(state["losses"][:5]) / 5, sum(state["losses"][-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert state["eval_losses"][-1][1] < state["eval_losses"][0][1]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 41)) and "eval_loss" in log[19]
    assert [tokens for tokens, _ in state["nfe_curve"]] == [20 * 4 * 13, 40 * 4 * 13]  # training tokens
    assert all(tpn > 0 for _, tpn in state["nfe_curve"])
    assert (tmp_path / "run" / "final" / "denoiser.safetensors").is_file()


@pytest.mark.parametrize("family", ["llama", "nemotron_h"])
def test_frozen_tower_unchanged_every_trainable_parameter_moved(tmp_path, denoiser_kind, family):
    model = _model(denoiser_kind, family=family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {id(p) for p in trainable_parameters(model)}
    names = {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in trainable}
    train(_config(tmp_path, max_steps=4, denoiser=denoiser_kind), model, tiny_tokenizer(), progress=False)
    after = model.state_dict()
    assert not any(k.startswith("context_tower") for k in names)
    for key, value in before.items():
        if key in names:
            assert not torch.equal(value, after[key]), f"{key} did not move"
        else:
            assert torch.equal(value, after[key]), f"{key} changed but is not trained"
    assert all(not p.requires_grad for p in model.context_tower.parameters())


def test_killed_run_resumes_to_the_same_losses(tmp_path):
    whole = train(_config(tmp_path / "a"), _model(), tiny_tokenizer(), progress=False)
    first = train(_config(tmp_path / "b"), _model(), tiny_tokenizer(), progress=False, stop_after=3)
    assert first["step"] == 3  # "killed" after step 3; the last checkpoint is step 2
    assert (tmp_path / "b" / "run" / "latest").read_text() == "step-2"
    fresh = _model()  # a new process: the model is rebuilt, the trained state comes from the checkpoint
    resumed = train(_config(tmp_path / "b"), fresh, tiny_tokenizer(), progress=False)
    assert resumed["step"] == 6
    assert resumed["losses"] == whole["losses"]
    log = [json.loads(line)["step"] for line in (tmp_path / "b" / "run" / "log.jsonl").read_text().splitlines()]
    assert log == list(range(1, 7))


def test_resume_refuses_a_run_with_other_settings(tmp_path):
    train(_config(tmp_path, max_steps=2), _model(), tiny_tokenizer(), progress=False)
    with pytest.raises(TwoTowerError, match="--seed 0 -> 5"):
        train(_config(tmp_path, max_steps=4, seed=5), _model(), tiny_tokenizer(), progress=False)


def test_gradient_accumulation_gives_the_same_update(tmp_path):
    """1x8, 2x4 and 4x2 micro-batches: the same gradient (its norm, which Adam's update would
    hide) and the same AdamW update (the first Adam step is about
    lr * sign(grad), so a gradient within rounding of zero may flip one element: the tolerance
    is 0.5% of the lr-sized step)."""
    flat = lambda model: torch.cat([p.detach().flatten() for p in trainable_parameters(model)])
    start = flat(_model())
    updates, norms = [], []
    for accum in (1, 2, 4):
        model = _model()
        train(
            _config(tmp_path / str(accum), batch_size=8, grad_accum=accum, max_steps=1, warmup_steps=1),
            model,
            tiny_tokenizer(),
            progress=False,
        )
        updates.append(flat(model) - start)
        log = json.loads((tmp_path / str(accum) / "run" / "log.jsonl").read_text())
        norms.append(log["grad_norm"])
    assert norms[1] == pytest.approx(norms[0], rel=1e-5) and norms[2] == pytest.approx(norms[0], rel=1e-5)
    assert updates[0].abs().max() > 1e-3  # lr = 3e-3: a real step
    for other in updates[1:]:
        torch.testing.assert_close(other, updates[0], rtol=0, atol=1.5e-5)


def test_nan_loss_stops_clearly_without_saving(tmp_path, monkeypatch):
    import twotower.train as trainer

    real = trainer.masked_loss_sum
    calls = {"n": 0}

    def poisoned(model, ids, noise, *rest):
        loss, count = real(model, ids, noise, *rest)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] > 3 else loss), count

    monkeypatch.setattr(trainer, "masked_loss_sum", poisoned)
    with pytest.raises(TwoTowerError, match="loss is nan at step 4"):
        train(_config(tmp_path), _model(), tiny_tokenizer(), progress=False)
    assert (tmp_path / "run" / "latest").read_text() == "step-2"


def test_config_yaml_flags_and_bad_options(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("lr: 0.001\nmax_steps: 10\ndata: x.jsonl\n")
    config = load_config(str(preset), {"max_steps": 3})
    assert config.lr == 0.001 and config.max_steps == 3
    with pytest.raises(TwoTowerError, match="unknown training option"):
        load_config(None, {"data": "x", "learning_rate": 1})
    with pytest.raises(TwoTowerError, match="not a multiple of grad_accum"):
        load_config(None, {"data": "x", "batch_size": 6, "grad_accum": 4})
    with pytest.raises(TwoTowerError, match="give a training data file"):
        load_config(None, {})


def test_cli_trains_from_a_backbone_folder_and_the_result_generates(tmp_path, capsys):
    from twotower import generate_mask_diffusion
    from twotower.cli import main
    from twotower.model.two_tower import TwoTowerForCausalLM

    folder = tmp_path / "backbone"
    tiny_backbone().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    data = _write_data(tmp_path / "data.jsonl")
    args = [
        "train",
        "--data",
        str(data),
        "--model",
        str(folder),
        "--out",
        str(tmp_path / "run"),
        "--block-size",
        "4",
        "--blocks-per-sequence",
        "3",
        "--batch-size",
        "2",
        "--max-steps",
        "2",
        "--save-every",
        "1",
        "--eval-sequences",
        "2",
        "--lora-rank",
        "2",
        "--no-adaln",
    ]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 2 and summary["training_tokens"] == 2 * 2 * 13
    trained = TwoTowerForCausalLM.from_pretrained(tmp_path / "run" / "final", backbone=str(folder), dtype=torch.float32)
    assert trained.config.block_size == 4 and not trained.config.adaln
    assert generate_mask_diffusion(trained, [[5, 6, 7]], max_new_tokens=8).new_tokens == 8
    assert main(["train", "--data", str(data), "--batch-size", "3", "--grad-accum", "2"]) == 2


# --- twotower distill -------------------------------------------------------------------------


def test_distill_is_seeded_resumable_and_keeps_heldout_prompts_out(tmp_path, monkeypatch):
    import twotower.distill as distill_module
    from twotower.distill import distill

    model, tok = tiny_two_tower(block_size=S), tiny_tokenizer()
    options = dict(rows=12, batch_size=4, seed=3, max_prompt_tokens=5, max_answer_tokens=6, progress=False)
    whole = distill(model, tok, tmp_path / "a.jsonl", **options)
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert whole["rows"] == 12 == len(rows) and [r["id"] for r in rows] == list(range(1, 13))
    assert all(r["prompt"] and r["response_tokens"] <= 6 for r in rows)
    assert len({r["prompt"] for r in rows}) == 12
    # an answer is AR mode's greedy reply to the prompt under the chat template
    from twotower.text import encode_prompt

    expected = generate_ar(model, [encode_prompt(tok, rows[0]["prompt"], chat=True)], max_new_tokens=6, eos_token_id=[1]).tokens[
        0
    ]
    assert rows[0]["response"] == tok.decode(expected, skip_special_tokens=True)

    # killed in the middle of writing a batch: a cut line at the end, resumed with the same command
    partial = tmp_path / "b.jsonl"
    distill(model, tok, partial, **{**options, "rows": 5})
    partial.write_text(partial.read_text() + '{"id": 6, "prom')
    with pytest.raises(TwoTowerError, match="batch_size 4 -> 2"):  # other batches would sample other rows
        distill(model, tok, partial, **{**options, "batch_size": 2})
    distill(model, tok, partial, **options)
    assert partial.read_text() == (tmp_path / "a.jsonl").read_text()

    # a prompt that is a held-out evaluation prompt never gets in
    banned = normalise_prompt(rows[2]["prompt"])
    monkeypatch.setattr(distill_module, "heldout_prompts", lambda: {banned})
    result = distill(model, tok, tmp_path / "c.jsonl", **options)
    kept = [json.loads(line)["prompt"] for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert all(normalise_prompt(p) != banned for p in kept) and result["skipped"]["heldout"] >= 1


def test_distill_batches_sample_their_user_turns_from_noise_of_their_own(monkeypatch):
    """Each row of a batch samples its user turn from a seed no row of another batch uses: with
    the task verbs made alike, consecutive batches would otherwise repeat each other's turns."""
    import twotower.distill as distill_module

    monkeypatch.setattr(distill_module, "TASK_VERBS", ("Write",))
    model, tok = tiny_two_tower(block_size=S), tiny_tokenizer()
    sampling = dict(max_new_tokens=8, temperature=1.0, top_p=0.95)
    header = "<user>"
    batches = [distill_module.ask_users(model, tok, header, [1], k, 4, 3, sampling) for k in range(3)]
    turns = [t for batch in batches for t in batch]
    assert len(set(turns)) == len(turns) == 12
    other = distill_module.ask_users(model, tok, header, [1], 0, 8, 4, sampling)  # another seed and batch size
    assert not set(other) & set(turns)
    assert batches[0] == distill_module.ask_users(model, tok, header, [1], 0, 4, 3, sampling)  # still a function of (seed, batch)


def test_distill_to_token_shards_resumes_and_feeds_training(tmp_path):
    """A folder output: rows.jsonl as the JSONL output, plus token shards of every row's
    chat-formatted ids that training reads without tokenising; a run stopped early (here by
    its row target, as a time limit would) and resumed gives the same shards."""
    from twotower.data import TokenShards, row_tokens
    from twotower.distill import distill

    model, tok = tiny_two_tower(block_size=S), tiny_tokenizer()
    options = dict(batch_size=4, seed=3, max_prompt_tokens=5, max_answer_tokens=6, progress=False, shard_rows=5)
    whole = distill(model, tok, tmp_path / "a", rows=12, **options)
    assert whole["tokens_per_second"] > 0 and whole["complete"]
    shards = TokenShards(tmp_path / "a")
    assert shards.dtype == torch.uint16 and [s["rows"] for s in shards.index["shards"]] == [5, 5, 2]
    rows = read_rows(tmp_path / "a")
    assert len(rows) == 12 and all(r["ids"] == row_tokens({k: r[k] for k in ("prompt", "response")}, tok) for r in rows)
    distill(model, tok, tmp_path / "b", rows=7, **options)
    distill(model, tok, tmp_path / "b", rows=12, **options)
    assert read_rows(tmp_path / "b") == rows
    for name in ("shard-00000.safetensors", "shard-00002.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    packed = pack(rows, tok, seq_len=9)
    assert torch.equal(packed.sequences, pack(read_rows(tmp_path / "a" / "rows.jsonl"), tok, seq_len=9).sequences)


def normalise_prompt(text):
    from twotower.data import normalise

    return normalise(text)


def test_distill_needs_a_chat_template():
    from twotower.distill import distill

    tok = tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(TwoTowerError, match="chat template"):
        distill(tiny_two_tower(block_size=S), tok, "unused.jsonl", rows=1, progress=False)


# --- training that costs only the denoiser: cached frozen-tower features -----------------------


def _shallow_model(kind="lora", family="llama", **config):
    from twotower import TwoTowerForCausalLM

    backbone = tiny_backbone(family, **({} if family == "nemotron_h" else {"num_hidden_layers": 3}))
    return TwoTowerForCausalLM.from_backbone(backbone, denoiser=kind, block_size=S, lora_rank=4, denoiser_depth=2, **config)


@pytest.mark.parametrize("family", ["llama", "nemotron_h"])
@pytest.mark.parametrize("shallow", [False, True, "fused"])
def test_cached_features_give_the_same_loss_and_gradient(tmp_path, family, shallow):
    """One step on features read back from disk equals the step that runs the frozen tower:
    the same loss (masked CE plus the distillation term) and the same gradient (fused: the
    anchors hold a second depth, the fusion's input)."""
    from twotower.features import build_features
    from twotower.objective import ar_first

    fused = {"fuse_layers": [0]} if shallow == "fused" else {}
    model = _shallow_model("lora", family, **fused) if shallow else _model("lora", family=family)
    perturb_trained(model)
    ids = _sequences(5, "shifted")
    noise = ar_first(sample_noise(5, BLOCKS, S, torch.Generator().manual_seed(3)))
    store = build_features(model, ids, tmp_path / "features", S, top_k=8, batch_size=2, shard_size=3, progress=False)
    assert len(store) == 5 and store.complete and len(store.index["shards"]) == 2

    def loss_and_grad(features, kl_weight):
        model.zero_grad()
        loss, count = masked_loss_sum(model, ids, noise, features, kl_weight=kl_weight, top_k=8)
        loss.backward()
        return loss.detach(), count, [p.grad.clone() for p in trainable_parameters(model)]

    read_ids, features = store.batch(range(5), model)
    assert torch.equal(read_ids, ids)
    direct = loss_and_grad(None, 0.5)
    cached = loss_and_grad(features, 0.5)
    assert direct[1] == cached[1] > 0
    torch.testing.assert_close(cached[0], direct[0], rtol=1e-4, atol=1e-4)
    for g_cached, g_direct in zip(cached[2], direct[2], strict=True):
        torch.testing.assert_close(g_cached, g_direct, rtol=1e-3, atol=1e-5)
    hard = loss_and_grad(None, 0.0)[0]
    assert direct[0] > hard  # the distillation term adds a cross-entropy against the teacher


def test_features_of_other_settings_are_refused(tmp_path):
    from twotower.features import build_features

    model = _model()
    build_features(model, _sequences(3, "shifted"), tmp_path / "f", S, top_k=4, progress=False)
    with pytest.raises(
        TwoTowerError,
        match=r"^--features .*f holds features made for other data or settings \(other data\): "
        r"sequences 3 -> 4, sequences_sha256 \w+ -> \w+; give another --features folder, --features auto",
    ):
        build_features(model, _sequences(4, "shifted"), tmp_path / "f", S, top_k=4, progress=False)
    with pytest.raises(TwoTowerError, match=r"settings: top_k 4 -> 8;"):
        build_features(model, _sequences(3, "shifted"), tmp_path / "f", S, top_k=8, progress=False)


def test_an_interrupted_feature_build_resumes(tmp_path, monkeypatch):
    import twotower.features as features

    model = _model()
    ids = _sequences(7, "shifted")
    whole = features.build_features(model, ids, tmp_path / "a", S, top_k=4, shard_size=2, progress=False)
    real, calls = features.save_file, {"n": 0}

    def dies_on_the_third_shard(tensors, path):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real(tensors, path)

    monkeypatch.setattr(features, "save_file", dies_on_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        features.build_features(model, ids, tmp_path / "b", S, top_k=4, shard_size=2, progress=False)
    monkeypatch.setattr(features, "save_file", real)
    assert len(features.FeatureStore(tmp_path / "b")) == 4
    resumed = features.build_features(model, ids, tmp_path / "b", S, top_k=4, shard_size=2, progress=False)
    a, b = whole.batch(range(7), model)[1], resumed.batch(range(7), model)[1]
    assert resumed.complete and torch.equal(a.teacher.ids, b.teacher.ids)
    for x, y in zip(a.view.kv, b.view.kv, strict=True):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])


@pytest.mark.parametrize("shallow", [False, True])
def test_training_on_cached_features_equals_training_without(tmp_path, shallow):
    """The same run with and without a features folder: the same losses (fp32), and a run on
    features killed and resumed repeats the uninterrupted one."""
    build = (lambda: _shallow_model()) if shallow else (lambda: _model())
    extra = dict(kl_weight=0.5, top_k=8, eval_every=3)
    plain = train(_config(tmp_path / "a", **extra), build(), tiny_tokenizer(), progress=False)
    cached = train(_config(tmp_path / "b", features=str(tmp_path / "feat"), **extra), build(), tiny_tokenizer(), progress=False)
    assert cached["losses"] == pytest.approx(plain["losses"], rel=1e-4)
    assert cached["eval_losses"][-1][1] == pytest.approx(plain["eval_losses"][-1][1], rel=1e-4)
    assert cached["masked_tokens"] == plain["masked_tokens"] > 0
    train(
        _config(tmp_path / "c", features=str(tmp_path / "feat"), **extra), build(), tiny_tokenizer(), progress=False, stop_after=3
    )
    resumed = train(_config(tmp_path / "c", features=str(tmp_path / "feat"), **extra), build(), tiny_tokenizer(), progress=False)
    assert resumed["losses"] == cached["losses"]


def test_shallow_training_moves_every_trainable_parameter_and_keeps_the_tower(tmp_path, denoiser_kind):
    model = _shallow_model(denoiser_kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {id(p) for p in trainable_parameters(model)}
    names = {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in trainable}
    train(
        _config(tmp_path, max_steps=4, denoiser=denoiser_kind, features=str(tmp_path / "f")),
        model,
        tiny_tokenizer(),
        progress=False,
    )
    after = model.state_dict()
    for key, value in before.items():
        if key in names:
            assert not torch.equal(value, after[key]), f"{key} did not move"
        else:
            assert torch.equal(value, after[key]), f"{key} changed but is not trained"
    assert model.config.trained_tokens == 4 * 4 * (BLOCKS * S + 1)


def test_a_run_from_a_trained_model_counts_the_tokens_it_had_seen(tmp_path):
    """A checkpoint gone on from had seen its trained_tokens: the run's checkpoints record those
    plus the run's own, also after a resume."""
    model = _model()
    model.config.trained_tokens = 1000
    train(_config(tmp_path, max_steps=2), model, tiny_tokenizer(), progress=False)
    own = 2 * 4 * (BLOCKS * S + 1)
    saved = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert saved["trained_tokens"] == 1000 + own
    again = _model()
    again.config.trained_tokens = 1000
    train(_config(tmp_path, max_steps=3, extend=True), again, tiny_tokenizer(), progress=False)
    assert json.loads((tmp_path / "run" / "final" / "config.json").read_text())["trained_tokens"] == 1000 + own * 3 // 2


def test_sparse_cross_entropy_is_the_weighted_cross_entropy_and_its_gradient():
    from twotower.objective import sparse_cross_entropy

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 11, dtype=torch.double, generator=g, requires_grad=True)  # two row chunks
    idx = torch.randint(0, 11, (300, 3), generator=g)
    weights = torch.rand(300, 3, dtype=torch.double, generator=g)
    expected = -(weights * logits.log_softmax(-1).gather(1, idx)).sum()
    torch.testing.assert_close(sparse_cross_entropy(logits, idx, weights), expected)
    small = logits[:7].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: sparse_cross_entropy(x, idx[:7], weights[:7]), (small,))
    (grad,) = torch.autograd.grad(sparse_cross_entropy(logits, idx, weights), logits)
    (reference,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(grad, reference)


def test_a_time_limited_run_stops_with_a_checkpoint_and_resumes(tmp_path):
    """max_minutes: the step that passes the limit ends the call, with a checkpoint of that
    step; the same command goes on and repeats the uninterrupted losses (the GPU script's
    steps of a few minutes)."""
    whole = train(_config(tmp_path / "a"), _model(), tiny_tokenizer(), progress=False)
    first = train(_config(tmp_path / "b", max_minutes=1e-9), _model(), tiny_tokenizer(), progress=False)
    assert first["step"] == 1 and (tmp_path / "b" / "run" / "latest").read_text() == "step-1"
    resumed = train(_config(tmp_path / "b"), _model(), tiny_tokenizer(), progress=False)
    assert resumed["losses"] == whole["losses"]


def test_slot_decay_weighs_each_target_by_its_slot_at_the_same_loss_scale(monkeypatch):
    """slot_decay d: a masked target at slot j of its block weighs d ** j, the weights scaled to
    a mean of 1 over the batch's targets (hard targets and, with kl_weight, the teacher's alike);
    d = 1 leaves every weight 1."""
    import twotower.objective as objective

    model = tiny_two_tower("lora", "shifted", block_size=S)
    ids = _sequences(2, "shifted")
    noise = ar_first(sample_noise(2, BLOCKS, S, torch.Generator().manual_seed(4)))
    seen = []
    real = objective.sparse_cross_entropy
    monkeypatch.setattr(objective, "sparse_cross_entropy", lambda logits, idx, w: seen.append(w) or real(logits, idx, w))
    plain, count = masked_loss_sum(model, ids, noise)
    decayed, count_decayed = masked_loss_sum(model, ids, noise, slot_decay=0.5)
    slot = torch.arange(S).expand(2, BLOCKS, S)[noise.masked]
    expected = 0.5 ** slot.float()
    assert count == count_decayed and len(set(slot.tolist())) > 2
    assert torch.equal(seen[0], torch.ones(count, 1))
    torch.testing.assert_close(seen[1][:, 0], expected / expected.mean())
    assert not torch.isclose(plain, decayed)
    from twotower.train import Objective

    held_out = Objective(model, slot_decay=0.5)(ids, noise.t, noise.masked, weighted=False)[0]  # the eval loss
    assert torch.equal(held_out, plain)


def test_a_draft_vocabulary_loss_is_the_cross_entropy_over_its_tokens_and_skips_the_others():
    """vocab: the head's logits over those tokens only; a masked target outside them is neither
    scored nor counted, the teacher's tokens outside them weigh nothing; inside, the loss is
    the cross-entropy of the softmax over the vocabulary's tokens (hard and teacher targets)."""
    model = tiny_two_tower("lora", "shifted", block_size=S)
    ids = _sequences(2, "shifted")
    noise = ar_first(sample_noise(2, BLOCKS, S, torch.Generator().manual_seed(4)))
    features = context_features(model, ids, BLOCKS, S, top_k=4)
    hidden, targets, _ = training_hidden(model, ids, noise, features)
    scored = noise.masked.reshape(targets.shape)
    present = targets[scored].unique()
    vocab = torch.cat([present[::2], torch.tensor([VOCAB - 1, VOCAB - 2])]).unique()  # half the targets, and two others
    kept = scored & torch.isin(targets, vocab)
    assert 0 < int(kept.sum()) < int(scored.sum())
    for kl in (0.0, 0.5):
        loss, count = masked_loss_sum(model, ids, noise, features, kl_weight=kl, top_k=4, vocab=vocab)
        logp = model.denoiser_logits(hidden)[..., vocab].log_softmax(-1)  # (B, n*S, N)
        place = {int(v): i for i, v in enumerate(vocab)}
        expected = 0.0
        for b, i in kept.nonzero().tolist():
            expected -= float(logp[b, i, place[int(targets[b, i])]].detach())
            for tok, lp in zip(features.teacher.ids[b, i].tolist(), features.teacher.logp[b, i].tolist()):
                if kl and tok in place:
                    expected -= kl * math.exp(lp) * float(logp[b, i, place[tok]].detach())
        assert count == int(kept.sum())
        assert float(loss.detach()) == pytest.approx(expected, rel=1e-4)


def test_a_run_saves_its_draft_vocabulary_and_trains_over_it(tmp_path):
    """Every checkpoint carries the training tokens by frequency (verify's --draft-vocab reads
    them); --draft-vocab N trains the head over the N most frequent only (fewer targets counted
    than with the whole vocabulary), and the run resumes with it."""
    from twotower.model import draft_vocab as dv

    whole = train(_config(tmp_path / "a", max_steps=2), _model(), tiny_tokenizer(), progress=False)
    saved = dv.load(tmp_path / "a" / "run" / "final")
    assert saved is not None and saved.total > 0 and saved.counts.tolist() == sorted(saved.counts.tolist(), reverse=True)
    small = train(_config(tmp_path / "b", max_steps=2, draft_vocab=6), _model(), tiny_tokenizer(), progress=False)
    assert small["masked_tokens"] < whole["masked_tokens"]
    assert dv.load(tmp_path / "b" / "run" / "final").ids.tolist() == saved.ids.tolist()
    head_vocab = [json.loads((tmp_path / r / "run" / "final" / "config.json").read_text())["head_vocab"] for r in "ab"]
    assert head_vocab == [0, 6]  # the head it was trained over: every mode reads those tokens only
    with pytest.raises(TwoTowerError, match="draft-vocab 6 -> 0"):
        train(_config(tmp_path / "b", max_steps=3, extend=True), _model(), tiny_tokenizer(), progress=False)
    with pytest.raises(TwoTowerError, match="draft_vocab"):
        TrainConfig(data="x", draft_vocab=-1).validate()


def test_two_builds_of_one_features_folder_at_once_run_the_tower_once(tmp_path, monkeypatch):
    """A second run started while the first builds the same features folder waits for it and
    reads its shards, instead of writing the same files beside it."""
    import threading

    from twotower import features

    model, ids = _model(), _sequences(6, "shifted")
    calls, real = [], features.context_features

    def counted(*args, **kwargs):
        calls.append(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(features, "context_features", counted)
    stores = [None, None]

    def build(i):
        stores[i] = features.build_features(model, ids, tmp_path / "f", S, top_k=4, batch_size=2, shard_size=2, progress=False)

    features.build_features(model, ids, tmp_path / "alone", S, top_k=4, batch_size=2, shard_size=2, progress=False)
    alone, calls[:] = len(calls), []
    threads = [threading.Thread(target=build, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == alone >= 3 and len(set(calls)) == 1  # one build's passes, all by one builder
    assert all(s is not None and len(s) == 6 and s.complete for s in stores)
    assert torch.equal(stores[0].batch(range(6), model)[0], stores[1].batch(range(6), model)[0])
