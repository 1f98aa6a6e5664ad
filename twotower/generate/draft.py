"""Drafts for verify mode: where the tokens a cycle proposes come from, and the policy that
chooses between the sources per row.

- `lookup_draft`: prompt lookup, the tokens that followed the latest earlier occurrence of the
  last n tokens in the prompt and reply (free: no tower pass); `TokenHistory` keeps a row's
  tokens indexed so that finding it costs the same over any length of history;
- `denoiser_draft`: the denoiser fills a block after the pending token (the context tower's
  own next token, slot 0 of the block, as in diffusion mode) in `steps` passes, each but the
  last keeping the left-to-right run of slots above the confidence threshold; a sampled row picks
  each slot with the noise of its reply position, the noise the context tower's pick there
  uses, so a denoiser close to the context tower drafts the token that will be picked;
- `DraftPolicy`: per row, an EMA of committed tokens per unit of cost for each source, the
  fastest used, the others re-tried with a doubling wait; a draft is as long as pays, from how
  often the source's tokens are accepted (a denoiser draft: how likely the denoiser finds each
  of its tokens) and what a pass over so many positions costs.
  A row may start from what earlier requests measured (`DraftMemory`: rates, acceptance, the
  seconds of each pass width) instead of trying every source first, which on a short reply
  costs more than it can gain. The memory belongs to whoever serves the requests (the server's
  engine, a benchmark run), not to the model's weights.
"""

from __future__ import annotations

import torch

from twotower.generate.sampling import Sampling
from twotower.model.protocol import DecodingModel


def lookup_match(history: list[int], max_len: int, ngram: int = 3) -> tuple[list[int], int]:
    """Prompt lookup: find the latest earlier occurrence of the last n tokens (n = ngram..1)
    in the history and propose what followed it (at most max_len tokens). Returns the draft
    and n, the length of the match (0: none)."""
    for n in range(min(ngram, len(history) - 1), 0, -1):
        tail = history[-n:]
        for start in range(len(history) - n - 1, -1, -1):
            if history[start : start + n] == tail:
                return history[start + n : start + n + max_len], n
    return [], 0


def lookup_draft(history: list[int], max_len: int, ngram: int = 3) -> list[int]:
    """The draft of `lookup_match` alone."""
    return lookup_match(history, max_len, ngram)[0]


class TokenHistory:
    """A row's prompt and reply tokens, with where each n-gram (n = 1..ngram) last began, so that
    prompt lookup costs a few dict reads a cycle instead of `lookup_match`'s scan of the whole
    history, whose cost grows with the history. `match` returns what `lookup_match` does."""

    def __init__(self, tokens: list[int], ngram: int = 3):
        self.tokens, self.ngram = list(tokens), ngram
        self.latest = [{} for _ in range(ngram + 1)]  # n -> n-gram -> its latest start
        self.indexed = 0  # n-grams ending before this position are in `latest`

    def extend(self, tokens: list[int]) -> None:
        self.tokens.extend(tokens)

    def match(self, max_len: int) -> tuple[list[int], int]:
        """`lookup_match(tokens, max_len, ngram)`: the tokens after the latest earlier occurrence
        of the last n, and n (0: none). An occurrence counts when it ends before the last token."""
        tokens = self.tokens
        for end in range(self.indexed, len(tokens) - 1):  # index the n-grams that now end early enough
            for n in range(1, min(self.ngram, end + 1) + 1):
                self.latest[n][tuple(tokens[end - n + 1 : end + 1])] = end - n + 1
        self.indexed = max(self.indexed, len(tokens) - 1)
        for n in range(min(self.ngram, len(tokens) - 1), 0, -1):
            start = self.latest[n].get(tuple(tokens[-n:]))
            if start is not None:
                return tokens[start + n : start + n + max_len], n
        return [], 0


def lookup_kind(match: int) -> str:
    """The name under which lookup drafts of a match of this length keep their acceptance: a
    longer match is accepted more often, so each length keeps its own."""
    return f"lookup{match}"


@torch.no_grad()
def denoiser_draft(
    model: DecodingModel,
    cache,
    pending,
    width: int,
    threshold: float,
    sampling: Sampling,
    starts: dict[int, int],
    steps: int,
    head=None,
):
    """Draft `width` tokens after `pending` with the denoiser, left to right.

    The cache holds every committed token but `pending`, the context tower's own next token. As
    in diffusion mode, the block's slot 0 is that known token (y_0 = pending) and slots 1..width
    are masked: in the shifted layout the denoiser reads [anchor, pending, M, ...] over the view
    without the anchor (the cache's last token, whose hidden state a shallow denoiser reads).
    Every pass but the last keeps the drafted prefix and extends it over the following slots
    predicted above the confidence threshold (at least one); the last pass drafts every slot
    still open, so a draft always holds `width` tokens, each with the confidence it was drafted
    with (how many of them a cycle verifies is the draft policy's choice,
    `DraftPolicy.confident_length`). Each row picks by its own sampling; starts: row -> the
    reply position of its first draft (where its position noise starts). head: a `DraftHead`
    (the draft vocabulary's N tokens: logits, picks, noise and confidence among them only; for
    rows with no logit_bias and no penalty), or None: the whole head. Only the drafted slots'
    logits are computed (not slot 0's, the pending token). Returns tokens (B, W), their
    confidence (B, W) and the number of passes."""
    den, mask_id = model.denoiser_device, model.mask_token_id
    batch = pending.shape[0]
    reads = model.layout.reads(cache, den)
    block = torch.full((batch, width + 1), mask_id, dtype=torch.long, device=den)
    block[:, 0] = pending.to(den)
    length = torch.zeros(batch, dtype=torch.long, device=den)
    kept = torch.zeros(batch, width, device=den)
    slots = torch.arange(width, device=den)[None]
    for passes in range(1, steps + 1):
        t = (width - length).float() / width
        logits = model.denoise_block(reads, block, t, head=head, first=1)  # (B, W, V), or (B, W, N) with a head
        tokens = sampling.pick(logits, sampling.noise(logits, starts, head))
        confidence = logits.softmax(-1).gather(-1, tokens[..., None])[..., 0].float()
        if head is not None:
            tokens = head.ids[tokens]  # token ids
        open_slots = slots >= length[:, None]
        take = (confidence > threshold) | (slots == length[:, None]) | (passes == steps)
        take = (take | ~open_slots).long().cumprod(1).bool() & open_slots  # contiguous from `length`
        block[:, 1:] = torch.where(take, tokens, block[:, 1:])
        kept = torch.where(take, confidence, kept)
        length = length + take.sum(1)
        if bool((length >= width).all()):
            break
    return block[:, 1:], kept, passes


def ema(old: float | None, new: float | None, decay: float) -> float | None:
    """An exponential moving average's next value: the new value alone when there is no old
    one, the old one kept when there is no new one."""
    if old is None or new is None:
        return new if old is None else old
    return decay * old + (1 - decay) * new


def static_cost(width: int, denoiser: bool) -> float:
    """A cycle's cost in one-position passes where no seconds are measured (a seeded run, or
    a model's first cycles): the verify pass over `width` positions, a wider one a little
    dearer (17 positions as 2 one-position passes), plus one pass of the denoiser."""
    return 1.0 + (width - 1) / 16 + float(denoiser)


def interpolate(points: dict[int, float], x: int) -> float:
    """Linear between the nearest measured widths; flat past the first and the last."""
    below = [w for w in points if w <= x]
    above = [w for w in points if w >= x]
    if not below or not above:
        return points[min(above)] if above else points[max(below)]
    lo, hi = max(below), min(above)
    if lo == hi:
        return points[lo]
    return points[lo] + (points[hi] - points[lo]) * (x - lo) / (hi - lo)


def batch_bucket(rows: int) -> int:
    """The batch sizes the memory keeps apart: powers of two (a pass over 6 rows costs about
    what one over 8 does, and a server's batch size changes from request to request)."""
    return 1 << max(rows - 1, 0).bit_length()


class DraftMemory:
    """What earlier requests measured (kept by whoever serves them: the server's engine, a
    benchmark run), for requests that neither try every source again nor probe a source that
    keeps losing as often as a first request must, and that draft only as far as pays:

    - per setting (the sources, block size, threshold and batch size, `batch_bucket`): the mean of the rates,
      acceptance and probe waits the rows ended with;
    - per batch size: the seconds of a verify pass over each width, and of a denoiser draft.
      A pass's cost depends on the machine, the dtype and the weights (quantised weights turn
      to the dense ones past `exact_rows`), so it is measured, not assumed.

    Only for unseeded runs, whose costs are wall-clock seconds anyway (a seeded run must not
    depend on what ran before it)."""

    def __init__(self, decay: float = 0.7):
        self.decay = decay
        self.seen: dict[tuple, dict[str, tuple[float, float, float]]] = {}
        self.passes: dict[int, dict[int, float]] = {}  # batch -> width -> seconds of a verify pass
        self.drafting: dict[int, float] = {}  # batch -> seconds of a denoiser draft
        self.timed: set[tuple] = set()  # the shapes timed once already (`first_timing`)

    def first_timing(self, batch: int, width: int, draft_width: int | None) -> bool:
        """Whether this cycle is the first at this batch size with a verify pass over `width`
        positions, or with a denoiser draft of `draft_width` tokens (None: no draft): its time
        includes one-time set-up (kernels chosen, buffers allocated for a new shape) that later
        passes do not pay, so it is not kept: the cycle counts as `estimate` says."""
        batch = batch_bucket(batch)
        shapes = {(batch, width)} | (set() if draft_width is None else {(batch, "draft", draft_width)})
        first = not shapes <= self.timed
        self.timed |= shapes
        return first

    def estimate(self, batch: int, width: int, denoiser: bool) -> float | None:
        """The seconds of a cycle of this width (with a denoiser draft or not) from the timings
        kept so far at this batch size (`cycle_cost`), None while none is kept."""
        if not self.passes.get(batch_bucket(batch)):
            return None
        return self.cycle_cost(batch)(width, denoiser)

    def prior(self, key) -> dict[str, tuple[float, float, float]]:
        """source -> (rate, acceptance, wait) measured under this setting so far (empty: none)."""
        return dict(self.seen.get(key, {}))

    def add(self, key, rates: dict, acceptance: dict, waits: dict, weight: float = 0.5) -> None:
        """Fold in one finished row's rates, acceptance and waits (sources it never used are
        skipped), and the acceptance of its kinds of draft (rate and wait None)."""
        known = self.seen.setdefault(key, {})
        found = {
            source: (rate, acceptance.get(source), float(waits[source])) for source, rate in rates.items() if rate is not None
        }
        found |= {kind: (None, a, None) for kind, a in acceptance.items() if kind not in rates and a is not None}
        for source, new in found.items():
            known[source] = tuple(ema(o, n, weight) for o, n in zip(known.get(source, new), new))

    def add_cycle(self, batch: int, width: int, pass_seconds: float, draft_seconds: float | None) -> None:
        """One cycle's verify pass over `width` positions, and its denoiser draft (None: none)."""
        batch = batch_bucket(batch)
        widths = self.passes.setdefault(batch, {})
        widths[width] = ema(widths.get(width), pass_seconds, self.decay)
        if draft_seconds is not None:
            self.drafting[batch] = ema(self.drafting.get(batch), draft_seconds, self.decay)

    def cycle_cost(self, batch: int):
        """(width, denoiser) -> seconds of such a cycle at this batch size: the verify pass over
        `width` positions, interpolated between the widths measured (flat past them, so that an
        unmeasured width is tried rather than assumed dear), plus a denoiser draft (as dear as a
        one-position pass until one is measured); `static_cost` while nothing is measured."""
        batch = batch_bucket(batch)
        widths = self.passes.get(batch)
        if not widths:
            return static_cost

        def cost(width: int, denoiser: bool) -> float:
            drafting = self.drafting.get(batch, interpolate(widths, 1)) if denoiser else 0.0
            return interpolate(widths, width) + drafting

        return cost


def expected_tokens(acceptance: float, drafts: int) -> float:
    """Tokens a cycle commits when each of `drafts` draft tokens is accepted with probability
    `acceptance` given the ones before it: the accepted run plus the context tower's own token."""
    return sum(acceptance**i for i in range(drafts + 1))


class DraftPolicy:
    """Per row, for each source of drafting ("denoiser", "lookup", "ar" = no draft): an EMA of
    committed tokens per unit of cost (seconds), and how often a drafted token is accepted.

    Every source is tried once; then each cycle uses the best source among those available
    (lookup only when the history offers a match): with `skip_unpaid` (verify's auto), the one
    expected to make the most tokens per second (`expected_rate`: acceptance over the cost
    model), else the one with the best measured rate. A source that is not the best is
    re-tried (probed) after `probe_every` cycles; each probe that leaves it behind doubles its
    wait (up to `max_wait`), so probing costs little once the best source is clear, and a source
    that wins a probe is back in use at once.

    A draft is as long as pays best: the length n that makes the most tokens per second, the
    expected tokens of n drafts (`expected_tokens`, from the row's acceptance of that source) over
    the cost of a cycle over n + 1 positions, `cost(width, denoiser)` (measured seconds,
    `DraftMemory.cycle_cost`, or `static_cost`). Where a wider pass is dear (quantised weights)
    drafts stay short unless they are accepted often; where it is nearly free they grow. With
    `skip_unpaid`, n = 0 (a plain AR step) is among the lengths: a source whose drafts are
    expected to cost more than they gain drafts nothing, except when it is probed.
    prior: source -> (rate, acceptance, wait) that every row starts from (`DraftMemory.prior`); a
    source in it counts as tried, and waits as long as earlier rows ended up waiting for it.
    A draft may keep its acceptance under a kind of its own (`kind`): lookup drafts by the
    length of their match (`lookup_kind`); a prior may hold kinds too (rate and wait None)."""

    PRIOR_TRIALS = 4.0  # how many drafted tokens a prior's acceptance counts as

    def __init__(
        self,
        batch: int,
        sources: tuple[str, ...],
        probe_every: int = 8,
        decay: float = 0.7,
        max_wait: int = 256,
        prior: dict[str, tuple[float, float, float]] | None = None,
        cost=static_cost,
        acceptance_decay: float = 0.7,
        skip_unpaid: bool = False,
    ):
        self.sources, self.probe_every, self.decay, self.max_wait = sources, probe_every, decay, max_wait
        self.cost, self.acceptance_decay, self.skip_unpaid = cost, acceptance_decay, skip_unpaid
        self.every = tuple(dict.fromkeys([*sources, "ar"]))  # a forced source still falls back to AR steps
        prior = prior or {}
        self.rates = [{w: prior[w][0] if w in prior else None for w in self.every} for _ in range(batch)]
        # per source (or kind of draft): decayed counts of accepted draft tokens and of draft tokens judged
        known = {w: (v[1] * self.PRIOR_TRIALS, self.PRIOR_TRIALS) for w, v in prior.items() if v[1] is not None}
        self.counts = [{**dict.fromkeys(self.every, (0.0, 0.0)), **known} for _ in range(batch)]
        self.last_used = [dict.fromkeys(self.every, -1) for _ in range(batch)]
        start_wait = {w: max(probe_every, int(prior[w][2])) if w in prior else probe_every for w in self.every}
        self.wait = [dict(start_wait) for _ in range(batch)]
        self.cycles = [0] * batch
        self.probing = [False] * batch  # whether the source chosen last is tried or probed, not the best
        self.calibrated = [(0.0, 0.0)] * batch  # decayed accepted denoiser drafts, and their confidences' sum

    ROW_FIELDS = ("rates", "counts", "last_used", "wait", "cycles", "probing", "calibrated")  # one entry per row each

    def join(self, other: DraftPolicy) -> None:
        """Take the rows of another policy (continuous batching)."""
        for name in self.ROW_FIELDS:
            getattr(self, name).extend(getattr(other, name))

    def keep_rows(self, rows: list[int]) -> None:
        for name in self.ROW_FIELDS:
            values = getattr(self, name)
            setattr(self, name, [values[b] for b in rows])

    def _best(self, row: int, sources) -> str:
        rate = self.rates[row]
        return max(sources, key=lambda w: -1.0 if rate[w] is None else rate[w])

    def choose(self, row: int, lookup_available: bool = True, room: int | None = None, lookup: str | None = None) -> str:
        """The source of this cycle: an untried one, else one due for a probe, else the best (of
        those whose drafts pay, with skip_unpaid: drafts of at most `room` tokens; lookup: the
        kind of this cycle's lookup draft)."""
        sources = [w for w in self.sources if w != "lookup" or lookup_available]
        untried = [w for w in sources if self.rates[row][w] is None]
        self.probing[row] = True
        if untried:
            return untried[0]
        kind = lambda w: lookup if w == "lookup" else None
        paid = [w for w in sources if not self.skip_unpaid or room is None or self.pays(row, w, room, kind(w))]
        if self.skip_unpaid and room is not None:  # by what each is expected to make: acceptance over cost
            best = max(paid or sources, key=lambda w: self.expected_rate(row, w, room, kind(w)))
        else:
            best = self._best(row, paid or sources)
        now, last, wait = self.cycles[row], self.last_used[row], self.wait[row]
        due = [w for w in sources if w != best and now - last[w] >= wait[w]]
        self.probing[row] = bool(due)
        return min(due, key=last.get) if due else best

    def acceptance(self, row: int, source: str) -> float:
        """How often a drafted token of this source (or kind of draft) is accepted when the ones
        before it were (one accepted and one rejected token assumed besides those judged)."""
        hits, trials = self.counts[row].get(source, (0.0, 0.0))
        return (hits + 1.0) / (trials + 2.0)

    def pays(self, row: int, source: str, room: int, kind: str | None = None) -> bool:
        """Whether a cycle of this source is expected to make as many tokens per second as an AR step
        or more (an AR step always does)."""
        return source == "ar" or self.draft_length(row, source, room, least=0, kind=kind) > 0

    def expected_rate(self, row: int, source: str, room: int, kind: str | None = None) -> float:
        """Tokens per unit of cost a cycle of this source is expected to make at its best draft
        length: its acceptance's expected tokens over the cost of that cycle (an AR step: one
        token over a one-position pass). Smoother than the measured rate of the last cycles,
        which a few unlucky drafts sink for as long as the source then waits for a probe."""
        n = self.draft_length(row, source, room, least=0, kind=kind)
        if n == 0:
            return 1 / self.cost(1, False)
        return expected_tokens(self.acceptance(row, kind or source), n) / self.cost(n + 1, source == "denoiser")

    def draft_length(self, row: int, source: str, room: int, least: int | None = None, kind: str | None = None) -> int:
        """The draft length that pays best, of `least` to `room` tokens (least: 0 with
        skip_unpaid outside a probe, else 1), from the acceptance of `kind` (default: the source)."""
        if source == "ar" or room <= 0:
            return 0
        alpha, denoiser = self.acceptance(row, kind or source), source == "denoiser"
        if least is None:
            least = self.fewest(row)
        pays = [1 / self.cost(1, False) if n == 0 else expected_tokens(alpha, n) / self.cost(n + 1, denoiser)
                for n in range(least, room + 1)]  # fmt: skip
        return least + max(range(len(pays)), key=pays.__getitem__)  # the shortest of the best

    def fewest(self, row: int) -> int:
        """The shortest draft a row's cycle may verify: 0 (a plain AR step) outside a probe with
        skip_unpaid, else 1 (a probe, or a forced source, drafts at least one token)."""
        return 0 if self.skip_unpaid and not self.probing[row] else 1

    def calibration(self, row: int) -> float:
        """How many of this row's denoiser drafts were accepted per unit of the confidence they
        were drafted with (1 until one is judged): the factor that turns a confidence into an
        acceptance (the denoiser's confidence is its own, not the context tower's, and may be
        surer or less sure than the context tower's choices bear out)."""
        hits, expected = self.calibrated[row]
        return (hits + 1.0) / (expected + 1.0)

    def confident_length(self, row: int, confidence: list[float], least: int | None = None) -> int:
        """How many of a denoiser draft's tokens (drafted with these confidences, left to right)
        the cycle verifies: the n, of `least` to all, that makes the most tokens per second, the
        expected tokens of n drafts (each accepted, when the ones before it were, with its
        confidence times `calibration`) over the cost of a cycle over n + 1 positions with a
        draft. least: as `draft_length`'s (0 outside a probe with skip_unpaid, else 1)."""
        scale, reach, chances = self.calibration(row), 1.0, []
        for p in confidence:
            reach *= min(scale * p, 1.0)
            chances.append(reach)
        return self.confident_nodes(row, chances, least)

    def confident_nodes(self, row: int, chances: list[float], least: int | None = None) -> int:
        """How many of a draft's nodes (a chain's tokens, or a token tree's nodes, parents first)
        the cycle verifies: the n, of `least` to all, whose expected tokens (1 + the sum of the
        first n nodes' chances of being accepted) per unit of the cost of a cycle over n + 1
        positions with a denoiser draft are highest. least: as `draft_length`'s."""
        if least is None:
            least = self.fewest(row)
        least = min(least, len(chances))
        expected = [1.0]
        for chance in chances:
            expected.append(expected[-1] + chance)
        pays = [expected[n] / self.cost(n + 1, True) for n in range(least, len(expected))]
        return least + max(range(len(pays)), key=pays.__getitem__)  # the shortest of the best

    def record_confidence(self, row: int, confidence: list[float], accepted: int) -> None:
        """A denoiser draft verified with these confidences had `accepted` tokens accepted: the
        tokens judged (the accepted run and the one that broke it) update `calibration`."""
        judged = confidence[: accepted + 1]
        hits, expected = self.calibrated[row]
        d = self.acceptance_decay
        self.calibrated[row] = (d * hits + accepted, d * expected + sum(judged))

    def record(
        self, row: int, source: str, tokens: int, cost: float | None, accepted: int = 0, drafted: int = 0, kind: str | None = None
    ) -> None:
        """A cycle of `source` committed `tokens` at `cost`, accepting `accepted` of `drafted` drafts
        (counted under `kind`, default the source). cost None: a cycle whose time says nothing of
        later ones (`DraftMemory.first_timing`): its acceptance counts, its rate does not (a
        source without a rate is tried again)."""
        self.last_used[row][source] = self.cycles[row]
        self.cycles[row] += 1
        if cost is not None:
            self.rates[row][source] = ema(self.rates[row][source], tokens / max(cost, 1e-9), self.decay)
        if drafted:
            hits, trials = self.counts[row].get(kind or source, (0.0, 0.0))
            judged = accepted + (1 if accepted < drafted else 0)  # the run, and the token that broke it
            d = self.acceptance_decay
            self.counts[row][kind or source] = (d * hits + accepted, d * trials + judged)
        if self._best(row, self.every) == source:
            self.wait[row][source] = self.probe_every
        else:
            self.wait[row][source] = min(2 * self.wait[row][source], self.max_wait)

    def measured_acceptance(self, row: int) -> dict[str, float | None]:
        """source (and kind of draft) -> this row's acceptance, None where no draft was judged."""
        return {w: self.acceptance(row, w) if trials else None for w, (_, trials) in self.counts[row].items()}
