"""The two-tower model: context cache, identity initialisation, masks, devices, checkpoints."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, VOCAB, perturb_trained, tiny_backbone, tiny_two_tower
from transformers import AutoConfig, AutoModelForCausalLM

from twotower import TwoTowerConfig, TwoTowerError, TwoTowerForCausalLM
from twotower.generate.common import left_pad
from twotower.model.cache import MambaState
from twotower.model.masks import block_mask


@pytest.mark.parametrize("family", ["llama", "qwen3", "nemotron_h"])
def test_block_by_block_extension_equals_one_pass(family):
    model = tiny_two_tower(family=family)
    rows = [p + list(range(30, 41)) for p in PROMPTS]  # prompts + 11 more tokens each
    cut = [len(p) for p in PROMPTS]
    ids, mask = left_pad([r[:c] for r, c in zip(rows, cut)], pad_id=0)
    cache, _ = model.context_prefill(ids, mask)
    tail = torch.tensor([r[c:] for r, c in zip(rows, cut)])
    for lo, hi in [(0, 4), (4, 8), (8, 10), (10, 11)]:  # blocks of 4, 4, 2, 1
        model.context_extend(cache, tail[:, lo:hi])
    full_ids = torch.cat([ids, tail], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(tail)], dim=1)
    reference, _ = model.context_prefill(full_ids, full_mask)
    assert torch.equal(cache.valid, reference.valid)
    assert torch.equal(cache.next_pos, reference.next_pos)
    kinds = assert_same_context(cache, reference)
    assert kinds == ({"tuple", "MambaState", "NoneType"} if family == "nemotron_h" else {"tuple"})


def assert_same_context(cache, reference):
    """Same K,V on valid slots and the same Mamba conv and SSM states (hybrid backbones)."""
    valid = reference.valid[:, None, :, None]
    kinds = set()
    for entry, ref in zip(cache.kv, reference.kv, strict=True):
        kinds.add(type(entry).__name__)
        if isinstance(entry, tuple):
            torch.testing.assert_close(entry[0] * valid, ref[0] * valid, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(entry[1] * valid, ref[1] * valid, atol=1e-5, rtol=1e-5)
        elif isinstance(entry, MambaState):
            assert bool(entry.ssm.abs().max() > 1e-3)  # a state that carries something
            torch.testing.assert_close(entry.conv, ref.conv, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(entry.ssm, ref.ssm, atol=1e-5, rtol=1e-5)
        else:
            assert entry is None and ref is None
    return kinds


def test_extension_logits_equal_full_pass_logits():
    model = tiny_two_tower()
    seq = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])
    cache, _ = model.context_prefill(seq[:, :6], torch.ones(1, 6, dtype=torch.long))
    step = model.context_extend(cache, seq[:, 6:], logits="all")
    torch.testing.assert_close(step, model(seq)[:, 6:], atol=1e-5, rtol=1e-5)


def _denoise(model, t=None):
    """One denoiser pass over a first block: shifted [last prompt token, 3 masks], else 4 masks."""
    ids, mask = left_pad(PROMPTS, pad_id=0)
    cache, _ = model.context_prefill(ids, mask)
    view = cache.view(drop_last=model.config.layout == "shifted")
    block_ids = torch.full((len(PROMPTS), 4), model.mask_token_id)
    if model.config.layout == "shifted":
        block_ids[:, 0] = ids[:, -1]
    start = cache.next_pos - (1 if model.config.layout == "shifted" else 0)
    return model.denoise(view, block_ids, start, t)


@pytest.mark.parametrize("family", ["llama", "nemotron_h"])
def test_untrained_denoiser_is_the_backbone(denoiser_kind, family):
    """Identity adaLN for any t, zero LoRA delta / exact copy: anchor logits are AR logits
    (hybrid: the denoiser's Mamba layers start from the state before the anchor)."""
    model = tiny_two_tower(denoiser_kind, family=family)
    t = torch.tensor([1.0, 0.5, 0.25, 0.75])
    with torch.no_grad():
        plain, timed = _denoise(model), _denoise(model, t)
    torch.testing.assert_close(plain, timed, atol=0, rtol=0)
    ids, mask = left_pad(PROMPTS, pad_id=0)
    ar_last = model.context_prefill(ids, mask)[1]
    torch.testing.assert_close(plain[:, 0], ar_last, atol=1e-5, rtol=1e-5)


def test_trained_time_conditioning_depends_on_t():
    model = tiny_two_tower()
    perturb_trained(model)
    with torch.no_grad():
        a = _denoise(model, torch.full((4,), 1.0))
        b = _denoise(model, torch.full((4,), 0.25))
    assert not torch.allclose(a, b)


def test_mask_embedding_feeds_masked_slots_and_mask_logit_is_forbidden():
    model = tiny_two_tower()
    with torch.no_grad():
        before = _denoise(model)
        model.mask_embedding.add_(1.0)
        after = _denoise(model)
    assert not torch.allclose(before[:, 1:], after[:, 1:])
    torch.testing.assert_close(before[:, 0], after[:, 0])  # the anchor does not see masked slots
    reused = tiny_two_tower(mask_token_id=VOCAB - 1)
    with torch.no_grad():
        assert torch.isneginf(_denoise(reused)[..., VOCAB - 1]).all()


def test_block_masks():
    valid = torch.tensor([[False, True, True], [True, True, True]])
    shifted = block_mask(valid, 3, "shifted")[:, 0]
    assert shifted.shape == (2, 3, 6)
    assert shifted[0, :, 0].logical_not().all()  # padding never attended
    assert shifted[:, 0, 3:].tolist() == [[True, False, False]] * 2  # anchor sees itself only
    assert shifted[:, 1:, 3:].all()  # masked slots see the whole block
    assert block_mask(valid, 3, "same-position")[:, 0, :, 3:].all()


def test_lora_denoiser_shares_the_backbone_weights():
    full, lora = tiny_two_tower("full"), tiny_two_tower("lora")
    count = lambda params: sum(p.numel() for p in params)
    n_backbone = count(full.context_tower.parameters())
    added = lambda m: count(m.denoiser.get_parameter(n) for n in m.denoiser.trained_state_dict())
    assert full.denoiser.backbone is not full.context_tower and lora.denoiser.backbone is lora.context_tower
    assert count(lora.parameters()) == n_backbone + added(lora)  # backbone weights held once
    assert count(full.parameters()) == n_backbone + added(full)  # full: the copy is what it trains
    assert added(full) > n_backbone > 4 * sum(count(a.parameters()) for a in lora.lora)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("context_tower.") for n in trainable)
    assert all(not p.requires_grad for p in lora.context_tower.parameters())


def test_place_towers_on_devices_cpu(denoiser_kind):
    model = tiny_two_tower(denoiser_kind).place_towers_on_devices("cpu", "cpu")
    assert model.context_device.type == "cpu" and model.denoiser_device.type == "cpu"
    if denoiser_kind == "lora":
        assert model.denoiser.backbone is model.context_tower


def test_context_view_moves_mamba_states_to_the_denoiser_device():
    """The view moves K,V and Mamba conv/SSM states, not the tail kept to go back into."""
    model = tiny_two_tower(family="nemotron_h")
    cache, _ = model.context_prefill(*left_pad(PROMPTS, pad_id=0))
    moved = cache.view(drop_last=True).to("meta")
    states = [e for e in moved.kv if isinstance(e, MambaState)]
    assert states and all(s.tail is None and s.kept is None for s in states)
    tensors = [t for e in moved.kv if e is not None for t in ((e.conv, e.ssm) if isinstance(e, MambaState) else e)]
    assert len(tensors) == 6 and all(t.device.type == "meta" for t in tensors) and moved.valid.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("family", ["llama", "nemotron_h"])
def test_place_towers_on_two_devices(denoiser_kind, family):
    from twotower import generate_ar, generate_mock_ar

    model = tiny_two_tower(denoiser_kind, family=family).place_towers_on_devices("cpu", "cuda")
    assert model.denoiser_device.type == "cuda"
    assert generate_mock_ar(model, PROMPTS, max_new_tokens=8).tokens == generate_ar(model, PROMPTS, max_new_tokens=8).tokens


@pytest.mark.parametrize("family", ["llama", "nemotron_h"])
@pytest.mark.parametrize("layout", ["shifted", "same-position"])
def test_save_load_round_trip_is_exact(tmp_path, denoiser_kind, layout, family):
    model = tiny_two_tower(denoiser_kind, layout=layout, family=family)
    perturb_trained(model)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "denoiser.safetensors"]
    loaded = TwoTowerForCausalLM.from_pretrained(tmp_path, backbone=tiny_backbone(family))
    assert loaded.config.denoiser == denoiser_kind and loaded.config.layout == layout
    with torch.no_grad():
        torch.testing.assert_close(
            _denoise(loaded, torch.full((4,), 0.5)), _denoise(model, torch.full((4,), 0.5)), atol=0, rtol=0
        )
    for name, tensor in model.denoiser.trained_state_dict().items():
        assert torch.equal(loaded.denoiser.trained_state_dict()[name], tensor), name


def test_lora_checkpoint_stores_only_what_was_trained(tmp_path):
    lora, full = tiny_two_tower("lora"), tiny_two_tower("full")
    lora.save_pretrained(tmp_path / "lora")
    full.save_pretrained(tmp_path / "full")
    assert not any(k.startswith(("context_tower", "denoiser_tower")) for k in lora.denoiser.trained_state_dict())
    size = lambda d: (tmp_path / d / "denoiser.safetensors").stat().st_size
    backbone_bytes = sum(p.numel() * p.element_size() for p in lora.context_tower.parameters())
    assert size("full") - size("lora") > 0.8 * backbone_bytes  # only the full kind stores a backbone copy


def test_auto_classes_resolve_a_checkpoint(tmp_path):
    model = tiny_two_tower()
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), TwoTowerConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, backbone=tiny_backbone())
    assert isinstance(loaded, TwoTowerForCausalLM)


def test_checkpoint_on_another_backbone_is_refused(tmp_path):
    tiny_two_tower().save_pretrained(tmp_path)
    with pytest.raises(TwoTowerError, match="trained on backbone"):
        TwoTowerForCausalLM.from_pretrained(tmp_path, backbone=tiny_backbone(seed=1))
    with pytest.raises(TwoTowerError, match="trained on backbone"):
        TwoTowerForCausalLM.from_pretrained(tmp_path, backbone=tiny_backbone(hidden_size=32, head_dim=8))


def test_corrupt_or_mismatched_checkpoint_is_refused(tmp_path):
    tiny_two_tower("lora").save_pretrained(tmp_path / "lora")
    weights = tmp_path / "lora" / "denoiser.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(TwoTowerError, match="corrupt"):
        TwoTowerForCausalLM.from_pretrained(tmp_path / "lora", backbone=tiny_backbone())
    tiny_two_tower("full").save_pretrained(tmp_path / "full")
    (tmp_path / "lora" / "denoiser.safetensors").write_bytes((tmp_path / "full" / "denoiser.safetensors").read_bytes())
    with pytest.raises(TwoTowerError, match="does not match"):
        TwoTowerForCausalLM.from_pretrained(tmp_path / "lora", backbone=tiny_backbone())
    with pytest.raises(TwoTowerError, match="not a twotower checkpoint"):
        TwoTowerForCausalLM.from_pretrained(tmp_path / "missing", backbone=tiny_backbone())


def test_mask_token_id_colliding_with_a_real_token_is_refused():
    class Tok:
        def __len__(self):
            return VOCAB - 4

        def convert_ids_to_tokens(self, i):
            return f"tok{i}"

    with pytest.raises(TwoTowerError, match="collides with the real token 'tok5'"):
        TwoTowerForCausalLM.from_backbone(tiny_backbone(), Tok(), mask_token_id=5)
    assert TwoTowerForCausalLM.from_backbone(tiny_backbone(), Tok(), mask_token_id=VOCAB - 2).mask_token_id == VOCAB - 2
    with pytest.raises(TwoTowerError, match="outside"):
        TwoTowerForCausalLM.from_backbone(tiny_backbone(), Tok(), mask_token_id=VOCAB + 5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(denoiser="half"), "denoiser must be"),
        (dict(layout="diagonal"), "layout must be"),
        (dict(block_size=0), "block_size must be"),
        (dict(lora_rank=0), "lora_rank"),
        (dict(lora_targets=["qkv"]), "unknown lora_targets"),
    ],
)
def test_bad_model_config_is_refused(kwargs, match):
    with pytest.raises(TwoTowerError, match=match):
        TwoTowerForCausalLM.from_backbone(tiny_backbone(), **kwargs)
