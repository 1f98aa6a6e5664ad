"""Shallow denoisers: K layers aligned to layers of the frozen context tower, the anchor slot
reading the context tower's hidden state entering the first aligned layer."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, perturb_trained, tiny_backbone

from twotower import TwoTowerError, TwoTowerForCausalLM, generate_ar, generate_mask_diffusion, generate_mock_ar, generate_verify
from twotower.generate.common import left_pad
from twotower.model.cache import ContextView
from twotower.objective import ar_first, sample_noise, training_logits

# (family, layers of the tiny backbone, depths to test): the hybrid's top 2 layers are Mamba and
# MLP, its top 4 add MoE and attention.
DEPTHS = [("llama", 4, 1), ("llama", 4, 3), ("nemotron_h", 5, 2), ("nemotron_h", 5, 4)]


def shallow(family="llama", layers=4, depth=2, denoiser="lora", block_size=4, **config):
    overrides = {} if family == "nemotron_h" else {"num_hidden_layers": layers}
    backbone = tiny_backbone(family, **overrides)
    return TwoTowerForCausalLM.from_backbone(
        backbone, denoiser=denoiser, denoiser_depth=depth, block_size=block_size, lora_rank=4, **config
    )


@pytest.mark.parametrize(("family", "layers", "depth"), DEPTHS)
def test_the_denoiser_has_its_aligned_layers_only(denoiser_kind, family, layers, depth):
    model = shallow(family, layers, depth, denoiser_kind)
    assert model.denoiser.shallow and model.denoiser.aligned == list(range(layers - depth, layers))
    assert model.config.aligned_layers == model.denoiser.aligned
    assert model.time_conditioning.layer_tables.shape[0] == depth
    if denoiser_kind == "full":
        assert model.denoiser.backbone is model.context_tower and len(model.denoiser.denoiser_layers) == depth
        assert all(p.requires_grad for p in model.denoiser.denoiser_layers.parameters())
    else:
        assert len(model.lora) == depth
    assert all(not p.requires_grad for p in model.context_tower.parameters())
    trained = sum(t.numel() for t in model.denoiser.trained_state_dict().values())
    full_depth = TwoTowerForCausalLM.from_backbone(model.context_tower, denoiser=denoiser_kind, lora_rank=4)
    assert trained < sum(t.numel() for t in full_depth.denoiser.trained_state_dict().values())


@pytest.mark.parametrize(("family", "layers", "depth"), DEPTHS)
def test_untrained_shallow_denoiser_predicts_ar_at_the_anchor(denoiser_kind, family, layers, depth):
    """Identity adaLN for any t and an exact copy / zero LoRA: the anchor slot, fed the context
    tower's hidden state entering the first aligned layer, gives the AR logits there."""
    model = shallow(family, layers, depth, denoiser_kind)
    ids, mask = left_pad(PROMPTS, pad_id=0)
    cache, ar = model.context_prefill(ids, mask)
    block = torch.full((len(PROMPTS), 4), model.mask_token_id)
    block[:, 0] = ids[:, -1]
    with torch.no_grad():
        logits = model.denoise(
            cache.view(drop_last=True),
            block,
            cache.next_pos - 1,
            torch.tensor([1.0, 0.5, 0.25, 0.75]),
            anchor_hidden=cache.anchor_hidden,
        )
    torch.testing.assert_close(logits[:, 0], ar, rtol=1e-4, atol=1e-4)
    assert torch.equal(cache.anchor, ids[:, -1])


@pytest.mark.parametrize(("family", "layers", "depth"), DEPTHS)
def test_shallow_mock_ar_starts_blocks_with_ar_and_verify_equals_ar(denoiser_kind, family, layers, depth):
    """Mock-AR's other slots enter a shallow denoiser as token embeddings at an upper layer, so
    only a full-depth untrained denoiser is AR there; every block's first token is AR's."""
    from test_generation import assert_blocks_start_with_the_ar_token

    model = shallow(family, layers, depth, denoiser_kind)
    ar = generate_ar(model, PROMPTS, max_new_tokens=16).tokens
    assert_blocks_start_with_the_ar_token(model, PROMPTS, generate_mock_ar(model, PROMPTS, max_new_tokens=16))
    perturb_trained(model, scale=0.05)
    assert generate_mock_ar(model, PROMPTS, max_new_tokens=16).tokens != ar  # it is the denoiser that predicts
    for draft in ("denoiser", "auto"):
        assert generate_verify(model, PROMPTS, max_new_tokens=16, draft=draft).tokens == ar


@pytest.mark.parametrize(("family", "layers", "depth"), DEPTHS)
def test_shallow_diffusion_starts_every_block_with_the_ar_token(denoiser_kind, family, layers, depth):
    from test_generation import assert_blocks_start_with_the_ar_token

    model = shallow(family, layers, depth, denoiser_kind)
    perturb_trained(model, scale=0.05)
    options = dict(max_new_tokens=14, block_size=4, threshold=0.05)
    result = generate_mask_diffusion(model, PROMPTS, **options)
    assert_blocks_start_with_the_ar_token(model, PROMPTS, result)
    for b, prompt in enumerate(PROMPTS):  # rows of a batch end their blocks independently
        assert generate_mask_diffusion(model, [prompt], **options).tokens[0] == result.tokens[b]


@pytest.mark.parametrize(("family", "layers", "depth"), DEPTHS)
def test_shallow_training_pass_equals_the_generation_pass(denoiser_kind, family, layers, depth):
    """The one-pass training forward, block by block, equals the generation-time pass over the
    clean context before the block, with the anchor hidden state of a prefill."""
    assert_training_pass_is_the_generation_pass(shallow(family, layers, depth, denoiser_kind, block_size=4))


def assert_training_pass_is_the_generation_pass(model, s: int = 4, n: int = 3) -> None:
    perturb_trained(model)
    ids = torch.randint(3, 90, (2, n * s + 1), generator=torch.Generator().manual_seed(0))
    noise = ar_first(sample_noise(2, n, s, torch.Generator().manual_seed(1)))
    logits, _ = training_logits(model, ids, noise)
    for b in range(n):
        block = torch.where(noise.masked[:, b], model.mask_token_id, ids[:, 1 + b * s : 1 + (b + 1) * s])
        block = torch.cat([ids[:, b * s : b * s + 1], block[:, :-1]], dim=1)
        cache, _ = model.context_prefill(ids[:, : b * s + 1], torch.ones(2, b * s + 1, dtype=torch.long))
        view = cache.view(drop_last=True)
        expected = model.denoise(view, block, torch.full((2,), b * s), noise.t, anchor_hidden=cache.anchor_hidden)
        torch.testing.assert_close(logits[:, b * s : (b + 1) * s], expected, rtol=1e-4, atol=1e-4)


def test_the_anchor_follows_ragged_commits():
    """After a pass whose rows keep different numbers of tokens, each row's anchor (token and
    hidden state) is its last kept token's, as in a prefill of the kept tokens."""
    model = shallow("llama", 4, 2)
    rows = [[5, 6, 7], [9, 10, 11]]
    cache, _ = model.context_prefill(torch.tensor(rows), torch.ones(2, 3, dtype=torch.long))
    drafts = torch.tensor([[20, 21, 22, 23], [30, 31, 32, 33]])
    model.context_extend(cache, drafts)
    cache.keep_new(4, torch.tensor([1, 3]))
    for row, kept in enumerate([[5, 6, 7, 20], [9, 10, 11, 30, 31, 32]]):
        ref, _ = model.context_prefill(torch.tensor([kept]), torch.ones(1, len(kept), dtype=torch.long))
        assert int(cache.anchor[row]) == kept[-1]
        torch.testing.assert_close(cache.anchor_hidden[row], ref.anchor_hidden[0], rtol=1e-5, atol=1e-5)


def test_shallow_save_load_round_trip(tmp_path, denoiser_kind):
    model = shallow("llama", 4, 2, denoiser_kind)
    perturb_trained(model)
    model.save_pretrained(tmp_path)
    loaded = TwoTowerForCausalLM.from_pretrained(tmp_path, backbone=model.context_tower)
    assert loaded.denoiser.aligned == model.denoiser.aligned and loaded.denoiser.shallow
    for name, tensor in model.denoiser.trained_state_dict().items():
        assert torch.equal(loaded.denoiser.trained_state_dict()[name], tensor), name
    assert generate_mock_ar(loaded, PROMPTS, max_new_tokens=8).tokens == generate_mock_ar(model, PROMPTS, max_new_tokens=8).tokens


def test_spread_alignment_and_explicit_layers():
    model = shallow("llama", 4, 2, alignment="spread")
    assert model.denoiser.aligned == [1, 3]
    explicit = shallow("llama", 4, None, aligned_layers=[0, 2])
    assert explicit.denoiser.aligned == [0, 2] and explicit.denoiser.shallow
    assert generate_verify(explicit, PROMPTS, max_new_tokens=8).tokens == generate_ar(explicit, PROMPTS, max_new_tokens=8).tokens


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(denoiser_depth=5), "more than the backbone's 4 layers"),
        (dict(denoiser_depth=0), "denoiser_depth must be"),
        (dict(denoiser_depth=2, layout="same-position"), "needs layout='shifted'"),
        (dict(aligned_layers=[2, 1]), "ascending"),
        (dict(alignment="middle"), "alignment must be"),
    ],
)
def test_bad_depth_settings_are_refused(config, match):
    with pytest.raises(TwoTowerError, match=match):
        TwoTowerForCausalLM.from_backbone(tiny_backbone("llama", num_hidden_layers=4), **config)


def test_a_shallow_denoiser_needs_the_anchor_hidden_state():
    model = shallow("llama", 4, 2)
    cache, _ = model.context_prefill(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long))
    view = ContextView(cache.view(drop_last=True).states, torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(TwoTowerError, match="hidden state at the anchor"):
        model.denoise(view, torch.tensor([[7, model.mask_token_id]]), torch.tensor([2]))


def block_logits(model, t=(1.0, 0.5, 0.25, 0.75)):
    """The denoiser's logits over a block after each prompt (slot 0 the prompt's last token) at
    masking levels t, one per prompt."""
    ids, mask = left_pad(PROMPTS, pad_id=0)
    cache, _ = model.context_prefill(ids, mask)
    block = torch.full((len(PROMPTS), 4), model.mask_token_id)
    block[:, 0] = ids[:, -1]
    t = torch.tensor(t)
    with torch.no_grad():
        return model.denoise(cache.view(drop_last=True), block, cache.next_pos - 1, t, anchor_hidden=cache.anchor_hidden)


@pytest.mark.parametrize(("family", "layers", "depth"), DEPTHS)
def test_merged_adapters_give_the_lora_denoisers_output(family, layers, depth):
    """merge_adapters folds every adapter into a copy of its layer: the denoiser's logits and
    its mask-diffusion tokens are the LoRA denoiser's, the context tower is untouched, verify is AR."""
    model = shallow(family, layers, depth)
    perturb_trained(model)
    options = dict(max_new_tokens=12, block_size=4, threshold=0.3)
    lora_logits, lora_tokens = block_logits(model), generate_mask_diffusion(model, PROMPTS, **options).tokens
    lora_masked = block_logits(model, (1.0,) * 4)  # one level for every row: the merged denoiser keeps its modulation
    context = {k: v.clone() for k, v in model.context_tower.state_dict().items()}
    assert model.merge_adapters() is model
    assert model.denoiser.merged and model.lora is None and len(model.denoiser.denoiser_layers) == depth
    assert not any(p.requires_grad for p in model.denoiser.denoiser_layers.parameters())
    torch.testing.assert_close(block_logits(model), lora_logits, rtol=1e-4, atol=1e-4)
    for _ in range(2):  # computed, then kept
        torch.testing.assert_close(block_logits(model, (1.0,) * 4), lora_masked, rtol=1e-4, atol=1e-4)
    assert generate_mask_diffusion(model, PROMPTS, **options).tokens == lora_tokens
    assert all(torch.equal(v, context[k]) for k, v in model.context_tower.state_dict().items())
    assert (
        generate_verify(model, PROMPTS, max_new_tokens=12, draft="denoiser").tokens
        == generate_ar(model, PROMPTS, max_new_tokens=12).tokens
    )


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_a_merged_denoiser_is_quantised_with_its_model_and_verify_stays_ar(weights):
    """quantize after merge_adapters: the merged layers take the model's format too (verify's
    draft pass over a block's rows reads them), the denoiser's logits stay near the dense ones,
    and verify with the denoiser's drafts is still AR's output."""
    dense = shallow("llama", 4, 2)
    perturb_trained(dense)
    model = shallow("llama", 4, 2)
    model.load_state_dict(dense.state_dict())
    dense.merge_adapters()
    model.merge_adapters().quantize(weights)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.context_tower.model.layers.modules())
    assert not any(isinstance(m, torch.nn.Linear) for m in model.denoiser.denoiser_layers.modules())
    a, b = block_logits(dense), block_logits(model)
    assert (a - b).norm() / a.norm() < (0.02 if weights == "int8" else 0.3)  # 4 bits of random weights
    assert (
        generate_verify(model, PROMPTS, max_new_tokens=12, draft="denoiser").tokens
        == generate_ar(model, PROMPTS, max_new_tokens=12).tokens
    )


@pytest.mark.parametrize("denoiser", ["full", "lora"])
def test_a_trainable_denoisers_modulation_follows_its_weights(denoiser):
    """Only the merged (frozen) denoiser keeps adaLN's modulation per masking level: a shallow
    denoiser that trains computes it from its weights on every pass, so a change of them moves
    its logits at one masking level for every row too."""
    model = shallow("llama", 4, 2, denoiser)
    perturb_trained(model)
    before = block_logits(model, (1.0,) * 4)
    with torch.no_grad():
        model.time_conditioning.t_block[1].bias.add_(0.5)
    assert not torch.allclose(block_logits(model, (1.0,) * 4), before)


def test_a_merged_model_is_for_generation_only(tmp_path):
    model = shallow("llama", 4, 2)
    perturb_trained(model)
    model.merge_adapters().quantize("int8")
    with pytest.raises(TwoTowerError, match="adapters merged"):
        shallow("llama", 4, 2).merge_adapters().save_pretrained(tmp_path)
    with pytest.raises(TwoTowerError, match="before quantising"):
        shallow("llama", 4, 2).quantize("int8").merge_adapters()
    assert not any(tmp_path.iterdir())
    full_depth = TwoTowerForCausalLM.from_backbone(tiny_backbone("llama"), lora_rank=4).merge_adapters()
    assert not full_depth.denoiser.merged and full_depth.lora is not None  # its copy would be a second backbone


# (family, layers, depth, fused layers): the anchor's features from below the aligned layers.
FUSED = [("llama", 4, 2, [0, 1]), ("nemotron_h", 5, 2, [0, 2])]


@pytest.mark.parametrize(("family", "layers", "depth", "fuse"), FUSED)
def test_an_untrained_fusion_changes_nothing_and_a_trained_one_moves_the_slots_after_the_anchor(family, layers, depth, fuse):
    """fuse_layers: the context pass keeps the anchor's hidden states entering those layers too;
    the fusion of them starts at zero (the denoiser's logits are those without it), and once it
    moves it changes every slot after the anchor but never the anchor's, which stays AR's."""
    plain, fused = shallow(family, layers, depth), shallow(family, layers, depth, fuse_layers=fuse)
    cache, ar = fused.context_prefill(*left_pad(PROMPTS, pad_id=0))
    assert cache.anchor_hidden.shape[-1] == (1 + len(fuse)) * fused.context_tower.config.hidden_size
    assert sorted(n.split(".")[0] for n in fused.denoiser.trained_state_dict()).count("fusion") == 1
    torch.testing.assert_close(block_logits(fused), block_logits(plain), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        fused.denoiser.fusion.proj.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    moved = block_logits(fused)
    torch.testing.assert_close(moved[:, 0], ar, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(moved[:, 1:], block_logits(plain)[:, 1:], atol=1e-3)


@pytest.mark.parametrize(("family", "layers", "depth", "fuse"), FUSED)
def test_a_fused_denoisers_training_pass_equals_its_generation_pass(family, layers, depth, fuse):
    """The training pass reads each block's anchor features (k depths) as a prefill's cache
    holds them for generation."""
    assert_training_pass_is_the_generation_pass(shallow(family, layers, depth, fuse_layers=fuse))


def test_a_fused_denoiser_saves_merges_and_verify_stays_ar(tmp_path):
    model = shallow("llama", 4, 2, fuse_layers=[0, 1])
    perturb_trained(model)
    model.save_pretrained(tmp_path)
    loaded = TwoTowerForCausalLM.from_pretrained(tmp_path, backbone=model.context_tower)
    assert loaded.config.fuse_layers == [0, 1] and loaded.denoiser.capture_layer == (2, 0, 1)
    assert torch.equal(loaded.denoiser.fusion.proj.weight, model.denoiser.fusion.proj.weight)
    options = dict(max_new_tokens=12, block_size=4, threshold=0.3)
    expected = block_logits(model), generate_mask_diffusion(model, PROMPTS, **options).tokens
    torch.testing.assert_close(block_logits(loaded), expected[0])
    loaded.merge_adapters()
    torch.testing.assert_close(block_logits(loaded), expected[0], rtol=1e-4, atol=1e-4)
    assert generate_mask_diffusion(loaded, PROMPTS, **options).tokens == expected[1]
    ar = generate_ar(loaded, PROMPTS, max_new_tokens=12).tokens
    for options in (dict(draft="denoiser"), dict(draft="denoiser", tree_nodes=6)):
        assert generate_verify(loaded, PROMPTS, max_new_tokens=12, **options).tokens == ar


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(fuse_layers=[1]), "needs a shallow denoiser"),
        (dict(denoiser_depth=2, fuse_layers=[0, 0]), "distinct"),
        (dict(denoiser_depth=2, fuse_layers=[2]), "other than the first aligned layer 2"),
        (dict(denoiser_depth=2, fuse_layers=[4]), r"in \[0, 4\)"),
    ],
)
def test_bad_fusion_settings_are_refused(config, match):
    with pytest.raises(TwoTowerError, match=match):
        TwoTowerForCausalLM.from_backbone(tiny_backbone("llama", num_hidden_layers=4), **config)


def test_a_trained_denoiser_gets_a_fusion_that_changes_nothing_until_it_trains(tmp_path, monkeypatch):
    """`add_fusion` (train's --fuse-layers on a checkpoint that has none): the trained denoiser's
    logits are unchanged, the fusion trains and saves with it; bad layers are refused and leave
    the model as it was."""
    import twotower.model.loading as loading
    from twotower.train import TrainConfig, build_model, trainable_parameters

    model = shallow("llama", 4, 2)
    perturb_trained(model)
    before = block_logits(model)
    with pytest.raises(TwoTowerError, match="first aligned layer"):
        model.add_fusion([2])
    assert model.config.fuse_layers is None and model.denoiser.fusion is None
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: (model, None))  # the checkpoint --model names
    trained, _ = build_model(TrainConfig(data="x", denoiser_depth=2, fuse_layers=(0, 1)))
    assert trained is model and model.config.fuse_layers == [0, 1] and model.denoiser.capture_layer == (2, 0, 1)
    assert any(p is model.denoiser.fusion.proj.weight for p in trainable_parameters(model))
    torch.testing.assert_close(block_logits(model), before, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    assert TwoTowerForCausalLM.from_pretrained(tmp_path, backbone=model.context_tower).denoiser.fusion is not None
