"""The real default backbone (SmolLM2-135M-Instruct, bf16). Marked slow; runs in CI."""

from __future__ import annotations

import shutil

import pytest
import torch

from twotower import (
    TwoTowerError,
    TwoTowerForCausalLM,
    generate_ar,
    generate_mask_diffusion,
    generate_mock_ar,
    load_backbone,
)
from twotower.backbones import convert_gguf, default_gguf_path
from twotower.cli import main
from twotower.generate.common import left_pad
from twotower.model.checkpoint import shipped_denoiser
from twotower.text import encode_prompt

pytestmark = pytest.mark.slow
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]


@pytest.fixture(scope="module")
def smol():
    backbone, tokenizer = load_backbone("default", torch.bfloat16)
    model = TwoTowerForCausalLM.from_backbone(backbone, tokenizer)
    prompts = [encode_prompt(tokenizer, q, chat=True) for q in QUESTIONS]
    return model, tokenizer, prompts


def test_ar_matches_transformers_greedy_generate(smol):
    model, tokenizer, prompts = smol
    ids, mask = left_pad(prompts, pad_id=tokenizer.pad_token_id)
    expected = model.context_tower.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=40,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=None,
    )[:, ids.shape[1] :].tolist()
    assert generate_ar(model, ids, mask, max_new_tokens=40).tokens == expected
    assert "Paris" in tokenizer.decode(expected[0])


def test_untrained_mock_ar_equals_ar_in_fp32():
    """Each mock-AR denoiser pass reads a block of several slots: in bf16 it may round a near-tie
    otherwise than a one-token AR step (as verify's passes at batch 8 do), so fp32 is the check."""
    backbone, tokenizer = load_backbone("default", torch.float32)
    model = TwoTowerForCausalLM.from_backbone(backbone, tokenizer)
    prompts = [encode_prompt(tokenizer, q, chat=True) for q in QUESTIONS]
    ar = generate_ar(model, prompts, max_new_tokens=32)
    assert generate_mock_ar(model, prompts, max_new_tokens=32).tokens == ar.tokens


def test_shifted_first_token_of_every_block_is_ar_choice(smol):
    model, _, prompts = smol
    out = generate_mask_diffusion(model, [prompts[1]], max_new_tokens=32, block_size=8).tokens[0]
    for start in range(0, len(out), 8):
        expected = generate_ar(model, [prompts[1] + out[:start]], max_new_tokens=1).tokens[0][0]
        assert out[start] == expected, start


def test_mask_token_colliding_with_a_real_token_names_it(smol):
    model, tokenizer, _ = smol
    with pytest.raises(TwoTowerError, match="collides with the real token"):
        TwoTowerForCausalLM.from_backbone(model.context_tower, tokenizer, mask_token_id=5)
    assert model.mask_token_id == len(tokenizer) == 49152


def test_gguf_is_converted_once():
    folder = convert_gguf(default_gguf_path(), torch.bfloat16)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert convert_gguf(default_gguf_path(), torch.bfloat16) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_prompt_longer_than_context_is_refused(smol):
    model, _, _ = smol
    with pytest.raises(TwoTowerError, match="longer than the backbone's context"):
        generate_ar(model, [[42] * 9000])


def test_cli_answers_the_main_command(capsys):
    """README's main command (verify mode on the default model, with the shipped denoiser when
    one ships) answers, and gives AR's answer."""
    assert main(["generate", "--mode", "verify", "--dtype", "fp32", "What is the capital of France?"]) == 0
    verify = capsys.readouterr().out
    assert main(["generate", "--dtype", "fp32", "What is the capital of France?"]) == 0
    assert "Paris" in verify and verify == capsys.readouterr().out


def test_judge_prefers_fluent_text():
    from twotower.eval.judge import Judge

    judge = Judge.load_default()
    fluent = "The ocean covers most of the Earth and is home to many kinds of fish, whales and plants."
    shuffled = "whales Earth of fish, many the covers plants. and kinds home most ocean The is to and of"
    assert judge.nll_per_token("Write about the ocean.", fluent) < judge.nll_per_token("Write about the ocean.", shuffled)


def test_eval_untrained_mock_ar_retains_everything_on_the_real_backbone(tmp_path, capsys):
    import json

    out = tmp_path / "eval.json"
    untrained = str(default_gguf_path())  # the bare backbone: an untrained (identity) denoiser
    argv = ["eval", "--model", untrained, "--modes", "mock-ar", "--tasks-per-category", "1", "--no-judge", "--dtype", "fp32"]
    assert main([*argv, "--out", str(out)]) == 0
    ar, mock = json.loads(out.read_text())["points"]
    assert ar["overall_accuracy"] > 0
    assert mock["retention"] == 1.0 and mock["exact_match"] == 1.0


def test_greedy_verify_equals_ar_in_fp32():
    """Verify mode is token-identical to AR on the real backbone (fp32; in bf16 a pass over
    several positions can round differently from a one-token pass, see docs/verify.md)."""
    from twotower import generate_verify

    backbone, tokenizer = load_backbone("default", torch.float32)
    model = TwoTowerForCausalLM.from_backbone(backbone, tokenizer)
    prompts = [encode_prompt(tokenizer, q, chat=True) for q in QUESTIONS[1:]]
    ar = generate_ar(model, prompts, max_new_tokens=32)
    for draft in ("auto", "denoiser"):
        result = generate_verify(model, prompts, max_new_tokens=32, draft=draft)
        assert result.tokens == ar.tokens, draft
        assert result.details["draft_sources"][draft if draft != "auto" else "denoiser"] > 0


@pytest.mark.skipif(shipped_denoiser() is None, reason="no trained denoiser ships in this checkout")
def test_the_shipped_denoiser_loads_and_diffusion_answers():
    """The denoiser in twotower/checkpoints/ matches the default backbone, is trained, and
    diffusion mode with it answers the main question (its first token of every block is AR's)."""
    from twotower import eos_token_ids, load_model

    model, tokenizer = load_model("default", dtype=torch.float32)
    assert model.config.trained_tokens > 0 and model.config.denoiser_depth is not None
    prompt = encode_prompt(tokenizer, QUESTIONS[0], chat=True)
    eos = eos_token_ids(model, tokenizer)
    out = generate_mask_diffusion(model, [prompt], max_new_tokens=32, threshold=0.8, eos_token_id=eos)
    assert "Paris" in tokenizer.decode(out.tokens[0])


def test_int4_holds_the_gguf_weights_exactly():
    """The default GGUF stores every linear projection as Q4_1: int4 in groups of 32 gives back
    its own weights (dequantised in fp32) exactly."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize
    from torch import nn

    from twotower.quant import Int4Linear

    reader = gguf.GGUFReader(default_gguf_path())
    tensors = [t for t in reader.tensors if t.tensor_type.name == "Q4_1"]
    assert len(tensors) == 210  # 7 projections x 30 layers
    for t in tensors[::29]:
        weight = torch.from_numpy(dequantize(t.data, t.tensor_type).astype(np.float32))  # (N, K)
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        linear.weight.data = weight
        assert torch.equal(Int4Linear(linear).dequantized(), weight), t.name


@pytest.fixture(scope="module")
def smol_int4(smol):
    backbone, _ = load_backbone("default", torch.bfloat16)
    return TwoTowerForCausalLM.from_backbone(backbone, smol[1]).quantize("int4")


def test_int4_weights_answer_as_the_dense_model(smol, smol_int4):
    """int4 (bf16) answers the main question, starts its reply as the dense model does, and its
    verify mode with lookup drafts answers too."""
    from twotower import generate_verify

    model, tokenizer, prompts = smol
    quantized = smol_int4
    ar = generate_ar(quantized, prompts, max_new_tokens=24)
    assert "Paris" in tokenizer.decode(ar.tokens[0])
    dense = generate_ar(model, prompts, max_new_tokens=24)
    assert ar.tokens[0][:6] == dense.tokens[0][:6]
    verify = generate_verify(quantized, prompts[:1], max_new_tokens=24, draft="lookup")
    assert "Paris" in tokenizer.decode(verify.tokens[0])


def test_int4_verify_at_batch_eight_is_ar_while_rows_finish_apart(smol, smol_int4):
    """Eight unpadded prompts (built-in facts questions of one length) whose replies end at
    different steps: int4 verify at batch 8, which has no room to draft within the rows int4
    serves, is AR's output token for token (a finished row keeps its pad token as in AR, so no
    hole turns the attention kernels to their masked form)."""
    from twotower import eos_token_ids, generate_verify
    from twotower.eval.tasks import builtin_tasks

    tokenizer = smol[1]
    prompts = [encode_prompt(tokenizer, t.prompt, chat=True) for t in builtin_tasks() if t.category == "facts"]
    length = max(set(map(len, prompts)), key=[len(p) for p in prompts].count)
    prompts = [p for p in prompts if len(p) == length][:8]
    assert len(prompts) == 8
    eos = eos_token_ids(smol_int4, tokenizer)
    ar = generate_ar(smol_int4, prompts, max_new_tokens=64, eos_token_id=eos)
    assert len({len(row) for row in ar.tokens}) > 1  # rows finish apart
    verify = generate_verify(smol_int4, prompts, max_new_tokens=64, eos_token_id=eos)
    assert verify.tokens == ar.tokens


def test_the_readme_library_example_runs(capsys):
    """The README's Library snippet, run as written: what a newcomer pastes first must work on
    the default model (it once passed a block size larger than the shipped denoiser's)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    library = readme.split("## Library", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", library, re.S).group(1)
    exec(compile(snippet, "README.md (Library)", "exec"), {})
    printed = capsys.readouterr().out
    assert "'mode': 'diffusion'" in printed and "'new_tokens'" in printed


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler")
@pytest.mark.parametrize("weights", ["dense", "int4"])
def test_compiled_verify_is_compiled_ar_on_real_hidden_states(weights):
    """On the real model's hidden states (values up to ~180), where a compiled norm rounds
    otherwise than the eager one now and then: a compiled pass over 8 positions gives each the
    logits of a compiled one-position step, teacher-forced, and verify is AR token for token."""
    from twotower import generate_verify, load_model

    model, tokenizer = load_model("default", dtype=torch.bfloat16, weights=weights, merge=True, compile_steps=True)
    model.warm_steps((1,))
    prompts = [encode_prompt(tokenizer, q, chat=True) for q in QUESTIONS[1:]]
    with torch.inference_mode():
        for prompt in prompts:
            ar = generate_ar(model, [prompt], max_new_tokens=40)
            assert generate_verify(model, [prompt], max_new_tokens=40).tokens == ar.tokens
            seq = torch.tensor([prompt + ar.tokens[0]])
            for start in range(len(prompt), len(prompt) + 32, 8):
                head, ones = seq[:, :start], torch.ones(1, start, dtype=torch.long)
                cache, _ = model.context_prefill(head, ones)
                steps = torch.cat(
                    [model.context_extend(cache, seq[:, i : i + 1], logits="all") for i in range(start, start + 8)], 1
                )
                cache, _ = model.context_prefill(head, ones)
                assert torch.equal(model.context_extend(cache, seq[:, start : start + 8], logits="all", exact=True), steps)


def test_a_conversion_finished_first_by_another_process_is_kept(tmp_path, monkeypatch):
    """Two commands started at once on a fresh machine both convert the GGUF; the one that
    finishes second keeps the first one's folder instead of failing on the rename."""
    import twotower.backbones as backbones

    done = convert_gguf(default_gguf_path(), torch.bfloat16)
    monkeypatch.setenv("TWOTOWER_CACHE", str(tmp_path))
    target = backbones._gguf_cache_folder(default_gguf_path(), torch.bfloat16)
    assert not target.exists()
    real = backbones.AutoTokenizer.from_pretrained

    def other_process_finishes_meanwhile(*args, **kwargs):
        shutil.copytree(done, target)
        return real(*args, **kwargs)

    monkeypatch.setattr(backbones.AutoTokenizer, "from_pretrained", other_process_finishes_meanwhile)
    assert convert_gguf(default_gguf_path(), torch.bfloat16) == target
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in done.iterdir())
    assert not list(tmp_path.joinpath("backbones").glob(".converting-*"))  # no temporary left
