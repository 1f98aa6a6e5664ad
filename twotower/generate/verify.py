"""Verify mode: lossless speed-up. Drafts are checked by the context tower, so the output is
the AR model's (greedy: token for token; sampling: the same distribution).

State between cycles: the context cache holds every committed token but the last one
(`pending`). That is exactly the denoiser's view in the shifted layout. One cycle:
  1. draft up to k tokens after `pending` (the denoiser, prompt lookup, or nothing);
  2. the context tower reads [pending, d_1 .. d_k] in one pass: its logits give the AR
     choice a_1 .. a_{k+1} after each prefix;
  3. commit the longest prefix with d_i == a_i (or, when sampling, passing the
     speculative-sampling test), plus a_{j+1} from the context tower's own logits (the
     correction, or a bonus token when every draft passed), so a cycle commits >= 1 token;
  4. drop the rejected drafts from the cache; a_{j+1} becomes `pending`.

Draft policy (draft="auto"), per row: three ways, the denoiser, prompt lookup (only when the
last n tokens occurred earlier in the prompt or reply) and a plain AR step (no draft, one
token). Each row keeps an EMA of committed tokens per second of every way, uses the fastest,
and re-tries the others with a doubling wait (DraftPolicy), so a row whose drafts stop being
accepted falls back to AR speed. With several rows, a batch-level gate makes the same choice
between cycles that draft and plain AR cycles, on the whole batch's tokens per second.
With a sampling seed the cost of a cycle is counted in tower passes instead of seconds, so
that the choices, and with them the sampled text, are reproducible.
"""

from __future__ import annotations

import time

import torch

from twotower.config import TwoTowerError
from twotower.generate.common import start_run
from twotower.generate.sampling import sample_tokens, top_p_filter

DRAFT_SOURCES = ("auto", "denoiser", "lookup", "ar")


def lookup_draft(history: list[int], max_len: int, ngram: int = 3) -> list[int]:
    """Prompt lookup: find the latest earlier occurrence of the last n tokens (n = ngram..1)
    in the history and propose what followed it (at most max_len tokens)."""
    for n in range(min(ngram, len(history) - 1), 0, -1):
        tail = history[-n:]
        for start in range(len(history) - n - 1, -1, -1):
            if history[start:start + n] == tail:
                return history[start + n:start + n + max_len]
    return []


def one_hot_law(drafts: torch.Tensor, vocab: int) -> torch.Tensor:
    """The draft law of a deterministic draft (prompt lookup): one-hot, (B, K) -> (B, K, V)."""
    return torch.zeros(*drafts.shape, vocab, device=drafts.device).scatter_(-1, drafts[..., None], 1.0)


def target_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The sampling distribution a mode draws from: softmax(top-p(logits / T))."""
    return top_p_filter(logits / temperature, top_p).softmax(-1)


@torch.no_grad()
def denoiser_draft(model, cache, pending, width: int, settings, generator, steps: int):
    """Draft `width` slots after `pending` with the denoiser, left to right: every pass keeps
    the drafted prefix and extends it over the following slots predicted above the confidence
    threshold (at least one). Returns tokens (B, W), their draft distributions (B, W, V) or
    None when greedy, draft lengths (B,), and the number of passes."""
    den, mask_id = model.denoiser_device, model.mask_token_id
    batch = pending.shape[0]
    view, start = cache.view().to(den), cache.next_pos.to(den)
    block = torch.full((batch, width), mask_id, dtype=torch.long, device=den)
    length = torch.zeros(batch, dtype=torch.long, device=den)
    slots = torch.arange(width, device=den)[None]
    q = None
    passes = 0
    for _ in range(steps):
        inputs = torch.cat([pending.to(den)[:, None], block[:, :-1]], dim=1)
        logits = model.denoise(view, inputs, start, (width - length).float() / width)  # (B, W, V)
        passes += 1
        tokens, confidence = sample_tokens(logits, settings.temperature, settings.top_p, generator)
        open_slots = slots >= length[:, None]
        forced = slots == length[:, None]
        take = (confidence > settings.confidence_threshold) | forced
        take = (take | ~open_slots).long().cumprod(1).bool() & open_slots  # contiguous from `length`
        block = torch.where(take, tokens, block)
        if settings.temperature > 0:
            probs = target_probs(logits, settings.temperature, settings.top_p)
            # A slot past the forced one is kept only when its token is confident, so the token
            # it holds is distributed as q restricted to the confident tokens, renormalised;
            # the accept/reject rule must see that distribution, not q.
            confident = (logits.softmax(-1) > settings.confidence_threshold) | forced[..., None]
            kept = probs * confident
            kept = kept / kept.sum(-1, keepdim=True).clamp(min=1e-30)
            q = kept if q is None else torch.where(take[..., None], kept, q)
        length = length + take.sum(1)
        if bool((length >= width).all()):
            break
    return block, q, length, passes


def accept_drafts(logits, drafts, draft_len, q, settings, generator):
    """Steps 3 of the cycle. logits: (B, K+1, V) context logits after [pending, d_1..d_K];
    drafts: (B, K); draft_len: (B,); q: (B, K, V) draft distributions or None (greedy, or
    one-hot drafts). Returns accepted counts (B,) and the token committed after them (B,)."""
    batch, width = drafts.shape
    slots = torch.arange(width, device=drafts.device)[None]
    in_draft = slots < draft_len[:, None]
    if settings.temperature == 0:
        choice = logits.argmax(-1)  # (B, K+1)
        ok = (drafts == choice[:, :width]) & in_draft
        accepted = ok.long().cumprod(1).sum(1)
        return accepted, choice.gather(1, accepted[:, None])[:, 0]
    p = target_probs(logits, settings.temperature, settings.top_p)  # (B, K+1, V)
    if q is None:  # deterministic drafts (prompt lookup)
        q = one_hot_law(drafts, p.shape[-1]).to(p.dtype)
    p_draft = p[:, :width].gather(-1, drafts[..., None])[..., 0]
    q_draft = q.gather(-1, drafts[..., None])[..., 0].clamp(min=1e-20)
    u = torch.rand((batch, width), generator=generator, device=p.device)
    ok = (u < p_draft / q_draft) & in_draft
    accepted = ok.long().cumprod(1).sum(1)
    rows = torch.arange(batch, device=p.device)
    at = accepted.clamp(max=width - 1) if width else accepted
    residual = (p[rows, at] - q[rows, at]).clamp(min=0) if width else p[rows, accepted]
    all_taken = accepted >= draft_len
    dist = torch.where(all_taken[:, None], p[rows, accepted], residual)
    dist = torch.where(dist.sum(-1, keepdim=True) > 0, dist, p[rows, accepted])  # p == q: nothing to correct
    return accepted, torch.multinomial(dist, 1, generator=generator)[:, 0]


class DraftPolicy:
    """Per row, for each way of drafting ("denoiser", "lookup", "ar" = no draft): an EMA of
    committed tokens per unit of cost (seconds), and an EMA of accepted drafts per cycle.

    Every way is tried once; then each cycle uses the way with the best rate among those
    available (lookup only when the history offers a match). A way that is not the best is
    re-tried (probed) after `probe_every` cycles; each probe that leaves it behind doubles its
    wait (up to `max_wait`), so probing costs little once the best way is clear, and a way
    that wins a probe is back in use at once. Drafts start at 2 tokens and then are as long as
    twice the recent accepted run plus two (at most the room left): every drafted position
    costs the context tower (and the denoiser) work, so a draft rarely accepted stays short."""

    def __init__(self, batch: int, ways: tuple[str, ...], probe_every: int = 8, decay: float = 0.7,
                 max_wait: int = 256, first_length: int = 2):
        self.ways, self.probe_every, self.decay, self.max_wait = ways, probe_every, decay, max_wait
        self.first_length = first_length
        self.every = tuple(dict.fromkeys([*ways, "ar"]))  # a forced source still falls back to AR steps
        self.rates = [dict.fromkeys(self.every) for _ in range(batch)]
        self.accepted = [dict.fromkeys(self.every) for _ in range(batch)]
        self.last_used = [dict.fromkeys(self.every, -1) for _ in range(batch)]
        self.wait = [dict.fromkeys(self.every, probe_every) for _ in range(batch)]
        self.cycles = [0] * batch

    def _best(self, row: int, ways) -> str:
        rate = self.rates[row]
        return max(ways, key=lambda w: -1.0 if rate[w] is None else rate[w])

    def choose(self, row: int, lookup_available: bool = True) -> str:
        ways = [w for w in self.ways if w != "lookup" or lookup_available]
        untried = [w for w in ways if self.rates[row][w] is None]
        if untried:
            return untried[0]
        best = self._best(row, ways)
        now, last, wait = self.cycles[row], self.last_used[row], self.wait[row]
        due = [w for w in ways if w != best and now - last[w] >= wait[w]]
        return min(due, key=last.get) if due else best

    def draft_length(self, row: int, way: str, room: int) -> int:
        if way == "ar" or room <= 0:
            return 0
        seen = self.accepted[row][way]
        length = self.first_length if seen is None else int(2 * seen) + 2
        return max(1, min(room, length))

    def record(self, row: int, way: str, tokens: int, cost: float, accepted: int = 0) -> None:
        """A cycle of `way` committed `tokens` (accepting `accepted` drafts) at `cost`."""
        self.last_used[row][way] = self.cycles[row]
        self.cycles[row] += 1
        for table, value in ((self.rates, tokens / max(cost, 1e-9)), (self.accepted, float(accepted))):
            old = table[row][way]
            table[row][way] = value if old is None else self.decay * old + (1 - self.decay) * value
        if self._best(row, self.every) == way:
            self.wait[row][way] = self.probe_every
        else:
            self.wait[row][way] = min(2 * self.wait[row][way], self.max_wait)


@torch.inference_mode()
def verify_stream(model, input_ids, attention_mask=None, *, draft: str = "auto", draft_steps: int = 1,
                  lookup_ngram: int = 3, probe_every: int = 16, **options):
    """Yields a StreamEvent per cycle; returns a GenerationResult whose details hold cycles,
    drafted and accepted tokens and how often each draft source was used.

    draft: "auto" (the DraftPolicy), "denoiser", "lookup" (prompt lookup, else an AR step) or
    "ar". Options: GenerationSettings fields; block_size caps the draft length,
    confidence_threshold truncates denoiser drafts, steps_per_block is unused (draft_steps
    denoiser passes per draft).
    """
    if draft not in DRAFT_SOURCES:
        raise TwoTowerError(f"draft must be one of {DRAFT_SOURCES}, got {draft!r}")
    if not isinstance(draft_steps, int) or draft_steps < 1:
        raise TwoTowerError(f"draft_steps must be an integer >= 1, got {draft_steps!r}")
    run = start_run(model, input_ids, attention_mask, "verify", options)
    s = run.settings
    s.block_size = s.block_size or model.config.block_size
    if s.block_size > model.config.block_size:
        raise TwoTowerError(f"block_size {s.block_size} is larger than the trained block size {model.config.block_size}")
    if draft == "denoiser" and model.config.layout != "shifted":
        raise TwoTowerError("verify mode drafts with the denoiser only in the shifted layout")
    ways = {"auto": ("denoiser", "lookup", "ar"), "denoiser": ("denoiser",), "lookup": ("lookup", "ar"),
            "ar": ("ar",)}[draft]
    if model.config.layout != "shifted":
        ways = tuple(w for w in ways if w != "denoiser")
    batch, ctx_device = run.ids.shape[0], run.ids.device

    # The first token comes from the prefill, exactly as in AR mode; from then on the cache holds
    # every committed token but the last one (`pending`), which the next cycle reads first.
    cache, logits = model.context_prefill(run.ids, run.attention_mask, logits="last")
    run.context_passes += 1
    pending, _ = sample_tokens(logits, s.temperature, s.top_p, run.generator)
    run.count_pass(~run.done)
    history = [row[mask.bool()].tolist() for row, mask in zip(run.ids, run.attention_mask)]
    for b, token in enumerate(pending.tolist()):
        history[b].append(token)
    yield run.emit([[t] for t in pending.tolist()])
    policy = DraftPolicy(batch, ways, probe_every)
    # With several rows, one pass serves them all and its cost grows with the longest draft, so
    # a batch-level gate (the same rule over "draft" and "ar" cycles, measured in committed
    # tokens of the whole batch per second) decides whether this cycle drafts at all.
    gate = DraftPolicy(1, ("draft", "ar"), probe_every) if batch > 1 and draft == "auto" else None
    counts = dict.fromkeys(("denoiser", "lookup", "ar"), 0)
    cycles, drafted_total, accepted_total = 0, 0, 0
    while True:
        active = [b for b in range(batch) if not run.done[b] and len(run.tokens[b]) < s.max_new_tokens]
        if not active:
            break
        begin = time.perf_counter()
        room = {b: min(s.block_size, s.max_new_tokens - len(run.tokens[b]) - 1) for b in active}
        drafts = [[] for _ in range(batch)]
        source = {}
        cycle_way = gate.choose(0) if gate is not None else "draft"
        for b in active:
            if cycle_way == "ar":
                source[b] = "ar"
                continue
            found = lookup_draft(history[b], room[b], lookup_ngram) if "lookup" in ways and room[b] > 0 else []
            source[b] = policy.choose(b, lookup_available=bool(found)) if draft == "auto" else ways[0]
            if source[b] == "lookup":
                if not found:
                    source[b] = "ar"
                drafts[b] = found[:policy.draft_length(b, "lookup", room[b])]
        den_rows = {b: policy.draft_length(b, "denoiser", room[b]) for b in active if source[b] == "denoiser"}
        den_rows = {b: n for b, n in den_rows.items() if n > 0}
        for b in active:
            if source[b] == "denoiser" and b not in den_rows:
                source[b] = "ar"
        q = None
        draft_passes = 0
        if den_rows:
            width = max(den_rows.values())
            tokens, q, lengths, draft_passes = denoiser_draft(model, cache, pending, width, s, run.generator,
                                                              draft_steps)
            run.denoiser_passes += draft_passes
            run.count_pass(list(den_rows), draft_passes)
            tokens, lengths = tokens.tolist(), lengths.tolist()
            for b, n in den_rows.items():
                drafts[b] = tokens[b][:min(lengths[b], n)]
        k = max(len(d) for d in drafts)
        draft_ids = torch.full((batch, k), run.pad_id, dtype=torch.long)
        for b in range(batch):
            draft_ids[b, :len(drafts[b])] = torch.tensor(drafts[b], dtype=torch.long)
        draft_len = torch.tensor([len(d) for d in drafts])
        if q is not None:  # rows not drafted by the denoiser: one-hot draft distributions
            q = q[:, :k].to(ctx_device)
            if q.shape[1] < k:
                q = torch.cat([q, q.new_zeros(batch, k - q.shape[1], q.shape[2])], dim=1)
            others = [b for b in range(batch) if b not in den_rows]
            q[others] = one_hot_law(draft_ids[others].to(ctx_device), q.shape[-1]).to(q.dtype)
        logits = model.context_extend(cache, torch.cat([pending[:, None], draft_ids.to(ctx_device)], dim=1),
                                      logits="all")  # (B, k+1, V)
        run.context_passes += 1
        run.count_pass(active)
        accepted, following = accept_drafts(logits, draft_ids.to(ctx_device), draft_len.to(ctx_device), q, s,
                                            run.generator)
        keep = torch.where(torch.tensor([b in active for b in range(batch)], device=ctx_device), 1 + accepted, 0)
        cache.keep_new(k + 1, keep)
        accepted, following = accepted.tolist(), following.tolist()
        new = [[] for _ in range(batch)]
        for b in active:
            new[b] = ([*drafts[b][:accepted[b]], following[b]])[: s.max_new_tokens - len(run.tokens[b])]
            history[b].extend(new[b])
            counts[source[b]] += 1
            drafted_total += len(drafts[b])
            accepted_total += accepted[b]
        pending = torch.tensor([following[b] if b in active else run.pad_id for b in range(batch)], device=ctx_device)
        cycles += 1
        event = run.emit(new)
        # cost of the cycle: wall time; with a seed, tower passes (so a seeded run is reproducible)
        cost = time.perf_counter() - begin if run.generator is None else None
        if gate is not None:
            gate.record(0, cycle_way, sum(len(new[b]) for b in active), cost if cost is not None else 1 + draft_passes)
        if cycle_way == "draft":
            for b in active:
                passes = 1 + (draft_passes if source[b] == "denoiser" else 0)
                policy.record(b, source[b], len(new[b]), cost if cost is not None else passes, accepted[b])
        yield event
    result = run.result()
    result.details = {
        "cycles": cycles,
        "drafted": drafted_total,
        "accepted_drafts": accepted_total,
        "accepted_per_cycle": round(accepted_total / max(sum(counts.values()), 1), 4),
        "draft_acceptance": round(accepted_total / max(drafted_total, 1), 4),
        "draft_sources": counts,
    }
    return result
