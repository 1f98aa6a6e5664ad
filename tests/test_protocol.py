"""The decoders need nothing of a model but `DecodingModel`: a fake with fixed logits drives AR
mode, and a stand-in that holds only the protocol's names over a tiny model gives that model's
tokens in every mode."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import EOS, PROMPTS, perturb_trained, tiny_two_tower

from twotower import generate, generate_ar
from twotower.model.layout import BlockLayout
from twotower.model.protocol import DecodingModel

PROTOCOL = {
    "config",
    "layout",
    "num_embeddings",
    "mask_token_id",
    "max_context",
    "context_device",
    "denoiser_device",
    "exact_rows",
    "verifies_trees",
    "context_prefill",
    "context_extend",
    "denoise_block",
    "draft_head",
}


class NextIdModel:
    """A stand-in with fixed logits: after token i the next one is i + 1 (mod V), for sure. Its
    cache is each row's last token."""

    config = SimpleNamespace(block_size=4)
    layout = BlockLayout("shifted")
    num_embeddings = mask_token_id = 32
    max_context = 64
    context_device = denoiser_device = torch.device("cpu")
    exact_rows = None
    verifies_trees = False

    def _logits(self, last: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot((last + 1) % self.num_embeddings, self.num_embeddings).float() * 10  # (B, V)

    def context_prefill(self, input_ids, attention_mask, logits="last"):
        cache = {"last": input_ids[:, -1].clone()}
        return cache, self._logits(cache["last"]) if logits == "last" else None

    def context_extend(self, cache, tokens, logits=None, exact=False):
        cache["last"] = tokens[:, -1]
        return self._logits(cache["last"]) if logits == "last" else None

    def denoise_block(self, reads, block, t=None, slots=None, causal=False, head=None, first=0):
        raise AssertionError("AR mode never runs the denoiser")

    def draft_head(self, size):
        raise AssertionError("AR mode never drafts")


class OnlyTheProtocol:
    """A model seen through `DecodingModel` only: any other attribute is missing."""

    def __init__(self, model):
        for name in PROTOCOL:
            setattr(self, name, getattr(model, name))


def test_the_protocol_lists_what_decoders_call():
    members = set(DecodingModel.__annotations__)
    members |= {n for n, v in vars(DecodingModel).items() if not n.startswith("_") and (callable(v) or isinstance(v, property))}
    assert members == PROTOCOL
    assert isinstance(NextIdModel(), DecodingModel) and isinstance(tiny_two_tower(), DecodingModel)


def test_a_fake_with_fixed_logits_drives_the_ar_decoder():
    fake = NextIdModel()
    result = generate_ar(fake, [[3, 4], [10]], max_new_tokens=5)
    assert result.tokens == [[5, 6, 7, 8, 9], [11, 12, 13, 14, 15]]
    assert result.context_passes == 5  # the prefill, then one pass per token but the last
    stopped = generate_ar(fake, [[3, 4], [10]], max_new_tokens=5, eos_token_id=7)
    assert stopped.tokens == [[5, 6, 7], [11, 12, 13, 14, 15]]


@pytest.mark.parametrize("mode", ["ar", "mock-ar", "diffusion", "verify"])
def test_a_stand_in_holding_only_the_protocol_gives_the_models_tokens(mode):
    model = tiny_two_tower()
    perturb_trained(model)
    options = dict(max_new_tokens=12, eos_token_id=EOS)
    if mode == "diffusion":
        options.update(threshold=0.3, temperature=0.8, seed=2)
    assert generate(OnlyTheProtocol(model), mode, PROMPTS, **options).tokens == generate(model, mode, PROMPTS, **options).tokens
