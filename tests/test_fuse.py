"""`inference.fuse`: the projections of one input stacked into one matmul, for generation."""

from __future__ import annotations

import os
import sys
import weakref

import pytest
import torch
from conftest import PROMPTS, perturb_trained, tiny_two_tower
from test_shallow import block_logits, shallow

from twotower.backbones.base import release_file_pages
from twotower.config import TwoTowerError
from twotower.generate import generate_ar, generate_verify
from twotower.generate.common import left_pad


def context_logits(model):
    ids, mask = left_pad(PROMPTS, 0)
    with torch.no_grad():
        return model(ids, mask), model.context_tower(input_ids=ids, attention_mask=mask).logits, mask.bool()


def test_fusing_stacks_each_layers_projections_of_one_input_over_the_same_weights():
    """Every layer holds q, k, v and gate, up as one linear layer each; the projections it
    replaces in our passes stay for transformers' forward, as views of the stack (no copy), and
    both forwards give the logits of the unfused model."""
    model, reference = tiny_two_tower(), tiny_two_tower()
    before, _, mask = context_logits(reference)
    assert model.fuse() is model and model.fused
    for layer in model.context_tower.model.layers:
        for parent, fused, names in ((layer.self_attn, "qkv_proj", ("q_proj", "k_proj", "v_proj")),
                                     (layer.mlp, "gate_up_proj", ("gate_proj", "up_proj"))):  # fmt: skip
            stacked = getattr(parent, fused)
            assert stacked.sizes == [getattr(parent, n).out_features for n in names]
            assert torch.equal(stacked.weight, torch.cat([getattr(parent, n).weight for n in names]))
            for name in names:
                assert getattr(parent, name).weight.untyped_storage().data_ptr() == stacked.weight.untyped_storage().data_ptr()
    ours, hf, _ = context_logits(model)
    assert torch.allclose(ours[mask], before[mask], atol=1e-5)
    assert torch.allclose(hf[mask], before[mask], atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_fused_models_verify_is_its_ar_with_the_denoisers_drafts(dtype):
    """The merged shallow denoiser's layers are fused too; its block logits stay the unfused
    ones', and verify with its drafts stays AR's output token for token."""
    reference = shallow("llama", 4, 2)
    perturb_trained(reference)
    model = shallow("llama", 4, 2)
    model.load_state_dict(reference.state_dict())
    reference.merge_adapters()
    model.merge_adapters().fuse()
    assert all(hasattr(layer.mlp, "gate_up_proj") for layer in model.denoiser.denoiser_layers)
    assert torch.allclose(block_logits(model), block_logits(reference), atol=1e-4)
    model.to(dtype)
    ar = generate_ar(model, PROMPTS, max_new_tokens=12)
    assert generate_verify(model, PROMPTS, max_new_tokens=12, draft="denoiser").tokens == ar.tokens
    assert generate_verify(model, PROMPTS[:1], max_new_tokens=12, draft="denoiser").tokens == ar.tokens[:1]


def _views_of_the_stack(parent, fused, names, weight="weight") -> bool:
    """Each projection's weights are its rows of the stack, in the stack's own storage."""
    stack, first = getattr(getattr(parent, fused), weight), 0
    for name in names:
        own = getattr(getattr(parent, name), weight)
        if own.untyped_storage().data_ptr() != stack.untyped_storage().data_ptr():
            return False
        if not torch.equal(own, stack[first : first + own.shape[0]]):
            return False
        first += own.shape[0]
    return first == stack.shape[0]


@pytest.mark.parametrize("weights", ["dense", "int8"])
def test_a_fused_model_moved_or_cast_keeps_each_weight_once(weights):
    """`.to(dtype)` copies every tensor, a view apart from the stack it views: afterwards each
    projection is a view of its stack again (merged denoiser layers included), and the moved
    model computes what a model cast before fusing computes."""
    reference = shallow("llama", 4, 2)
    perturb_trained(reference)
    model = shallow("llama", 4, 2)
    model.load_state_dict(reference.state_dict())
    model.merge_adapters().fuse().quantize(weights)
    reference.merge_adapters().to(torch.float64).fuse().quantize(weights)
    model.to(torch.float64)
    kind = "weight" if weights == "dense" else "dense_weight"
    for layers in (model.context_tower.model.layers, model.denoiser.denoiser_layers):
        for layer in layers:
            assert _views_of_the_stack(layer.self_attn, "qkv_proj", ("q_proj", "k_proj", "v_proj"), kind)
            assert _views_of_the_stack(layer.mlp, "gate_up_proj", ("gate_proj", "up_proj"), kind)
    if weights == "dense":  # the quantised kernels take no float64 input; the views are what is checked there
        ours, hf, mask = context_logits(model)
        theirs, hf_reference, _ = context_logits(reference)
        assert torch.equal(ours, theirs) and torch.equal(
            hf[mask], hf_reference[mask]
        )  # hf: transformers' forward, over the views
        assert torch.equal(block_logits(model), block_logits(reference))
    else:  # the int8 head tied to the embedding reads the embedding's weights, not a copy
        head, embedding = model.context_tower.lm_head.dense_weight, model.context_tower.get_input_embeddings().weight
        assert head.untyped_storage().data_ptr() == embedding.untyped_storage().data_ptr()


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantising_a_fused_model_quantises_its_stacks(weights):
    """quantize reuses the stacks fuse made: the same quantised weights, bit for bit, as
    quantising the model unfused (which stacks them itself)."""
    fused = tiny_two_tower().fuse().quantize(weights)
    plain = tiny_two_tower().quantize(weights)
    assert type(fused.context_tower.model.layers[0].self_attn.qkv_proj) is type(
        plain.context_tower.model.layers[0].self_attn.qkv_proj
    )
    assert torch.equal(context_logits(fused)[0], context_logits(plain)[0])


def test_a_fused_model_refuses_to_save_and_a_family_without_fusions_is_left_alone(tmp_path):
    with pytest.raises(TwoTowerError, match="fused"):
        tiny_two_tower().fuse().save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())
    hybrid = tiny_two_tower(family="nemotron_h")
    compiled = hybrid.step_layers = object()  # stands for compiled passes: nothing stacked keeps them
    assert not hybrid.fuse().fused  # its projections of one input are one matmul already (in_proj)
    assert hybrid.step_layers is compiled
    fused = tiny_two_tower().fuse()
    fused.step_layers = compiled
    assert fused.fuse().fused and fused.step_layers is compiled  # fused again: nothing new stacked
    unfused = tiny_two_tower()
    unfused.step_layers = compiled
    assert unfused.fuse().step_layers is None  # new stacks: graphs would hold the old tensors
    with pytest.raises(TwoTowerError, match="before quantising or fusing"):  # the stacks would keep the unmerged weights
        shallow("llama", 4, 2).fuse().merge_adapters()


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/maps")
def test_the_pages_of_replaced_weights_read_from_a_file_are_given_back_and_nothing_else(tmp_path):
    """A weight transformers mapped from a safetensors file (a part of the file's mapping),
    once stacked, no longer needs the pages the copy read: they are released when nobody holds
    the tensor, and the file's bytes are still there for the rest of the mapping; a tensor still
    held, or one in anonymous memory, keeps its memory."""
    file = tmp_path / "weights.bin"
    values = torch.arange(4 * 65536, dtype=torch.float32)
    file.write_bytes(values.numpy().tobytes())
    mapping = torch.from_file(str(file), shared=False, size=values.numel(), dtype=torch.float32)
    half = values.numel() // 2

    def entry(t):
        return weakref.ref(t), t.data_ptr(), t.nbytes

    held, anonymous = mapping[:half], values.clone()
    assert release_file_pages([entry(held), entry(anonymous)]) == 0
    dropped = entry(mapping[half:])  # the view dies at once
    assert release_file_pages([dropped]) >= half * 4 - 2 * os.sysconf("SC_PAGE_SIZE")
    assert torch.equal(mapping, values) and torch.equal(anonymous, values)
