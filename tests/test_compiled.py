"""Compiled context passes (`compile_steps`, twotower/backbones/graphs.py): each position gets the
same logits at any width of the pass, so verify mode over them is compiled AR token for token;
they stay within bf16 rounding of the eager passes; fp32 and anything that fails run eagerly."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import PROMPTS, perturb_trained, tiny_two_tower

from twotower import generate_ar, generate_verify
from twotower.backbones.graphs import close
from twotower.generate.common import left_pad

needs_compiler = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler")


def _bf16_model(family="llama", weights="dense"):
    model = tiny_two_tower(family=family, block_size=8)
    perturb_trained(model)
    return model.to(torch.bfloat16).quantize(weights)


def _steps(model, compiled, n=12):
    """Logits of a ragged batch's prefill and n greedy one-position passes."""
    model.step_layers = compiled
    ids, mask = left_pad(PROMPTS, 0)
    cache, logits = model.context_prefill(ids, mask)
    out = [logits]
    for _ in range(n):
        logits = model.context_extend(cache, logits.argmax(-1)[:, None], logits="last")
        out.append(logits)
    return torch.stack(out)


def _graphs(compiled) -> list:
    return [*compiled.inputs.graphs.values(), *compiled.output.graphs.values()]


def _used(compiled) -> bool:
    graphs = _graphs(compiled)
    return bool(graphs) and all(g is not None for g in graphs)


@needs_compiler
@pytest.mark.parametrize(("family", "weights"), [("llama", "dense"), ("qwen3", "dense"), ("llama", "int4")])
def test_a_wide_compiled_pass_gives_each_position_a_compiled_steps_logits(family, weights):
    """Teacher-forced: one compiled pass over 6 positions (exact attention, as verify's at batch
    1) equals 6 compiled one-position steps bit for bit, and both stay within bf16 rounding of
    the eager passes."""
    model = _bf16_model(family, weights)
    assert model.compile_steps()
    prompt, follow = torch.tensor([PROMPTS[2]]), torch.tensor([[30, 31, 32, 33, 34, 35]])
    ones = torch.ones_like(prompt)
    with torch.inference_mode():
        cache, _ = model.context_prefill(prompt, ones)
        steps = torch.cat([model.context_extend(cache, follow[:, i : i + 1], logits="all") for i in range(6)], dim=1)
        cache, _ = model.context_prefill(prompt, ones)
        wide = model.context_extend(cache, follow, logits="all", exact=True)
        assert _used(model.step_layers)  # the graphs ran (none fell back)
        assert torch.equal(wide, steps)
        compiled, eager = _steps(model, model.step_layers), _steps(model, None)
    assert close(compiled, eager, tolerance=2**-4)


@needs_compiler
@pytest.mark.parametrize("weights", ["dense", "int4"])
def test_verify_over_compiled_passes_is_compiled_ar_token_for_token(weights):
    model = _bf16_model(weights=weights)
    model.compile_steps()
    for prompt in PROMPTS:
        ar = generate_ar(model, [prompt], max_new_tokens=40).tokens
        for draft in ("denoiser", "lookup", "auto"):
            assert generate_verify(model, [prompt], max_new_tokens=40, draft=draft).tokens == ar, (prompt, draft)
    assert _used(model.step_layers)
    assert any(key[1][0][0][1] > 1 for key in model.step_layers.output.graphs)  # wider passes ran compiled too


@needs_compiler
def test_warm_steps_compiles_every_width_before_generation_needs_it():
    model = _bf16_model()
    model.compile_steps()
    model.warm_steps((1,))
    warmed = len(_graphs(model.step_layers))
    assert warmed == 2 * (model.compiled_positions + 1)  # the two pieces, at each width 1..block + 1, and an AR step
    generate_verify(model, [PROMPTS[0]], max_new_tokens=24, draft="lookup")
    generate_ar(model, [PROMPTS[0]], max_new_tokens=8)
    assert len(_graphs(model.step_layers)) == warmed  # nothing left to compile at batch 1
    quantised = _bf16_model(weights="int4")
    quantised.compile_steps()
    quantised.warm_steps((1, 2), positions=3)
    assert len(_graphs(quantised.step_layers)) == 2 * (3 + 1 + 3)  # each batch size and width, over int4 or dense rows


def test_fp32_and_a_failed_compile_run_eagerly(monkeypatch):
    model = tiny_two_tower()
    with torch.inference_mode():
        eager = _steps(model, None, n=4)
        with pytest.warns(UserWarning, match="bf16 / fp16 only; this model is torch.float32"):
            model.compile_steps()
        assert torch.equal(_steps(model, model.step_layers, n=4), eager)  # fp32: not compiled
    assert all(g is None for g in model.step_layers.output.graphs.values())

    def fails(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch._inductor, "compile", fails)
    _assert_falls_back_to_eager("could not be compiled .*no compiler here.*run eagerly")


def _assert_falls_back_to_eager(warning: str):
    """A bf16 model whose graphs fail (as torch._inductor.compile is patched by the caller) warns
    once and gives the eager logits. Returns its compiled layers."""
    model = _bf16_model()
    with torch.inference_mode():
        eager = _steps(model, None, n=4)
        model.compile_steps()
        with pytest.warns(UserWarning, match=warning):
            assert torch.equal(_steps(model, model.step_layers, n=4), eager)
    return model.step_layers


def test_a_graph_off_by_more_than_rounding_runs_eagerly(monkeypatch):
    """The first call of each shape is checked against the eager function: a graph whose results
    are wrong (here: scaled by 1.5) is dropped, with a warning, and the pass is the eager one."""
    compile_graph = torch._inductor.compile

    def wrong(graph, inputs):
        compiled = compile_graph(graph, inputs)
        scale = lambda out: out * 1.5 if isinstance(out, torch.Tensor) else type(out)(scale(o) for o in out)
        return lambda *args: scale(compiled(*args))

    monkeypatch.setattr(torch._inductor, "compile", wrong)
    compiled = _assert_falls_back_to_eager("differ from the eager pass .* by more than rounding")
    assert all(g is None for g in _graphs(compiled))


def test_close_tells_rounding_from_a_wrong_result():
    x = torch.randn(4, 64).to(torch.bfloat16)
    nudged = x.clone()
    nudged.view(torch.int16)[0, 0] += 1  # the next bf16 value: one rounding away
    assert close(nudged, x) and close((nudged, x), (x, x))
    assert not close(x * 1.5, x) and not close(x.float(), x) and not close(x[:2], x)
    outlier = x.clone()
    outlier[:, 3] = 180.0  # one channel of the size real hidden states reach
    quiet = outlier.clone()
    quiet[:, 4:] *= 1.5  # every other channel wrong: still a wrong graph
    assert not close(quiet, outlier) and not close(outlier.flip(0), outlier)  # nor rows swapped


@needs_compiler
def test_moving_or_casting_a_compiled_model_compiles_again():
    """The graphs hold the layers' tensors: after .to() or place_towers_on_devices the model
    gets fresh ones, and its passes read the new tensors."""
    model = tiny_two_tower(block_size=8)
    perturb_trained(model)
    model.compile_steps()
    first = model.step_layers
    model.to(torch.bfloat16)
    assert model.step_layers is not None and model.step_layers is not first
    fresh = model.step_layers
    with torch.inference_mode():
        eager = _steps(model, None)
        assert close(_steps(model, fresh), eager, tolerance=2**-4)
    assert fresh.used()
    model.place_towers_on_devices("cpu", "cpu")
    assert model.step_layers is not None and model.step_layers is not fresh


def test_compiled_steps_are_dropped_by_quantize_and_absent_for_the_hybrid():
    model = tiny_two_tower()
    assert model.compile_steps() and model.step_layers is not None
    model.quantize("int8")
    assert model.step_layers is None  # its graphs held the dense layers' tensors
    hybrid = tiny_two_tower(family="nemotron_h")
    assert not hybrid.compile_steps() and hybrid.step_layers is None
    hybrid.warm_steps((1,))  # nothing to warm


@needs_compiler
@pytest.mark.parametrize("weights", ["dense", "int4"])
def test_a_merged_denoisers_pass_runs_compiled_within_rounding_and_verify_stays_compiled_ar(weights):
    """With compile_steps, a merged shallow denoiser's pass (verify's draft, diffusion's steps)
    runs through the same graphs as the context passes, with adaLN's modulation as an input of
    its own: within bf16 rounding of the eager pass, and verify over its drafts is still
    compiled AR."""
    from test_shallow import block_logits, shallow

    model = shallow("llama", 4, 2)
    perturb_trained(model)
    model = model.merge_adapters().to(torch.bfloat16).quantize(weights)
    eager = block_logits(model)
    model.compile_steps()
    model.warm_steps((1,))
    warmed = len(_graphs(model.step_layers))
    for prompt in PROMPTS:
        ar = generate_ar(model, [prompt], max_new_tokens=24).tokens
        assert generate_verify(model, [prompt], max_new_tokens=24, draft="denoiser").tokens == ar, prompt
    assert len(_graphs(model.step_layers)) == warmed  # warm_steps compiled the draft pass too
    compiled = block_logits(model)
    modulated = [key for key, graph in model.step_layers.inputs.graphs.items() if key[1][-1] is not None and graph]
    assert modulated, "no graph took the denoiser's modulation"
    assert close(compiled, eager, tolerance=2**-4)
