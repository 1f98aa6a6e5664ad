"""Sampling: each row's own settings and random source, applied to a batch's logits at once.

A row's sampling (`RowSampler`) is its GenerationSettings (temperature, top_p, top_k, min_p,
presence / frequency penalties, logit_bias, logprobs) and its seed. `Sampling`, the rows of a
run, shapes every row's logits in tensor form (`shaped`) and picks each token by Gumbel-max:
the argmax of the shaped logits plus Gumbel noise, none for a greedy row (temperature 0, which
ignores top_p / top_k / min_p; logit_bias and the penalties apply to greedy rows too). A row's
noise comes from its own generator (a seeded row; unseeded rows share torch's), drawn in
shapes that depend on that row alone, so that a seeded row writes the same tokens alone and
in any batch:

- `position_noise`: one (V,) draw per position of the reply, drawn once and kept until the
  position is committed. AR, mock-AR, the first token of a diffusion block and verify use it.
  Verify checks each draft against the context tower's Gumbel-max pick at its position with
  that position's noise, so its sampled reply is AR's token for token, whatever was drafted;
- `fresh_noise`: a new (block size, V) draw per denoiser pass, for the slots of a diffusion block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from twotower.settings import GenerationSettings


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the distribution it was chosen from (the
    model's own, before temperature, penalties and bias), and the k likeliest tokens'."""

    token: int
    logprob: float
    top: list[tuple[int, float]]  # (id, logprob), likeliest first


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> list[TokenLogprob]:
    """logits (N, V) as the model gave them, tokens (N,) -> each token's TokenLogprob."""
    logp = logits.float().log_softmax(-1)
    picked = logp.gather(-1, tokens[:, None])[:, 0].tolist()
    top_logp, top_ids = logp.topk(k, dim=-1)
    rows = zip(tokens.tolist(), picked, top_ids.tolist(), top_logp.tolist())
    return [TokenLogprob(t, lp, list(zip(ids, lps))) for t, lp, ids, lps in rows]


def gumbel(uniform: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(uniform.clamp_(1e-20, 1.0)))


class RowSampler:
    """One row's sampling: its settings, its random source, and how often it generated each
    token (for the penalties)."""

    def __init__(self, settings: GenerationSettings, seed: int | None):
        self.settings, self.seed = settings, seed
        self.generator: torch.Generator | None = None  # made at the first draw, on that device
        self.ahead: dict[int, torch.Tensor] = {}  # reply position -> its (V,) noise, until committed
        self.counts: dict[int, int] = {}  # token -> times generated (kept with a penalty only)

    @property
    def greedy(self) -> bool:
        return self.settings.temperature == 0

    @property
    def penalised(self) -> bool:
        return self.settings.presence_penalty != 0 or self.settings.frequency_penalty != 0

    def draw(self, shape: tuple[int, ...], device) -> torch.Tensor:
        """Gumbel noise of this shape from the row's generator (torch's for an unseeded row)."""
        if self.seed is None:
            return gumbel(torch.rand(shape, device=device))
        if self.generator is None:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        return gumbel(torch.rand(shape, generator=self.generator, device=self.generator.device)).to(device)

    def position_noise(self, start: int, width: int, vocab: int, device) -> torch.Tensor:
        """(width, V) noise of reply positions start .. start + width - 1: positions drawn
        before are reused, new ones drawn in order; positions before `start` are committed."""
        for p in [p for p in self.ahead if p < start]:
            del self.ahead[p]
        for p in range(start, start + width):
            if p not in self.ahead:
                self.ahead[p] = self.draw((vocab,), device)
        return torch.stack([self.ahead[p] for p in range(start, start + width)]).to(device)

    def record(self, tokens: list[int]) -> None:
        if self.penalised:
            for t in tokens:
                self.counts[t] = self.counts.get(t, 0) + 1

    def penalty(self, width: int, vocab: int, device, prefix: torch.Tensor | None) -> torch.Tensor:
        """(width, V) what the penalties subtract at each position; prefix (width - 1,): the
        tokens before each position within the pass (verify's drafts), counted too."""
        counts = torch.zeros(vocab, device=device)
        if self.counts:
            counts[torch.tensor(list(self.counts), device=device)] = torch.tensor(
                list(self.counts.values()), dtype=torch.float32, device=device
            )
        counts = counts.expand(width, vocab)
        if prefix is not None and width > 1:
            before = torch.zeros(width, vocab, device=device)
            before[1:] = torch.nn.functional.one_hot(prefix[: width - 1].to(device), vocab).float().cumsum(0)
            counts = counts + before
        s = self.settings
        return s.frequency_penalty * counts + s.presence_penalty * (counts > 0).float()


class Sampling:
    """The rows of a run, each with its RowSampler, in the run's order (rows join and leave
    with the run)."""

    def __init__(self, rows: list[RowSampler]):
        self.rows = rows

    @classmethod
    def of(cls, settings: GenerationSettings, batch: int) -> Sampling:
        """One setting for every row of a call; row b draws from seed + b."""
        seed = settings.seed
        return cls([RowSampler(settings, None if seed is None else (seed + b) % 2**64) for b in range(batch)])

    def join(self, other: Sampling) -> None:
        self.rows += other.rows

    def keep_rows(self, rows: list[int]) -> None:
        self.rows = [self.rows[b] for b in rows]

    @property
    def seeded(self) -> bool:
        """Whether a sampled row has a seed (its reply must not depend on wall-clock time)."""
        return any(r.seed is not None and not r.greedy for r in self.rows)

    @property
    def reshaped(self) -> bool:
        """Whether a row adds a logit_bias or penalties (its picks read the whole vocabulary)."""
        return any(r.settings.logit_bias or r.penalised for r in self.rows)

    @property
    def plain(self) -> bool:
        """Every row greedy, with no bias and no penalty: the pick is the logits' argmax."""
        return all(r.greedy for r in self.rows) and not self.reshaped

    def noise(self, logits: torch.Tensor, starts: dict[int, int], head=None) -> torch.Tensor | None:
        """(B, W, V) position noise of row b's reply positions starts[b] .. + W - 1 for the
        rows in `starts`; zero elsewhere and in greedy rows (None: no row draws). head: a
        `DraftHead` whose N tokens the logits (B, W, N) cover: the noise at those tokens of the
        whole vocabulary's draw (the same noise the context tower's pick reads)."""
        rows = {b: p for b, p in starts.items() if not self.rows[b].greedy}
        if not rows:
            return None
        noise = torch.zeros(logits.shape, device=logits.device)
        vocab = logits.shape[2] if head is None else head.width
        for b, p in rows.items():
            drawn = self.rows[b].position_noise(p, logits.shape[1], vocab, logits.device)
            noise[b] = drawn if head is None else drawn[:, head.ids.to(drawn.device)]
        return noise

    def fresh_noise(self, logits: torch.Tensor, rows: list[int], size: int) -> torch.Tensor | None:
        """(B, W, V) noise for one denoiser pass over a block of W <= size slots: a new (size, V)
        draw per sampled row in `rows`, its first W slots (so a draw's shape is the row's own)."""
        rows = [b for b in rows if not self.rows[b].greedy]
        if not rows:
            return None
        noise = torch.zeros(logits.shape, device=logits.device)
        for b in rows:
            noise[b] = self.rows[b].draw((size, logits.shape[2]), logits.device)[: logits.shape[1]]
        return noise

    def shaped(self, logits: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """(B, W, V) logits -> what each row's pick maximises before the noise: logit_bias added,
        penalties subtracted, divided by the temperature, filtered by top-k / top-p / min-p
        (sampled rows). prefix (B, W - 1): tokens before each position within the pass."""
        x = logits.to(torch.float32, copy=True)
        width, vocab = x.shape[1:]
        for b, row in enumerate(self.rows):
            bias = row.settings.logit_bias
            if bias:
                x[b, :, torch.tensor(list(bias), device=x.device)] += torch.tensor(list(bias.values()), device=x.device)
            if row.penalised:
                x[b] -= row.penalty(width, vocab, x.device, None if prefix is None else prefix[b])
        sampled = [not r.greedy for r in self.rows]
        if not any(sampled):
            return x
        per_row = lambda values: torch.tensor(values, dtype=torch.float32, device=x.device)[:, None, None]
        x = x / per_row([r.settings.temperature if s else 1.0 for r, s in zip(self.rows, sampled)])
        top_k = [r.settings.top_k if s and r.settings.top_k else vocab for r, s in zip(self.rows, sampled)]
        top_p = [r.settings.top_p if s and r.settings.top_p < 1 else 2.0 for r, s in zip(self.rows, sampled)]
        min_p = [r.settings.min_p if s else 0.0 for r, s in zip(self.rows, sampled)]
        rows = [b for b in range(len(self.rows)) if top_k[b] < vocab or top_p[b] < 1 or min_p[b] > 0]  # rows that filter
        if rows:
            pick = lambda values: per_row([values[b] for b in rows])
            x[rows] = filtered(x[rows], pick(top_k), pick(top_p), pick(min_p))
        return x

    def pick(self, logits: torch.Tensor, noise: torch.Tensor | None = None, prefix: torch.Tensor | None = None):
        """The token each row picks at each position: logits (B, W, V) -> (B, W)."""
        if self.plain:
            return logits.argmax(-1)
        x = self.shaped(logits, prefix)
        return (x if noise is None else x + noise).argmax(-1)

    def record(self, b: int, tokens: list[int]) -> None:
        self.rows[b].record(tokens)

    def wants_logprobs(self) -> bool:
        return any(r.settings.logprobs is not None for r in self.rows)

    def logprobs(self, logits: torch.Tensor, tokens: torch.Tensor) -> list[list[TokenLogprob] | None] | None:
        """Per row asking for them: the TokenLogprob of its token at every position, logits
        (B, W, V) as the model gave them, tokens (B, W); None for the other rows (None: no row asks)."""
        if not self.wants_logprobs():
            return None
        return [
            None if r.settings.logprobs is None else token_logprobs(logits[b], tokens[b], r.settings.logprobs)
            for b, r in enumerate(self.rows)
        ]


CANDIDATES = 1024  # the likeliest tokens `filtered` ranks first; the whole vocabulary only where they do not decide


def filtered(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """-inf outside each row's kept tokens: its top_k likeliest, the smallest set whose mass
    reaches top_p, and those at least min_p times as likely as the likeliest; the likeliest is
    always kept. x (..., V); top_k, top_p, min_p broadcast to (..., 1). Ranks only the likeliest CANDIDATES
    (or top_k, if fewer) of each position, which decide wherever every token past them is dropped
    (past top_k, past a mass of top_p, or below min_p); the other positions rank the whole
    vocabulary. Either way a token's probability is its softmax over the whole vocabulary."""
    vocab = x.shape[-1]
    top_k, top_p, min_p = (torch.as_tensor(t, device=x.device).expand(*x.shape[:-1], 1) for t in (top_k, top_p, min_p))
    top_k_only = bool((top_p >= 1).all() and (min_p <= 0).all())
    first = min(vocab, int(top_k.max()) if top_k_only else CANDIDATES)
    values, order = x.topk(first, dim=-1)  # (..., K), likeliest first
    probs = (values - x.logsumexp(-1, keepdim=True)).exp()
    drop = _dropped(probs, top_k, top_p, min_p)
    past = probs.sum(-1) >= top_p[..., 0]  # every token past the candidates is dropped, by top_p ...
    past |= top_k[..., 0] <= first  # ... by top_k ...
    past |= probs[..., -1] < min_p[..., 0] * probs[..., 0]  # ... or by min_p (they are no likelier than the last candidate)
    keep = torch.zeros_like(x, dtype=torch.bool).scatter(-1, order, ~drop)
    if not bool(past.all()):  # a flat distribution: rank the whole vocabulary there
        at = (~past).nonzero(as_tuple=True)
        every_v, every_o = x[at].sort(dim=-1, descending=True)  # (n, V)
        every_p = (every_v - x[at].logsumexp(-1, keepdim=True)).exp()
        every_drop = _dropped(every_p, top_k[at], top_p[at], min_p[at])
        keep[at] = torch.zeros_like(every_drop).scatter(-1, every_o, ~every_drop)
    return x.masked_fill(~keep, float("-inf"))


def _dropped(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Which ranked tokens a filter drops: probs (..., K) likeliest first, settings (..., 1); the
    likeliest never."""
    rank = torch.arange(probs.shape[-1], device=probs.device)
    drop = (rank >= top_k) | ((probs.cumsum(-1) - probs) >= top_p) | (probs < min_p * probs[..., :1])
    drop[..., 0] = False
    return drop
