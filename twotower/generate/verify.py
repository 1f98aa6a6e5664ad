"""Verify mode: lossless speed-up. Drafts are checked by the context tower, so the output is
the AR model's token for token, greedy or sampled: at every position a row picks what AR
picks there, the argmax of its shaped logits (greedy) or their Gumbel-max with the noise of
that reply position (sampled, `twotower.generate.sampling`), and a draft is kept while it
equals those picks. Each row samples by its own settings and seed.

State between cycles: the context cache holds every committed token but the last one
(`pending`). That is exactly the denoiser's view in the shifted layout. One cycle, in named
steps:
  1. `choose_sources`: per row, where the draft comes from (the denoiser, prompt lookup, or
     nothing: a plain AR step), by the draft policy (`twotower.generate.draft`);
  2. `make_drafts`: up to k tokens after `pending` per row (the denoiser's among the draft
     vocabulary's N tokens, `VerifyOptions.draft_vocab`, as many as their confidences say pay);
  3. `verify_pass`: the context tower reads [pending, d_1 .. d_k] in one pass; its logits give
     the AR choice a_1 .. a_{k+1} after each prefix, and `accept_drafts` keeps the longest
     prefix with d_i == a_i, plus a_{j+1} (the correction, or a bonus token when every draft
     passed), so a cycle commits >= 1 token;
  4. `commit`: drop the rejected drafts from the cache; a_{j+1} becomes `pending`.

Draft policy (draft="auto"), per row: three sources, the denoiser, prompt lookup (only when the
last n tokens occurred earlier in the prompt or reply) and a plain AR step (no draft, one
token). Each row keeps an EMA of committed tokens per second of every source, uses the fastest,
and re-tries the others with a doubling wait (DraftPolicy), so a row whose drafts stop being
accepted falls back to AR speed. Outside those probes a source drafts only as many tokens as pay
for the wider pass, from how often its drafts are accepted and what the pass costs: none (an
AR step) where drafting is expected to lose. With several rows, a batch-level gate makes the
same choice between cycles that draft and plain AR cycles, on the whole batch's tokens per
second, and a drafting cycle cuts the rows' drafts at the one length that pays best for the
whole batch (`batch_width`), since one row's long draft widens every row's pass.
With a sampled row that has a seed (when the run starts) the cost of a cycle is counted in
tower passes instead of seconds, so that the choices and statistics are reproducible (the text
is anyway: it is AR's). Otherwise rows start from
what earlier requests measured (a `DraftMemory`, which whoever serves the requests keeps and
passes in; none given: a fresh one for this call).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from twotower.generate.common import Decoder, drive, select_rows, start_run
from twotower.generate.draft import (
    DraftMemory,
    DraftPolicy,
    TokenHistory,
    batch_bucket,
    denoiser_draft,
    expected_tokens,
    lookup_draft,
    lookup_kind,
    static_cost,
)
from twotower.generate.sampling import Sampling
from twotower.generate.tree import accept_path, tree_drafts
from twotower.model.protocol import DecodingModel
from twotower.settings import DRAFT_SOURCES, TwoTowerError, VerifyOptions

__all__ = ["DRAFT_SOURCES", "DraftPolicy", "accept_drafts", "lookup_draft", "verify_stream"]

SOURCES_BY_DRAFT = {"auto": ("denoiser", "lookup", "ar"), "denoiser": ("denoiser",), "lookup": ("lookup", "ar"), "ar": ("ar",)}


@dataclass
class Drafts:
    """What one cycle proposes: per row its tokens and source."""

    tokens: list[list[int]]  # per row (inactive rows: [])
    source: dict[int, str]  # per active row: "denoiser", "lookup" or "ar"
    den_rows: dict[int, int] = field(default_factory=dict)  # denoiser rows: the draft length each asks for
    kinds: dict[int, str] = field(default_factory=dict)  # lookup rows: the kind of their draft (`lookup_kind`)
    confidence: dict[int, list[float]] = field(default_factory=dict)  # denoiser rows: their drafts' confidences
    passes: int = 0  # denoiser passes made
    parents: torch.Tensor | None = None  # (B, N) token trees' parents (tree.py), None for chains

    def padded(self, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, k) draft ids padded with pad_id, and (B,) lengths."""
        batch, k = len(self.tokens), max(len(d) for d in self.tokens)
        ids = torch.full((batch, k), pad_id, dtype=torch.long)
        for b, d in enumerate(self.tokens):
            ids[b, : len(d)] = torch.tensor(d, dtype=torch.long)
        lengths = torch.tensor([len(d) for d in self.tokens])
        return ids.to(device), lengths.to(device)


def choose_sources(cycle_source: str, active, room, history, policy, sources, draft: str, block_size: int):
    """Step 1: per active row, the source it drafts this cycle and how far: the prompt-lookup
    drafts, and the length each denoiser row asks for (its block holds the pending token and
    the drafts, so at most block_size - 1 of them; `make_drafts` keeps what pays of them). A row
    left with nothing to draft takes an AR step, and a cycle the batch gate made plain AR drafts
    nothing."""
    tokens = [[] for _ in range(len(history))]
    source, kinds, den_rows = {}, {}, {}
    for b in active:
        if cycle_source == "ar":
            source[b] = "ar"
            continue
        found, match = history[b].match(room[b]) if "lookup" in sources and room[b] > 0 else ([], 0)
        kind = lookup_kind(match)
        source[b] = policy.choose(b, bool(found), room[b], kind) if draft == "auto" else sources[0]
        if source[b] == "lookup":
            tokens[b] = found[: policy.draft_length(b, "lookup", room[b], kind=kind)]
            kinds[b] = kind
        elif source[b] == "denoiser":  # as long as the block allows: the draft's confidences decide what is verified
            den_rows[b] = min(room[b], block_size - 1)
    return cap_drafts(Drafts(tokens, source, den_rows, kinds), None)


def batch_width(drafts: Drafts, policy, least: int = 0) -> int:
    """With several rows one pass serves them all and is as wide as the longest draft, so a
    row's drafts cost every row: the rows' drafts are cut at one length, the n (from `least`;
    0 = a plain AR cycle) that makes the most tokens per second for the whole batch. Each row
    expects `expected_tokens` of its own acceptance over min(n, the length it asked for) drafts
    (an AR row: its one token); the cycle costs a pass over n + 1 positions, and a denoiser
    draft while a denoiser row drafts."""
    wanted = [(len(drafts.tokens[b]), policy.acceptance(b, kind), False) for b, kind in drafts.kinds.items()]
    wanted += [(n, policy.acceptance(b, "denoiser"), True) for b, n in drafts.den_rows.items()]
    longest = max((n for n, _, _ in wanted), default=0)
    plain = len(drafts.source) - len(wanted)

    def rate(n: int) -> float:
        tokens = plain + sum(expected_tokens(alpha, min(n, k)) for k, alpha, _ in wanted)
        return tokens / policy.cost(n + 1, n > 0 and bool(drafts.den_rows))

    return max(range(min(least, longest), longest + 1), key=rate)  # the shortest of the best


def cap_drafts(drafts: Drafts, cap: int | None) -> Drafts:
    """Cut every row's draft (lookup tokens, denoiser length) at `cap` (None: uncut); a row
    left with none takes an AR step."""
    if cap is not None:
        drafts.den_rows = {b: min(n, cap) for b, n in drafts.den_rows.items()}
        for b in drafts.kinds:
            drafts.tokens[b] = drafts.tokens[b][:cap]
    for b in [b for b, n in drafts.den_rows.items() if n == 0]:
        del drafts.den_rows[b]
        drafts.source[b] = "ar"
    for b in [b for b in drafts.kinds if not drafts.tokens[b]]:
        del drafts.kinds[b]
        drafts.source[b] = "ar"
    return drafts


def make_drafts(
    model: DecodingModel, cache, pending, drafts: Drafts, settings, run, draft_steps: int, policy, head=None
) -> Drafts:
    """Step 2: the denoiser drafts for the rows that chose it, one batched draft of the longest
    length they ask for (`drafts.den_rows`), over the draft head `head` (None: the whole LM head);
    each row keeps as many of its drafts as its policy expects to pay, from their confidences
    (`DraftPolicy.confident_length`)."""
    if drafts.den_rows:
        width = max(drafts.den_rows.values())
        starts = run.positions(list(drafts.den_rows))
        tokens, confidence, drafts.passes = denoiser_draft(
            model, cache, pending, width, settings.threshold, run.sampling, starts, draft_steps, head
        )
        run.denoiser_passes += drafts.passes
        run.count_pass(list(drafts.den_rows), drafts.passes)
        tokens, confidence = tokens.tolist(), confidence.tolist()
        for b, n in drafts.den_rows.items():
            keep = policy.confident_length(b, confidence[b][:n])
            drafts.tokens[b], drafts.confidence[b] = tokens[b][:keep], confidence[b][:keep]
    return drafts


def verify_pass(model: DecodingModel, cache, pending: torch.Tensor, draft_ids: torch.Tensor, parents=None) -> torch.Tensor:
    """Step 3: the context tower reads [pending, drafts] (B, k+1) in one pass, appending them to
    the cache. Returns its logits (B, k+1, V): the AR choice after every prefix.

    At batch 1 its attention is exact (`base.exact_attention`): in bf16 too, each position gets
    the logits an AR step gives it, so the output is AR's token for token. With more rows it is
    not: rows that keep different numbers of drafts leave masked slots at different places, so
    a row's keys lie otherwise than in an AR batch anyway, and the exact form would cost a copy
    of the keys per query (docs/verify.md). parents: (B, k) token trees' (tree.py), or None."""
    tokens = torch.cat([pending[:, None], draft_ids], dim=1)
    if parents is not None:  # the pass holds the root (pending) first
        parents = torch.cat([parents.new_full((parents.shape[0], 1), -1), parents + 1], dim=1)
    return model.context_extend(cache, tokens, logits="all", exact=tokens.shape[0] == 1, parents=parents)


def accept_drafts(logits, drafts, draft_len, sampling: Sampling, starts: dict[int, int]):
    """Step 3 of the cycle. logits: (B, K+1, V) context logits after [pending, d_1..d_K];
    drafts: (B, K); draft_len: (B,); starts: row -> the reply position of d_1, where a sampled
    row's position noise starts. Every row picks at each position as AR would there (its
    penalties counting the drafts before it) and keeps its drafts up to the first that differs
    from the pick. Returns accepted counts (B,), the token committed after them (B,), and the
    picks (B, K+1)."""
    width = drafts.shape[1]
    choice = sampling.pick(logits, sampling.noise(logits, starts), prefix=drafts)  # (B, K+1)
    in_draft = torch.arange(width, device=drafts.device)[None] < draft_len[:, None]
    ok = (drafts == choice[:, :width]) & in_draft
    accepted = ok.long().cumprod(1).sum(1)
    return accepted, choice.gather(1, accepted[:, None])[:, 0], choice


def commit(cache, run, drafts: Drafts, active, accepted: list[int], following: list[int], history) -> list[list[int]]:
    """Step 4: keep the accepted drafts in the cache (the pending token and the accepted ones),
    drop the rest; returns the tokens each row commits (accepted drafts, then the context
    tower's own token), cut at max_new_tokens. A finished row keeps the pad token it read, as
    it does in an AR step: a cycle without drafts leaves the cache as an AR step leaves it,
    so that the passes after it are AR's (a hole in a row's mask turns the attention kernels
    to their masked form, which rounds otherwise in bf16, in every row of the batch)."""
    batch = len(drafts.tokens)
    width = max(len(d) for d in drafts.tokens) + 1
    is_active = torch.tensor([b in active for b in range(batch)], device=cache.valid.device)
    cache.keep_new(width, torch.where(is_active, 1 + torch.tensor(accepted, device=cache.valid.device), 1))
    new = [[] for _ in range(batch)]
    for b in active:
        new[b] = [*drafts.tokens[b][: accepted[b]], following[b]][: run.room(b)]
        history[b].extend(new[b])
    return new


class VerifyDecoder(Decoder):
    """Verify mode in cycles (module docstring). Between cycles the cache holds every committed
    token but each row's last one, `pending`, which the next verify pass reads first.
    memory: what earlier requests measured, which unseeded runs start from and add to (None: a
    fresh one)."""

    def __init__(self, model: DecodingModel, run, options: VerifyOptions = VerifyOptions(), memory: DraftMemory | None = None):
        super().__init__(model, run)
        draft = options.draft
        if draft == "denoiser" and not model.layout.anchored:
            raise TwoTowerError("verify mode drafts with the denoiser only in the shifted layout")
        self.options = options
        self.draft, self.draft_steps, self.lookup_ngram, self.probe_every = (
            draft, options.draft_steps, options.lookup_ngram, options.probe_every)  # fmt: skip
        self.given_memory = memory
        self.sources = tuple(w for w in SOURCES_BY_DRAFT[draft] if w != "denoiser" or model.layout.anchored)
        self.draft_head = model.draft_head(options.draft_vocab) if "denoiser" in self.sources else None
        self.counts = dict.fromkeys(("denoiser", "lookup", "ar"), 0)
        self.cycles = self.drafted = self.accepted = 0
        # Token trees where a pass can verify them (attention backbones; tree.py).
        self.tree_nodes = options.tree_nodes if model.verifies_trees else 0

    def start(self):
        # The first token comes from the prefill, exactly as in AR mode.
        run, s = self.run, self.run.settings
        self.cache, logits = self.read_prompts()
        self.pending, logprobs = run.next_tokens(logits)
        run.count_pass(~run.done)
        rows = zip(run.ids, run.attention_mask, self.pending.tolist())
        self.history = [TokenHistory([*row[mask.bool()].tolist(), token], self.lookup_ngram) for row, mask, token in rows]
        # Unseeded, a row starts from what earlier requests with these settings measured.
        memory = self.given_memory if self.given_memory is not None else DraftMemory()
        self.timed = not run.sampling.seeded  # else costs are counted in passes (module docstring)
        self.memory = memory if self.timed else None
        # What the memory is kept by: whatever changes a source's rate (a tree's acceptance is not a chain's).
        self.trees = self.tree_size() if run.batch == 1 and run.sampling.plain else 0  # nodes of a row's tree (tree.py)
        self.setting = (self.sources, s.block_size, s.threshold, self.trees, batch_bucket(run.batch))
        # What a cycle of each width costs: measured seconds (unseeded), else counted in passes.
        cost = static_cost if self.memory is None else self.memory.cycle_cost(run.batch)
        auto = self.draft == "auto"  # a source forced by the caller always drafts
        self.policy = DraftPolicy(
            run.batch, self.sources, self.probe_every, prior=self.prior("rows"), cost=cost, skip_unpaid=auto
        )
        # With several rows, one pass serves them all and its cost grows with the longest draft,
        # so a batch-level gate (the same rule over "draft" and "ar" cycles, measured in committed
        # tokens of the whole batch per second) decides whether a cycle drafts at all.
        self.batch_gate = None
        if self.draft == "auto":
            self.batch_gate = DraftPolicy(1, ("draft", "ar"), self.probe_every, prior=self.prior("gate"))
        yield run.emit([[t] for t in self.pending.tolist()], logprobs)

    def cycle(self):
        model, run, s = self.model, self.run, self.run.settings
        active = run.live_rows()
        begin = time.perf_counter()
        longest = self.longest_draft()
        room = {b: min(longest, run.room(b) - 1) for b in active}
        gate = self.batch_gate if run.batch > 1 else None
        cycle_source = gate.choose(0) if gate is not None else "draft"
        drafts = choose_sources(cycle_source, active, room, self.history, self.policy, self.sources, self.draft, s.block_size)
        if gate is not None and cycle_source == "draft":  # the rows' drafts share one pass: one length that pays for all
            drafts = cap_drafts(drafts, batch_width(drafts, self.policy, least=1 if gate.probing[0] else 0))
        if self.trees and drafts.den_rows:
            depth = {b: min(room[b], s.block_size - 1) for b in drafts.den_rows}
            drafts = tree_drafts(
                model, self.cache, self.pending, drafts, self.history, self.trees, depth, run, self.policy, self.draft_head
            )
        else:
            head = self.draft_head if not run.sampling.reshaped else None  # bias and penalties read the whole vocabulary
            drafts = make_drafts(model, self.cache, self.pending, drafts, s, run, self.draft_steps, self.policy, head)
        drafted = time.perf_counter()
        draft_ids, draft_len = drafts.padded(run.pad_id, self.pending.device)
        logits = verify_pass(model, self.cache, self.pending, draft_ids, drafts.parents)
        run.context_passes += 1
        run.count_pass(active)
        if drafts.parents is not None:  # the accepted path moved first, in the cache and the logits (tree.py)
            accepted, following, logits = accept_path(logits, drafts, self.cache)
            choice = logits.argmax(-1)
        else:
            accepted, following, choice = accept_drafts(logits, draft_ids, draft_len, run.sampling, run.positions(active))
        logprobs = run.sampling.logprobs(logits, choice)  # the accepted drafts and the token after them are the picks
        accepted, following = accepted.tolist(), following.tolist()
        seconds = self.measure(begin, drafted, draft_ids.shape[1] + 1, drafts)
        new = commit(self.cache, run, drafts, active, accepted, following, self.history)
        self.cycle_drafts = [(len(drafts.tokens[b]), accepted[b]) for b in active if drafts.tokens[b]]
        for b in active:
            self.counts[drafts.source[b]] += 1
            self.drafted += len(drafts.tokens[b])
            self.accepted += accepted[b]
        self.pending = torch.tensor(
            [following[b] if b in active else run.pad_id for b in range(run.batch)], device=self.pending.device
        )
        self.cycles += 1
        event = run.emit(new, logprobs)
        counted = not self.timed  # a seed: cost in tower passes, so that a seeded run is reproducible
        if gate is not None:
            gate.record(0, cycle_source, sum(len(new[b]) for b in active), 1 + drafts.passes if counted else seconds)
        if cycle_source == "draft":
            for b in active:
                passes = 1 + (drafts.passes if drafts.source[b] == "denoiser" else 0)
                tokens, spent = len(new[b]), passes if counted else seconds
                self.policy.record(b, drafts.source[b], tokens, spent, accepted[b], len(drafts.tokens[b]), drafts.kinds.get(b))
                if b in drafts.confidence:
                    self.policy.record_confidence(b, drafts.confidence[b], accepted[b])
        self.remember([b for b in active if run.room(b) == 0])
        yield event

    def measure(self, begin: float, drafted: float, width: int, drafts: Drafts) -> float | None:
        """Unseeded, the seconds this cycle cost (None: seeded). Its verify pass over `width`
        positions and its denoiser draft go to the DraftMemory, unless this is the first cycle
        of their shape at this batch size, whose time includes one-time set-up: such a cycle
        costs what the timings kept so far say (`DraftMemory.estimate`; None while none is
        kept, and a source whose rate is None is tried again)."""
        if self.memory is None:
            return None
        verified, batch = time.perf_counter(), self.run.batch
        draft_width = max(drafts.den_rows.values()) if drafts.passes else None
        if self.memory.first_timing(batch, width, draft_width):
            return self.memory.estimate(batch, width, draft_width is not None)
        self.memory.add_cycle(batch, width, verified - drafted, drafted - begin if drafts.passes else None)
        return verified - begin

    def longest_draft(self) -> int:
        """The most drafts a row's pass may hold: the block size, and on quantised weights as
        many as keep the pass on them (`exact_rows`: a wider pass takes the dense weights)."""
        longest = min(self.run.settings.block_size, self.options.max_draft or self.run.settings.block_size)
        if self.model.exact_rows is not None:
            longest = min(longest, self.model.exact_rows // self.run.batch - 1)
        return max(longest, 0)

    def tree_size(self) -> int:
        """The most nodes a token tree holds (0: chains): tree_nodes, cut by max_draft and, on
        quantised weights, to the rows that keep the pass on them (as `longest_draft`)."""
        nodes = min(self.tree_nodes, self.options.max_draft or self.tree_nodes)
        if self.model.exact_rows is not None:
            nodes = min(nodes, self.model.exact_rows // self.run.batch - 1)
        return max(nodes, 0)

    def prior(self, kind: str):
        """What the DraftMemory holds for this setting: of the rows ("rows") or of the
        batch gate ("gate"); None for a seeded run."""
        return None if self.memory is None else self.memory.prior((kind, *self.setting))

    def remember(self, rows: list[int]) -> None:
        """Rows that just finished leave what they measured to the DraftMemory (the
        batch gate's, with the last row of the batch)."""
        if self.memory is None:
            return
        policy, gate = self.policy, self.batch_gate
        for b in rows:
            self.memory.add(("rows", *self.setting), policy.rates[b], policy.measured_acceptance(b), policy.wait[b])
        if gate is not None and rows and self.run.finished:
            self.memory.add(("gate", *self.setting), gate.rates[0], gate.measured_acceptance(0), gate.wait[0])

    def join(self, other: VerifyDecoder) -> None:
        self.cache.join(other.cache)
        self.pending = torch.cat([self.pending, other.pending.to(self.pending.device)])
        self.history += other.history
        self.policy.join(other.policy)

    def keep_rows(self, rows: list[int]) -> None:
        self.cache.select(rows)
        self.pending = select_rows(self.pending, rows)
        self.history = [self.history[b] for b in rows]
        self.policy.keep_rows(rows)

    def details(self) -> dict:
        return {
            "cycles": self.cycles,
            "drafted": self.drafted,
            "accepted_drafts": self.accepted,
            "accepted_per_cycle": round(self.accepted / max(sum(self.counts.values()), 1), 4),
            "draft_acceptance": round(self.accepted / max(self.drafted, 1), 4),
            "draft_sources": self.counts,
        }


@torch.inference_mode()
def verify_stream(
    model,
    input_ids,
    attention_mask=None,
    *,
    verify: VerifyOptions | None = None,
    memory: DraftMemory | None = None,
    **options,
):
    """Yields a StreamEvent per cycle; returns a GenerationResult whose details hold cycles,
    drafted and accepted tokens and how often each draft source was used.

    verify: how it drafts (VerifyOptions; or its fields as keywords: draft "auto" (the
    DraftPolicy), "denoiser", "lookup" (prompt lookup, else an AR step) or "ar", ...).
    Options: GenerationSettings fields (or `settings=`); block_size caps the draft length,
    threshold: what each denoiser pass but a draft's last keeps (draft_steps > 1), steps_per_block
    is unused (draft_steps denoiser passes per draft). memory: the DraftMemory that unseeded runs start from and add to, kept
    by whoever serves requests (None: a fresh one for this call, as for a new model).
    """
    fields, options = VerifyOptions.split(options)
    if verify is None:
        verify = VerifyOptions(**fields)
    elif fields:
        raise TwoTowerError(f"pass the verify options in `verify` or as keywords, not both: {sorted(fields)}")
    run = start_run(model, input_ids, attention_mask, "verify", options)
    return (yield from drive(VerifyDecoder(model, run, verify, memory)))
