"""Weight-only int8 / int4 linear layers (twotower/quant.py) on tiny random models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import PROMPTS, tiny_two_tower
from torch import nn

from twotower import quant
from twotower.config import TwoTowerError
from twotower.generate import generate_ar, generate_verify
from twotower.generate.common import left_pad
from twotower.quant import GROUP, QUANTISED_ROWS, Int4Linear, Int8Linear, quantize_linears


def grouped_4bit_linear(n: int = 48, k: int = 96, seed: int = 0) -> tuple[nn.Linear, torch.Tensor]:
    """A linear layer whose weights are exactly 4-bit codes times a per-group scale plus a
    per-group offset (the GGUF's Q4_1 form), every code 0 and 15 present in each group."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k // GROUP, GROUP), generator=g)
    q[..., 0], q[..., 1] = 0, 15
    scale = 2.0 ** -torch.randint(3, 7, (n, k // GROUP, 1), generator=g).float()
    low = torch.randint(-64, 0, (n, k // GROUP, 1), generator=g).float() / 64
    weight = (q * scale + low).view(n, k)
    linear = nn.Linear(k, n, bias=False)
    linear.weight.data = weight.clone()
    return linear, weight


def test_int4_holds_grouped_4bit_weights_exactly_and_computes_with_them():
    linear, weight = grouped_4bit_linear()
    quantized = Int4Linear(linear)
    assert torch.equal(quantized.dequantized(), weight)
    x = torch.randn(1, QUANTISED_ROWS, 96)  # the quantised weights
    assert torch.allclose(quantized(x), x @ weight.T, atol=1e-4)


def test_passes_of_more_rows_use_the_dense_weights_and_fewer_the_quantised_ones():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    for kind in (Int8Linear, Int4Linear):
        quantized = kind(linear)
        wide, narrow = torch.randn(QUANTISED_ROWS + 1, 64), torch.randn(QUANTISED_ROWS, 64)
        assert torch.equal(quantized(wide), linear(wide)), kind.__name__
        assert not torch.allclose(quantized(narrow), linear(narrow), atol=1e-6), kind.__name__
        assert quantized.dense_weight.data_ptr() == linear.weight.data_ptr()  # no copy of the dense weights


def test_int4_and_int8_are_close_to_dense_on_random_weights_and_keep_the_bias():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    x = torch.randn(3, 64)
    dense = linear(x)
    for kind, tolerance in ((Int8Linear, 0.01), (Int4Linear, 0.1)):
        out = kind(linear)(x)
        assert out.shape == dense.shape
        assert (out - dense).norm() / dense.norm() < tolerance, kind.__name__
    bias_only = nn.Linear(64, 48)
    bias_only.weight.data.zero_()
    assert torch.allclose(Int8Linear(bias_only)(x), bias_only.bias.expand(3, -1))


def test_quantize_linears_replaces_every_linear_and_falls_back_to_int8_off_the_group():
    block = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 16), nn.Linear(32, 8)))
    assert quantize_linears(block, "int4") == 4
    kinds = [type(m).__name__ for m in block.modules() if "Int" in type(m).__name__]
    assert kinds == ["Int4Linear", "Int4Linear", "Int8Linear", "Int8Linear"]  # 16 inputs, then 8 outputs: no int4 kernel
    with pytest.raises(TwoTowerError, match="unknown weight format"):
        quantize_linears(block, "int2")


@pytest.mark.parametrize("family", ["llama", "nemotron_h"])
@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantised_model_stays_close_to_dense_and_its_verify_equals_its_ar(family, weights, monkeypatch):
    """With every pass on the quantised weights (a wide verify pass would otherwise take the
    dense ones, which differ from 4-bit random weights by far more than a near-tie)."""
    monkeypatch.setattr(quant, "QUANTISED_ROWS", 10**6)
    dense = tiny_two_tower(family=family)
    model = tiny_two_tower(family=family).quantize(weights)
    assert model.weights == weights
    assert not any(isinstance(m, nn.Linear) for m in model.context_tower.model.layers.modules())
    ids, mask = left_pad(PROMPTS, 0)
    with torch.no_grad():
        a, b = dense(ids, mask), model(ids, mask)
    assert ((a - b).norm() / a.norm()) < (0.02 if weights == "int8" else 0.3)  # 4 bits of random normal weights
    with torch.no_grad():  # transformers' own forward (its generate, which bench times) runs on the same weights
        hf = model.context_tower(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(hf[mask.bool()], b[mask.bool()], atol=1e-4)
    ar = generate_ar(model, ids, mask, max_new_tokens=12)
    assert generate_verify(model, ids, mask, max_new_tokens=12, draft="lookup").tokens == ar.tokens
    # The denoiser reads its logits over the head's dense weights (over a block's rows they are
    # the cheaper), the context tower over the quantised ones (a one-row pass's logits, bit for bit).
    head = model.context_tower.lm_head
    hidden = torch.randn(2, 8, head.in_features)
    with torch.no_grad():
        assert torch.equal(model.denoiser_logits(hidden)[..., : head.out_features], F.linear(hidden, head.dense_weight).float())
        assert torch.equal(model.ar_logits(hidden[:1, :1], "last"), head.quantised_mm(hidden[0, :1]).float())


def test_a_quantised_model_refuses_to_save(tmp_path):
    model = tiny_two_tower().quantize("int8")
    with pytest.raises(TwoTowerError, match="quantised"):
        model.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())
