"""Bad generation input gets a clear TwoTowerError before any forward pass."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, tiny_two_tower

from twotower import TwoTowerError, generate_ar, generate_mask_diffusion, generate_mock_ar
from twotower.generate.common import left_pad


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(block_size=0), "block_size must be"),
        (dict(block_size=-3), "block_size must be"),
        (dict(block_size=16), "larger than the block size the denoiser was trained for"),
        (dict(threshold=0.0), r"threshold must be in \(0, 1\]"),
        (dict(threshold=1.5), r"threshold must be in \(0, 1\]"),
        (dict(threshold=float("nan")), "threshold"),
        (dict(steps_per_block=0), "steps_per_block must be"),
        (dict(max_new_tokens=0), "max_new_tokens must be"),
        (dict(temperature=-1.0), "temperature must be"),
        (dict(top_p=0.0), "top_p must be"),
        (dict(thresold=0.5), "unknown generation option"),
        (dict(seed=2**64, temperature=1.0), "seed must be an integer that fits in 64 bits"),
    ],
)
def test_bad_diffusion_options(options, match):
    model = tiny_two_tower(block_size=8)
    with pytest.raises(TwoTowerError, match=match):
        generate_mask_diffusion(model, PROMPTS, **options)


def test_prompt_longer_than_the_context():
    model = tiny_two_tower()  # max_position_embeddings=256
    with pytest.raises(TwoTowerError, match="longer than the backbone's context"):
        generate_ar(model, [[5] * 300])
    with pytest.raises(TwoTowerError, match="lower max_new_tokens to at most 56"):
        generate_mask_diffusion(model, [[5] * 200], max_new_tokens=100)


def test_malformed_prompts():
    model = tiny_two_tower()
    with pytest.raises(TwoTowerError, match="left-padded"):
        generate_ar(model, torch.tensor([[5, 6, 0]]), torch.tensor([[1, 1, 0]]))
    with pytest.raises(TwoTowerError, match="at least one token"):
        generate_ar(model, [[5, 6], []])
    with pytest.raises(TwoTowerError, match="outside the backbone's vocabulary"):
        generate_ar(model, [[5, 6, 10_000]])
    for bad in ("w5 w6", [["w5"]], [1.5, 2.0], None):
        with pytest.raises(TwoTowerError, match="input_ids must be token ids"):
            generate_ar(model, bad)
    with pytest.raises(TwoTowerError, match="does not apply"):
        generate_mock_ar(model, PROMPTS, block_size=4)


def test_tokenizer_output_is_accepted():
    """What a tokenizer returns (a mapping with input_ids / attention_mask) works as is."""
    model = tiny_two_tower()
    expected = generate_ar(model, PROMPTS[:2], max_new_tokens=6).tokens
    ids, mask = left_pad(PROMPTS[:2], pad_id=0)
    assert generate_ar(model, {"input_ids": ids.tolist(), "attention_mask": mask.tolist()}, max_new_tokens=6).tokens == expected
    assert generate_ar(model, {"input_ids": PROMPTS[0]}, max_new_tokens=6).tokens == expected[:1]
