"""Hybrid Mamba-2 / attention / MoE backbones (transformers' nemotron_h) on a tiny random
config: what the Llama-family tests do not already cover when run on it (they are
parametrised with family="nemotron_h": extension = one pass, generate_ar = transformers,
mock-AR = AR, shifted first tokens, training pass = generation pass, verify = AR, cache
after a rejection, save/load, frozen tower)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import PROMPTS, perturb_trained, tiny_backbone, tiny_tokenizer, tiny_two_tower

from twotower import TwoTowerError, TwoTowerForCausalLM, generate_ar, generate_mask_diffusion, generate_mock_ar, generate_verify
from twotower.generate.common import left_pad
from twotower.model.cache import MambaState
from twotower.objective import layout_offset, sample_noise, training_logits


def _hybrid(kind="lora", **config):
    return tiny_two_tower(kind, family="nemotron_h", **config)


def _states(cache):
    return [e for e in cache.kv if isinstance(e, MambaState)]


def _assert_row_states(cache, row, alone):
    """Row `row` of a batched cache holds the Mamba states of `alone`, a one-row cache."""
    for got, ref in zip(_states(cache), _states(alone), strict=True):
        torch.testing.assert_close(got.conv[row], ref.conv[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.ssm[row], ref.ssm[0], atol=1e-5, rtol=1e-5)


LONG = 81  # tokens: ten scan chunks of 8 and one more


def test_long_prompt_matches_transformers_and_keeps_a_one_token_tail():
    """A prompt over several scan chunks: prefill scans it chunk by chunk and keeps only its
    last token's inputs to go back into; AR still equals transformers' greedy generate."""
    model = _hybrid()
    prompt = [3 + (7 * i) % 90 for i in range(LONG)]
    ids = torch.tensor([prompt])
    expected = model.context_tower.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None
    )[0, ids.shape[1] :]
    assert generate_ar(model, [prompt], max_new_tokens=12).tokens[0] == expected.tolist()
    cache, _ = model.context_prefill(ids, torch.ones_like(ids))
    assert {s.tail.x.shape[1] for s in _states(cache)} == {1}


@pytest.mark.parametrize("length", [4, LONG])
def test_view_without_the_last_token_equals_a_prefill_without_it(length):
    """The shifted layout's view: states before the last committed token, recomputed from the
    tail, equal a prefill that stops one token earlier (left-padded ragged batch)."""
    model = _hybrid()
    rows = [[3 + (5 * i + r) % 90 for i in range(length - r)] for r in range(3)]
    ids, mask = left_pad(rows, pad_id=0)
    cache, _ = model.context_prefill(ids, mask)
    shorter, _ = model.context_prefill(*left_pad([r[:-1] for r in rows], pad_id=0))
    view = cache.view(drop_last=True)
    for got, ref in zip([e for e in view.kv if isinstance(e, MambaState)], _states(shorter), strict=True):
        assert got.tail is None  # the denoiser only starts from the states
        torch.testing.assert_close(got.conv, ref.conv, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.ssm, ref.ssm, atol=1e-5, rtol=1e-5)


def test_left_padding_leaves_each_rows_states_as_alone():
    model = _hybrid()
    ids, mask = left_pad(PROMPTS, pad_id=0)
    batched, _ = model.context_prefill(ids, mask)
    for row, prompt in enumerate(PROMPTS):
        alone, _ = model.context_prefill(torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long))
        _assert_row_states(batched, row, alone)


def test_going_back_past_the_tail_is_refused():
    model = _hybrid()
    cache, _ = model.context_prefill(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long))
    model.context_extend(cache, torch.tensor([[8, 9]]))
    with pytest.raises(ValueError, match="at most 2 tokens"):
        cache.keep_new(5, torch.tensor([1]))


def test_verify_with_blocks_wider_than_the_scan_chunks():
    """Verify passes of k+1 = 41 tokens (five scan chunks) keep the whole pass to go back
    into: after a ragged rejection each row's states equal a prefill of its kept tokens, the
    view without each row's last token equals a prefill without it, and verify mode still
    reproduces AR exactly."""
    model = _hybrid(block_size=40)
    rows = [[5, 6, 7], [9, 10, 11]]
    cache, _ = model.context_prefill(torch.tensor(rows), torch.ones(2, 3, dtype=torch.long))
    drafts = torch.tensor([[3 + (11 * i + r) % 90 for i in range(41)] for r in range(2)])
    model.context_extend(cache, drafts)
    keep = torch.tensor([1, 41])
    cache.keep_new(41, keep)
    for row in range(2):
        kept = torch.tensor([rows[row] + drafts[row, : keep[row]].tolist()])
        _assert_row_states(cache, row, model.context_prefill(kept, torch.ones_like(kept))[0])
    view = cache.view(drop_last=True)  # row 0 dropped its last slots: its last valid slot is masked instead
    for row in range(2):
        kept = rows[row] + drafts[row, : keep[row] - 1].tolist()
        shorter, _ = model.context_prefill(torch.tensor([kept]), torch.ones(1, len(kept), dtype=torch.long))
        assert int(view.valid[row].sum()) == len(kept)
        for got, ref in zip([e for e in view.kv if isinstance(e, MambaState)], _states(shorter), strict=True):
            torch.testing.assert_close(got.conv[row], ref.conv[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got.ssm[row], ref.ssm[0], atol=1e-5, rtol=1e-5)
    perturb_trained(model, scale=0.05)  # drafts that are partly wrong: rejections mid-pass
    ar = generate_ar(model, PROMPTS, max_new_tokens=60).tokens
    result = generate_verify(model, PROMPTS, max_new_tokens=60, draft="denoiser")
    assert result.tokens == ar


def test_moe_routing_is_deterministic_and_input_dependent():
    """Same inputs, same experts and bit-identical outputs, in the context tower and in the
    denoiser; a row gets the same routing alone as next to other rows; different tokens use
    different experts (the MoE layer is really exercised)."""
    model = _hybrid("full", block_size=4)
    perturb_trained(model)
    moe = next(layer.mixer for layer in model.context_tower.model.layers if layer.block_type == "moe")
    chosen = []
    moe.gate.register_forward_hook(lambda mod, args, out: chosen.append(out[2].clone()))
    ids, mask = left_pad(PROMPTS, pad_id=0)
    first = model(ids, mask)
    second = model(ids, mask)
    assert torch.equal(first, second) and torch.equal(chosen[0], chosen[1])
    assert len({tuple(sorted(c)) for c in chosen[0].tolist()}) > 1
    alone = model(ids[2:3], mask[2:3])
    torch.testing.assert_close(alone[0], first[2], atol=1e-5, rtol=1e-5)
    out = [generate_mask_diffusion(model, PROMPTS, max_new_tokens=8, block_size=4, threshold=0.3).tokens for _ in range(2)]
    assert out[0] == out[1]


def test_lora_and_adaln_cover_every_hybrid_layer():
    model = _hybrid("lora")
    kinds = [layer.block_type for layer in model.context_tower.model.layers]
    mamba, attention, feed_forward = ["in_proj", "out_proj"], ["k_proj", "o_proj", "q_proj", "v_proj"], ["down_proj", "up_proj"]
    assert kinds == ["linear_attention", "full_attention", "moe", "linear_attention", "mlp"]
    assert [sorted(adapters) for adapters in model.lora] == [mamba, attention, feed_forward, mamba, feed_forward]
    assert model.config.lora_targets == ["down_proj", "in_proj", "k_proj", "o_proj", "out_proj", "q_proj", "up_proj", "v_proj"]
    assert model.time_conditioning.layer_tables.shape == (len(kinds), 3, 64)  # one triple per layer
    with pytest.raises(TwoTowerError, match="name no projection"):
        _hybrid("lora", lora_targets=["gate_proj"])
    only_mamba = _hybrid("lora", lora_targets=["in_proj"])
    assert [sorted(a) for a in only_mamba.lora] == [["in_proj"], [], [], ["in_proj"], []]


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_trained_hybrid_denoiser_changes_diffusion_but_not_verify(kind):
    model = _hybrid(kind, block_size=4)
    ar = generate_ar(model, PROMPTS, max_new_tokens=16).tokens
    assert generate_mock_ar(model, PROMPTS, max_new_tokens=16).tokens == ar
    perturb_trained(model, scale=0.3)
    assert generate_mock_ar(model, PROMPTS, max_new_tokens=16).tokens != ar
    assert generate_verify(model, PROMPTS, max_new_tokens=16, draft="denoiser").tokens == ar


def test_moe_latent_projections_get_no_dead_adapters(tmp_path):
    """MoE layers with a latent projection (moe_latent_size): LoRA goes on the shared expert
    only (the latent projections run outside it); the model trains every adapter, saves and
    loads."""
    backbone = tiny_backbone("nemotron_h", moe_latent_size=16)
    model = TwoTowerForCausalLM.from_backbone(backbone, denoiser="lora", block_size=4, lora_rank=4)
    moe_layer = [layer.block_type for layer in backbone.model.layers].index("moe")
    assert sorted(model.lora[moe_layer]) == ["down_proj", "up_proj"]
    ids = torch.randint(3, 90, (2, 3 * 4 + layout_offset(model.config.layout)), generator=torch.Generator().manual_seed(0))
    perturb_trained(model)  # non-zero LoRA B and adaLN: every trained tensor gets a gradient
    logits, _ = training_logits(model, ids, sample_noise(2, 3, 4, torch.Generator().manual_seed(1)))
    logits.logsumexp(-1).mean().backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum()] == []
    model.save_pretrained(tmp_path)
    loaded = TwoTowerForCausalLM.from_pretrained(tmp_path, backbone=backbone)
    for name, tensor in model.denoiser.trained_state_dict().items():
        assert torch.equal(loaded.denoiser.trained_state_dict()[name], tensor), name
    assert generate_mock_ar(loaded, PROMPTS, max_new_tokens=8).tokens == generate_mock_ar(model, PROMPTS, max_new_tokens=8).tokens


def test_bf16_hybrid_keeps_the_ssm_state_in_fp32_and_follows_fp32():
    """bf16 weights, fp32 Mamba states: over a 200-token prompt (25 scan chunks) the bf16 AR
    logits stay within bf16 rounding of the fp32 model's (measured: 2.8% of the largest logit)."""
    model = _hybrid()
    prompt = torch.tensor([[3 + (7 * i) % 90 for i in range(200)]])
    _, reference = model.context_prefill(prompt, torch.ones_like(prompt))
    model.to(torch.bfloat16)
    cache, logits = model.context_prefill(prompt, torch.ones_like(prompt))
    assert all(s.ssm.dtype == torch.float32 for s in _states(cache))
    assert (logits - reference).abs().max() < 0.05 * reference.abs().max()
    assert generate_mask_diffusion(model, PROMPTS, max_new_tokens=8, block_size=4).new_tokens == 32


def test_cli_trains_and_generates_with_a_hybrid_folder(tmp_path, capsys):
    """A local nemotron_h folder (config + safetensors + tokenizer) through the command line:
    train a LoRA denoiser, then every generation mode from the checkpoint."""
    from test_train import _write_data

    from twotower.cli import main

    folder = tmp_path / "hybrid"
    tiny_backbone("nemotron_h").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()
    data = _write_data(tmp_path / "data.jsonl")
    assert (
        main(
            [
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
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 2
    checkpoint = tmp_path / "run" / "final"
    assert json.loads((checkpoint / "config.json").read_text())["backbone_config"]["model_type"] == "nemotron_h"
    texts = {}
    for mode in ["ar", "mock-ar", "diffusion", "verify"]:
        assert (
            main(
                [
                    "generate",
                    "--json",
                    "--dtype",
                    "fp32",
                    "--model",
                    str(checkpoint),
                    "--mode",
                    mode,
                    "--max-new-tokens",
                    "8",
                    "w5 w6 w7",
                ]
            )
            == 0
        )
        out = json.loads(capsys.readouterr().out)
        assert out["mode"] == mode and 1 <= out["new_tokens"] <= 8
        texts[mode] = out["text"]
    assert texts["verify"] == texts["ar"]


def test_bench_runs_every_mode_on_a_hybrid_and_notes_the_missing_hf_lookup():
    from twotower.eval.harness import AR, OperatingPoint, run_bench

    model = _hybrid(block_size=4)
    points = [AR, OperatingPoint("mock-ar"), OperatingPoint("diffusion", 4, 0.8), OperatingPoint("verify", 4, 0.8)]
    report = run_bench(model, PROMPTS, points, batch_sizes=(1, 4), max_new_tokens=8, progress=False)
    rows = {(r["point"], r["batch_size"]): r for r in report["rows"]}
    assert rows[("verify S=4 g=0.8", 4)]["exact_match_vs_ar"] == 1.0
    assert rows[("mock-ar", 1)]["exact_match_vs_ar"] == 1.0
    assert rows[("hf_generate", 1)]["tokens_per_second"] > 0 and ("hf_generate_lookup", 1) not in rows
    assert any("refuses stateful" in n for n in report["notes"])
