"""The library's front doors called as a user calls them, with their defaults, on the shipped
model (the default backbone with the denoiser that ships for it, whose trained block size is
not the block size a config defaults to). Marked slow; runs in CI."""

from __future__ import annotations

import json

import pytest

import twotower
from twotower import BenchOptions, EvalOptions, GenerationSettings, LoadOptions

pytestmark = pytest.mark.slow
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def shipped():
    model, tokenizer = twotower.load_model()
    return model, tokenizer, twotower.encode_prompt(tokenizer, QUESTION)


def test_every_generate_function_runs_with_its_defaults(shipped):
    model, tokenizer, ids = shipped
    eos = twotower.eos_token_ids(model, tokenizer)
    ar = twotower.generate_ar(model, [ids], eos_token_id=eos)
    assert "Paris" in tokenizer.decode(ar.tokens[0])
    for run in (twotower.generate_mock_ar, twotower.generate_mask_diffusion, twotower.generate_verify):
        result = run(model, [ids], eos_token_id=eos)
        assert 1 <= result.new_tokens <= GenerationSettings().max_new_tokens and result.nfe >= 1, run.__name__
    verify = twotower.generate(model, "verify", [ids], settings=GenerationSettings(eos_token_id=tuple(eos)))
    assert verify.tokens == ar.tokens  # verify is AR's output, through the settings object too
    events = list(twotower.stream(model, "ar", [ids], eos_token_id=eos, max_new_tokens=4))
    assert sum(len(e.tokens[0]) for e in events) == 4


def test_evaluate_runs_with_its_default_points(tmp_path, capsys):
    out = tmp_path / "eval.json"
    report = twotower.evaluate(LoadOptions(), EvalOptions(tasks_per_category=1, judge=False, progress=False, out=str(out)))
    points = [p["point"] for p in report["points"]]
    assert points[0] == "ar" and any(p.startswith("diffusion S=8") for p in points)  # the shipped block size
    assert json.loads(out.read_text())["points"] and "ar" in capsys.readouterr().out


def test_benchmark_runs_with_its_default_points(capsys):
    options = BenchOptions(num_prompts=1, max_new_tokens=8, batch_sizes=(1,), hf=False, llama_cpp=False, progress=False)
    report = twotower.benchmark(LoadOptions(), options)
    assert {r["point"] for r in report["rows"]} >= {"ar", "mock-ar"}
    assert all(r["tokens_per_second"] > 0 for r in report["rows"])
    assert "tok/s" in capsys.readouterr().out
