"""The training objective (docs/METHOD.md section 4): one pass per sequence.

A training sequence is cut into n blocks of S target tokens. The frozen context tower reads
the clean sequence once (no grad) and keeps the K,V of every layer; the denoiser reads all
blocks of the noisy sequence in one pass under a block-causal mask: the queries of block b
see the context K,V of the clean tokens before block b and the denoiser's own K,V of block b
only, exactly what they see at generation time. Cross-entropy on masked targets, summed; the
caller divides by the number of masked targets in the whole batch (no 1/t weight).

The block layout (`twotower.model.layout.BlockLayout`) says what block b reads and predicts:
shifted, input [x_{bS}, noised x_{bS+1} .. x_{bS+S-1}] and slot j predicts x_{bS+1+j} (the
anchor slot 0 sees only itself inside the block, as in generation); same-position, input
[noised x_{bS} .. x_{bS+S-1}] and slot j predicts x_{bS+j}. A sequence holds n*S + offset
tokens. Slot j of block b sits at RoPE position bS + j.
Hybrid backbones: the context pass also keeps every layer's Mamba state at each block
boundary bS, and the denoiser's Mamba layers scan each block from its own boundary state
(the blocks folded into the batch), as at generation time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from twotower.model.cache import ContextView
from twotower.model.layout import BlockLayout


def layout_offset(layout: str) -> int:
    """Tokens a sequence holds beyond its n*S targets: 1 in the shifted layout (the anchor)."""
    return BlockLayout(layout).offset


@dataclass
class Noise:
    """The corruption of a batch: one masking level per sequence, one coin per target."""

    t: torch.Tensor  # (B,) masking level in [t_min, 1]
    masked: torch.Tensor  # (B, n, S) bool, True = target hidden from the denoiser (and scored)

    def split(self, size: int) -> list[Noise]:
        return [Noise(t, m) for t, m in zip(self.t.split(size), self.masked.split(size))]


def sample_noise(
    batch: int, n_blocks: int, block_size: int, generator: torch.Generator | None = None, t_min: float = 1e-3
) -> Noise:
    """t ~ U[t_min, 1] per sequence; every target masked independently with probability t."""
    t = t_min + (1 - t_min) * torch.rand(batch, generator=generator)
    coins = torch.rand(batch, n_blocks, block_size, generator=generator)
    return Noise(t, coins < t[:, None, None])


def ar_first(noise: Noise) -> Noise:
    """The first target of every block made visible: at generation time it is the context
    tower's own token (the AR choice after the committed text), so the denoiser never has to
    predict it and training never scores it (it can only predict the tokens after it)."""
    masked = noise.masked.clone()
    masked[:, :, 0] = False
    return Noise(noise.t, masked)


@dataclass
class Teacher:
    """The AR model's next-token distribution at every context position, as its top k:
    ids (B, n*S, k) long and log-probabilities (B, n*S, k) float (renormalised over the k)."""

    ids: torch.Tensor
    logp: torch.Tensor


def teacher_top_k(logits: torch.Tensor, k: int) -> Teacher:
    """logits (..., V) -> the top-k ids and their log-probabilities, renormalised over the k."""
    top, ids = logits.float().topk(k, dim=-1)
    return Teacher(ids, top.log_softmax(-1))


@dataclass
class Features:
    """What the denoiser reads of the frozen tower for a batch of training sequences: the view
    (its aligned layers' states), a shallow denoiser's anchors (B, n, H), and the teacher (or
    None). Computed by the context tower each step, or read from a feature cache
    (`twotower.features`), which stores exactly these."""

    view: ContextView
    anchors: torch.Tensor | None
    teacher: Teacher | None


def context_features(model, ids: torch.Tensor, n_blocks: int, block_size: int, top_k: int = 0) -> Features:
    """One frozen context pass over the clean tokens x_0 .. x_{nS-1} (no gradient)."""
    ctx = model.training_context(ids[:, : n_blocks * block_size], block_size)
    teacher = None
    if top_k:
        with torch.no_grad():
            teacher = teacher_top_k(model.ar_logits(ctx.hidden, "all"), top_k)
    return Features(ctx.view, ctx.anchors, teacher)


def training_hidden(model, ids: torch.Tensor, noise: Noise, features: Features | None = None):
    """One training pass. ids: (B, n*S + o) clean tokens. Returns the denoiser's final hidden
    states over every slot (B, n*S, H), the targets (B, n*S) and the features it read."""
    batch, n, s = noise.masked.shape
    inputs, targets = model.layout.training_inputs(ids, noise.masked, model.mask_token_id)
    if features is None:
        features = context_features(model, ids, n, s)
    mask = model.layout.training_mask(n, s, ids.device)[None, None].expand(batch, -1, -1, -1)
    start = torch.zeros(batch, dtype=torch.long, device=ids.device)
    hidden = model.denoise_hidden(features.view, inputs, start, noise.t, mask=mask, blocks=n, anchor_hidden=features.anchors)
    return hidden, targets, features


def training_logits(model, ids: torch.Tensor, noise: Noise) -> tuple[torch.Tensor, torch.Tensor]:
    """One training pass. ids: (B, n*S + o) clean tokens. Returns the denoiser logits over every
    slot (B, n*S, V) (float, mask token forbidden) and the targets (B, n*S)."""
    hidden, targets, _ = training_hidden(model, ids, noise)
    return model.denoiser_logits(hidden), targets


def masked_loss_sum(
    model,
    ids: torch.Tensor,
    noise: Noise,
    features: Features | None = None,
    kl_weight: float = 0.0,
    top_k: int = 0,
    slot_decay: float = 1.0,
    vocab: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Sum over masked targets of the cross-entropy, plus kl_weight times the cross-entropy
    against the AR teacher's top-k distribution (the same optimum as the hard targets, which
    are the teacher's own greedy choices in self-distilled data, with less variance), and how
    many targets there were. The LM head runs on the masked targets only. Without cached
    features the teacher comes from this step's frozen pass (top_k tokens).
    slot_decay: a target at slot j of its block weighs slot_decay ** j, the weights scaled to
    a mean of 1 over the batch's targets (1: all alike), so that below 1 the early slots, the
    drafts verify judges first, pull harder at the same loss scale.
    vocab: token ids (N,) of a draft vocabulary, or None: the head runs over those N tokens
    only (verify's drafts pick among them, `VerifyOptions.draft_vocab`), a target outside them
    is not scored (nor counted), and the teacher's tokens outside them weigh nothing."""
    batch, n, s = noise.masked.shape
    if features is None:
        features = context_features(model, ids, n, s, top_k if kl_weight else 0)
    hidden, targets, _ = training_hidden(model, ids, noise, features)
    scored = noise.masked.reshape(targets.shape)
    place = None
    if vocab is not None:  # the head's N rows: a target outside them is not scored
        vocab = vocab[vocab != model.mask_token_id].to(ids.device)
        width = max(model.num_embeddings + 1, model.denoiser.backbone.lm_head.weight.shape[0])
        place = torch.full((width,), -1, dtype=torch.long, device=ids.device)
        place[vocab] = torch.arange(len(vocab), device=ids.device)
        scored = scored & (place[targets] >= 0)
        logits = model.denoiser.vocab_logits(hidden[scored], vocab)  # (M, N)
        idx = place[targets[scored]][:, None]
    else:
        logits = model.denoiser_logits(hidden[scored], float32=False)  # (M, V), the LM head on masked targets only
        idx = targets[scored][:, None]
    weights = torch.ones(len(logits), 1, device=logits.device)
    if kl_weight:
        # Slot i predicts the token at position i + offset; the teacher's prediction of it was
        # made at position i + offset - 1 (none for the first token of a same-position sequence).
        at = (torch.arange(n * s, device=ids.device) + model.layout.offset - 1)[None].expand(batch, -1)[scored]
        rows = torch.arange(batch, device=ids.device)[:, None].expand(-1, n * s)[scored]
        teacher = features.teacher
        t_ids, t_logp = teacher.ids[rows, at.clamp(min=0)], teacher.logp[rows, at.clamp(min=0)].float()  # (M, k)
        t_weights = kl_weight * t_logp.exp() * (at >= 0)[:, None]
        if place is not None:  # the teacher's tokens outside the draft vocabulary weigh nothing
            t_ids = place[t_ids.long()]
            t_weights, t_ids = t_weights * (t_ids >= 0), t_ids.clamp(min=0)
        idx, weights = torch.cat([idx, t_ids.long()], dim=1), torch.cat([weights, t_weights], dim=1)
    if slot_decay != 1.0 and len(logits):
        slot = torch.arange(s, device=ids.device).expand(batch, n, s).reshape(targets.shape)[scored]
        per_target = slot_decay ** slot.float()
        weights = weights * (per_target / per_target.mean())[:, None].to(weights.dtype)
    return sparse_cross_entropy(logits, idx, weights), int(scored.sum())


class _SparseCrossEntropy(torch.autograd.Function):
    """sum_m sum_j w[m, j] * -log_softmax(logits[m])[idx[m, j]] for (M, V) logits of any float
    dtype, computed in fp32 row chunks; the backward writes one (M, V) gradient in place
    (softmax * sum_j w - scatter(w)) instead of the several full-vocabulary tensors that
    log_softmax, gather and their backwards allocate."""

    CHUNK = 256

    @staticmethod
    def forward(ctx, logits, idx, weights):
        wide = torch.promote_types(logits.dtype, torch.float32)  # fp32, or fp64 for a gradient check
        weights = weights.to(wide)
        lse = logits.new_zeros(len(logits), dtype=wide)
        for lo in range(0, len(logits), _SparseCrossEntropy.CHUNK):
            part = slice(lo, lo + _SparseCrossEntropy.CHUNK)
            lse[part] = logits[part].to(wide).logsumexp(-1)
        picked = logits.gather(1, idx).to(wide)
        ctx.save_for_backward(logits, idx, weights, lse)
        return (weights.sum(1) * lse - (weights * picked).sum(1)).sum()

    @staticmethod
    def backward(ctx, grad):
        logits, idx, weights, lse = ctx.saved_tensors
        out = torch.empty_like(logits)
        total = weights.sum(1)
        for lo in range(0, len(logits), _SparseCrossEntropy.CHUNK):
            part = slice(lo, lo + _SparseCrossEntropy.CHUNK)
            g = (logits[part].to(lse.dtype) - lse[part, None]).exp_().mul_(total[part, None])
            g.scatter_add_(1, idx[part], -weights[part])
            out[part] = g.mul_(grad)
        return out, None, None


def sparse_cross_entropy(logits: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of logits (M, V) against sparse target distributions: the ids idx
    (M, J) with weights (M, J) (a hard target is one id of weight 1)."""
    return _SparseCrossEntropy.apply(logits, idx, weights)
