"""Tiny random backbones built from config (no network), and helpers shared by the tests."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    NemotronHConfig,
    NemotronHForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from twotower import TwoTowerForCausalLM

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "nemotron_h": (NemotronHConfig, NemotronHForCausalLM),
}
# The tiny hybrid: every kind of nemotron_h layer (Mamba-2, attention, MoE, MLP), Mamba first
# so that its state carries the prompt into everything after it; chunks of 8 so that prompts
# span several scan chunks.
HYBRID = dict(
    layers_block_type=["linear_attention", "full_attention", "moe", "linear_attention", "mlp"],
    mamba_num_heads=8,
    mamba_head_dim=16,
    ssm_state_size=16,
    n_groups=2,
    conv_kernel=4,
    chunk_size=8,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    moe_shared_expert_intermediate_size=32,
)
VOCAB = 96
EOS = 1
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [20, 21, 22, 23, 24, 25, 26], [40]]


CHAT_TEMPLATE = (
    "{% for m in messages %}<bos> {{ m['content'] }} <eos> {% endfor %}{% if add_generation_prompt %}<bos> {% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the tiny vocabulary: "<unk>", "<eos>", "<bos>", then "w3".."w95"."""
    vocab = {"<unk>": 0, "<eos>": EOS, "<bos>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", eos_token="<eos>", bos_token="<bos>", pad_token="<eos>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_backbone(family: str = "llama", seed: int = 0, **overrides):
    config_cls, model_cls = FAMILIES[family]
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        initializer_range=0.1,
        tie_word_embeddings=family == "llama",
        pad_token_id=0,
        eos_token_id=EOS,
        bos_token_id=2,
    )
    if family == "nemotron_h":
        kwargs.update(HYBRID)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return model_cls(config_cls(**kwargs)).eval()


def tiny_two_tower(
    denoiser: str = "lora", layout: str = "shifted", family: str = "llama", seed: int = 0, block_size: int = 8, **config
):
    return TwoTowerForCausalLM.from_backbone(
        tiny_backbone(family, seed), denoiser=denoiser, layout=layout, block_size=block_size, lora_rank=4, **config
    )


def perturb_trained(model: TwoTowerForCausalLM, seed: int = 1, scale: float = 0.05) -> None:
    """Move every trained tensor away from its (identity) initialisation, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        params = dict(model.denoiser.named_parameters(remove_duplicate=False))
        for name in model.denoiser.trained_state_dict():
            if name not in params:
                continue  # a buffer (the hybrid MoE router's score correction): not trained
            param = params[name]
            param.add_(torch.randn(param.shape, generator=g).to(param.dtype) * scale)


@pytest.fixture(params=["full", "lora"])
def denoiser_kind(request):
    return request.param
