"""Inference transforms: what prepares a loaded model for generation, in place.

  merge_adapters  a shallow LoRA denoiser's adapters folded into copies of its layers
  fuse            the projections of one input (q, k, v; gate, up) as one matmul each
  quantize        weight-only int8 / int4 linear layers for CPU inference (twotower/quant.py)
  compile_steps   the context passes that decoding repeats, compiled (twotower/backbones/graphs.py)
  warm_steps      those passes compiled now rather than on first use

Merge, then fuse, before quantising, and compile last (fusing that stacks anything, and
quantising, drop the compiled passes). A model so prepared generates; it neither trains nor
saves (`checkpoint.save` refuses it).
"""

from __future__ import annotations

import warnings

import torch

from twotower.backbones.graphs import COMPILED_DTYPES
from twotower.config import TwoTowerError
from twotower.model.denoiser import LoRADenoiser, MergedDenoiser


def merge_adapters(model):
    """A shallow LoRA denoiser's adapters folded into dense copies of its K aligned layers
    (`denoiser.MergedDenoiser`). The copies cost K layers' weights; a full-depth LoRA denoiser is
    left as it is, since its copy would be a second backbone. Returns the model."""
    if not isinstance(model.denoiser, LoRADenoiser) or not model.denoiser.shallow:
        return model
    if model.weights != "dense" or model.fused:
        raise TwoTowerError("merge the adapters before quantising or fusing the model (merge_adapters, then fuse, then quantize)")
    model.denoiser = MergedDenoiser(model.denoiser)
    return model


def fuse(model):
    """Every layer's projections of one input (q, k, v; gate, up, as the family names them)
    stacked into one matmul each (`base.fuse_layers`), in both towers and a shallow denoiser's
    merged layers (`merge_adapters` first): a pass makes fewer, wider calls (an AR step's three
    attention inputs in one). Each row's logits stay independent of the pass's width, since the
    stacked projection is one linear layer like any other (`base.linear`). `quantize` fuses its
    own layers as it quantises them. The projections stay as views of the stacks (no second copy;
    after a `.to()` too, `view_stacks`). Compiled passes are dropped (their graphs hold the old
    tensors) only where something was stacked. Returns the model."""
    from twotower.backbones.base import fuse_layers

    stacked = [fuse_layers(layers, model.family.fusions) for layers in _decoder_layers(model)]
    if any(stacked) and not model.fused:  # new stacks: graphs hold the layers' old tensors
        model.fused, model.step_layers = True, None
    return model


def _decoder_layers(model) -> list:
    """The decoder layers that fuse and quantise stack: the context tower's, a full denoiser's own
    copy, a shallow denoiser's merged layers."""
    towers = [model.context_tower.model.layers]
    if model.denoiser.backbone is not model.context_tower:
        towers.append(model.denoiser.backbone.model.layers)
    if isinstance(model.denoiser, MergedDenoiser):
        towers.append(model.denoiser.denoiser_layers)
    return towers


def view_stacks(model):
    """After `.to()` and the like on a fused or quantised model: each projection a view of its
    stack again (`base.view_stacks`), and a quantised head tied to the embedding its weights
    again, instead of a copy beside them. Returns the model."""
    from twotower.backbones.base import view_stacks as view
    from twotower.quant import Int8Linear

    for layers in _decoder_layers(model):
        view(layers, model.family.fusions)
    backbones = [model.context_tower]
    if model.denoiser.backbone is not model.context_tower:
        backbones.append(model.denoiser.backbone)
    for backbone in backbones:  # a quantised head tied to the embedding: its dense weights are the embedding's
        if isinstance(backbone.lm_head, Int8Linear) and backbone.config.tie_word_embeddings:
            backbone.lm_head.dense_weight = backbone.get_input_embeddings().weight.detach()
    return model


def quantize(model, weights: str):
    """Weight-only int8 / int4 linear layers: both towers' projections and LM heads, and a
    shallow denoiser's merged layers (`merge_adapters` first): verify's draft pass at batch 1
    has a block's rows, few enough for the quantised kernels (wider passes take the dense
    weights), and its drafts are checked by the context tower, so 4 bits cost no exactness
    (their effect on acceptance: docs/benchmarks.md). LoRA adapters left unmerged, adaLN and the
    embeddings stay as they are. "dense" leaves the model unchanged. Returns the model."""
    if weights == "dense":
        return model
    from twotower.quant import quantize_backbone, quantize_layers

    quantize_backbone(model.context_tower, weights, model.family.fusions)
    if model.denoiser.backbone is not model.context_tower:  # its own copy, or one on another device
        quantize_backbone(model.denoiser.backbone, weights, model.family.fusions)
    if isinstance(model.denoiser, MergedDenoiser):
        quantize_layers(model.denoiser.denoiser_layers, weights, model.family.fusions)
    model.weights, model.step_layers = weights, None  # graphs hold the layers' old tensors
    return model


def exact_rows(model) -> int | None:
    """The most rows (batch x positions) a context pass may hold and still give each row the
    logits of a one-row pass bit for bit: quantised weights serve only so many
    (`quant.QUANTISED_ROWS`), wider passes take the dense ones; None: any."""
    from twotower.quant import QUANTISED_ROWS

    return None if model.weights == "dense" else QUANTISED_ROWS


def compile_steps(model) -> bool:
    """Run the context passes that decoding repeats (AR steps, verify passes, diffusion mode's
    block reads: at most `compiled_positions` new positions; not the prefill) with the work
    around each layer's attention compiled (`backbones.graphs`: one graph per batch size and
    width, compiled on first use or by `warm_steps`), where the family has such graphs. In bf16
    a compiled pass gives each position the same logits at any width, so verify mode stays AR's
    output token for token, but not always the eager pass's last bits (a near-tie may break
    otherwise than eagerly); fp32 runs eagerly. Returns whether the family has them."""
    make = model.family.compiled_layers
    model.step_layers = None if make is None else make()
    if model.step_layers is not None and model.dtype not in COMPILED_DTYPES:
        warnings.warn(
            f"twotower: compiled passes run in bf16 / fp16 only; this model is {model.dtype}, so they stay eager", stacklevel=3
        )
    return model.step_layers is not None


def compiled_positions(model) -> int:
    """The widest context pass that runs compiled: a block and the token before it, the widest
    pass decoding makes."""
    return model.config.block_size + 1


@torch.no_grad()
def warm_steps(model, batch_sizes=(1,), positions: int | None = None) -> None:
    """Compile now, not on first use, the passes of each batch size over 1..positions new
    positions (default: `compiled_positions`): a short prefill and one extension each, of
    different tokens in every row and position (at batch 1 the exact passes of verify mode, and
    an AR step); and a denoiser pass over each width of block up to the trained one (verify's
    drafts, diffusion's steps). Nothing without `compile_steps`."""
    if model.step_layers is None:
        return
    device, vocab = model.context_device, model.num_embeddings
    for batch in batch_sizes:
        for width in range(1, (positions or compiled_positions(model)) + 1):
            ids = (torch.arange(batch * (width + 2), device=device).view(batch, width + 2) * 7919 + 11) % vocab
            cache, _ = model.context_prefill(ids[:, :2], torch.ones_like(ids[:, :2]))
            model.context_extend(cache, ids[:, 2:], exact=batch == 1)
            if batch == 1 and width == 1:  # an AR step: not an exact pass (`base.RowWise`), a graph of its own
                model.context_extend(cache, ids[:, 2:])
        den = model.denoiser_device
        for width in range(2, model.config.block_size + 1):  # a draft of 1..S - 1 tokens after the anchor
            block = torch.full((batch, width), model.mask_token_id, device=den)
            block[:, 0] = ids[:, -1].to(den)
            model.denoise_block(model.layout.reads(cache, den), block, torch.ones(batch, device=den))
