"""A prompt chunk carried by another context pass (`TwoTowerForCausalLM.carrying`): the pass
that carries it gives its own rows what it gives them alone, and the chunk lands in its cache as
a pass of its own would put it there."""

import pytest
import torch
from conftest import tiny_two_tower

from twotower.model.two_tower import Rider


def _prefilled(model, ids):
    cache, _ = model.context_prefill(ids, torch.ones_like(ids))
    return cache


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,width,exact", [(1, 9, True), (1, 1, False), (2, 5, False)])
def test_a_carried_chunk_leaves_the_pass_as_it_is_and_lands_as_its_own_pass(dtype, batch, width, exact):
    model = tiny_two_tower().to(dtype)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, 96, (batch, 12), generator=g)
    other = torch.randint(3, 96, (1, 30), generator=g)
    step = torch.randint(3, 96, (batch, width), generator=g)
    chunk = torch.randint(3, 96, (1, 7), generator=g)

    alone_cache = _prefilled(model, prompt)
    alone = model.context_extend(alone_cache, step, logits="all", exact=exact)
    own_cache = _prefilled(model, other)
    own = model.context_extend(own_cache, chunk, logits="last")

    cache, rider_cache = _prefilled(model, prompt), _prefilled(model, other)
    rider = Rider(rider_cache, chunk)
    with model.carrying(rider):
        carried = model.context_extend(cache, step, logits="all", exact=exact)
        assert model.rider is None  # one pass carries it
    if batch == 1:  # an exact pass or a one-row step: its rows as alone, bit for bit
        assert torch.equal(carried, alone)
    else:
        torch.testing.assert_close(carried, alone, rtol=0, atol=2e-2 if dtype == torch.bfloat16 else 1e-5)
    tol = dict(rtol=0, atol=5e-2) if dtype == torch.bfloat16 else dict(rtol=0, atol=1e-5)
    torch.testing.assert_close(rider.logits, own, **tol)
    assert torch.equal(rider_cache.next_pos, own_cache.next_pos) and torch.equal(rider_cache.valid, own_cache.valid)
    for mine, theirs in zip(rider_cache.kv, own_cache.kv):
        torch.testing.assert_close(mine[0], theirs[0], **tol)
        torch.testing.assert_close(mine[1], theirs[1], **tol)
    for mine, theirs in zip(cache.kv, alone_cache.kv):  # the carrying pass's own cache as alone
        for a, b in zip(mine, theirs):
            if batch == 1:
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b, **tol)


@torch.no_grad()
def test_a_pass_that_cannot_carry_leaves_the_chunk_unread():
    """A hybrid (Mamba) backbone's layers are not row by row: its pass runs alone and the rider
    stays for the caller to read apart."""
    model = tiny_two_tower(family="nemotron_h")
    g = torch.Generator().manual_seed(4)
    cache = _prefilled(model, torch.randint(3, 96, (1, 6), generator=g))
    rider_cache = _prefilled(model, torch.randint(3, 96, (1, 9), generator=g))
    length = rider_cache.length
    rider = Rider(rider_cache, torch.randint(3, 96, (1, 4), generator=g))
    with model.carrying(rider):
        model.context_extend(cache, torch.randint(3, 96, (1, 1), generator=g), logits="last")
    assert rider.logits is None and rider_cache.length == length
