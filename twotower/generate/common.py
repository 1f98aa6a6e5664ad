"""What every generation mode shares: input checks and left padding, per-row bookkeeping of
finished rows, the result with its statistics, and the stream -> result driver.

Each mode is a generator (`*_stream`) that yields a `StreamEvent` whenever tokens become
final and returns a `GenerationResult`; `generate_*` just drains it. The CLI's --stream,
the benchmarks and the plain functions all run that one generator.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch

from twotower.generate.sampling import Sampling, TokenLogprob
from twotower.model.protocol import DecodingModel
from twotower.settings import BLOCK_MODES, GenerationSettings, TwoTowerError, resolve_block_size


@dataclass
class StreamEvent:
    tokens: list[list[int]]  # per row: ids that became final since the previous event
    logprobs: list[list[TokenLogprob] | None] | None = None  # per row asking for them: one per token (None: no row asks)


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # per row: generated ids, cut after the first EOS (EOS kept)
    mode: str
    row_nfe: list[int]  # per row: token-predicting passes made while the row was unfinished
    denoiser_passes: int  # batched denoiser forward passes
    context_passes: int  # batched context-tower forward passes, prefill included
    seconds: float
    details: dict = field(default_factory=dict)  # mode-specific statistics (verify: cycles, sources)
    logprobs: list[list[TokenLogprob] | None] = field(default_factory=list)  # per row: one per token (None: not asked)

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def nfe(self) -> int:
        """Token-predicting passes, summed over rows (equals the pass count at batch 1):
        denoiser passes for mock-ar/diffusion, context passes for ar."""
        return sum(self.row_nfe)

    @property
    def tokens_per_nfe(self) -> float:
        return self.new_tokens / max(self.nfe, 1)

    def stats(self) -> dict:
        return {
            "mode": self.mode,
            "new_tokens": self.new_tokens,
            "nfe": self.nfe,
            "tokens_per_nfe": round(self.tokens_per_nfe, 4),
            "denoiser_passes": self.denoiser_passes,
            "context_passes": self.context_passes,
            "seconds": round(self.seconds, 4),
            "tokens_per_second": round(self.new_tokens / max(self.seconds, 1e-9), 3),
            **self.details,
        }


@dataclass
class Run:
    """State every mode keeps: inputs, settings, each row's sampling, finished rows, outputs.
    `settings` are what the rows share (block size, threshold, ...); each row samples by its
    own (`sampling`), which may differ from row to row once runs join."""

    ids: torch.Tensor  # (B, T) left-padded prompt on the context device
    attention_mask: torch.Tensor  # (B, T)
    settings: GenerationSettings
    eos: torch.Tensor  # (E,) long
    pad_id: int
    sampling: Sampling
    mode: str
    started: float = field(default_factory=time.perf_counter)
    tokens: list[list[int]] = field(default_factory=list)
    row_nfe: list[int] = field(default_factory=list)
    done: torch.Tensor | None = None  # (B,) bool
    denoiser_passes: int = 0
    context_passes: int = 0
    max_new: list[int] = field(default_factory=list)  # per row: most tokens (settings.max_new_tokens unless set)
    logprobs: list[list[TokenLogprob] | None] = field(default_factory=list)  # per row asking: one per token

    def __post_init__(self):
        batch = self.ids.shape[0]
        self.tokens = [[] for _ in range(batch)]
        self.row_nfe = [0] * batch
        self.done = torch.zeros(batch, dtype=torch.bool, device=self.ids.device)
        self.max_new = self.max_new or [self.settings.max_new_tokens] * batch
        self.logprobs = [None if r.settings.logprobs is None else [] for r in self.sampling.rows]

    @property
    def batch(self) -> int:
        return len(self.tokens)

    @property
    def generated(self) -> int:
        """Steps taken so far (the longest row's length)."""
        return max(len(t) for t in self.tokens)

    def room(self, b: int) -> int:
        """Tokens row b may still write (0 once it is finished)."""
        return 0 if bool(self.done[b]) else self.max_new[b] - len(self.tokens[b])

    def live_rows(self) -> list[int]:
        return [b for b in range(self.batch) if self.room(b) > 0]

    def positions(self, rows: list[int]) -> dict[int, int]:
        """Row -> the reply position its next token takes (where its position noise starts)."""
        return {b: len(self.tokens[b]) for b in rows}

    def next_tokens(self, logits: torch.Tensor) -> tuple[torch.Tensor, list | None]:
        """Each row's next token (B,) from its next-token logits (B, V) (the context tower's or
        the denoiser's), with its logprobs for the rows that ask."""
        logits = logits[:, None]
        tokens = self.sampling.pick(logits, self.sampling.noise(logits, self.positions(self.live_rows())))
        return tokens[:, 0], self.sampling.logprobs(logits, tokens)

    @property
    def finished(self) -> bool:
        return not self.live_rows()

    def join(self, other: Run) -> None:
        """Take the rows of another run of the same mode and shared settings (continuous
        batching); each row keeps its own sampling."""
        self.tokens += other.tokens
        self.row_nfe += other.row_nfe
        self.max_new += other.max_new
        self.logprobs += other.logprobs
        self.sampling.join(other.sampling)
        self.done = torch.cat([self.done, other.done.to(self.done.device)])
        self.ids = self.attention_mask = None  # prompts are read at the start of a run only

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only these rows, in this order (finished or cancelled rows leave)."""
        self.tokens = [self.tokens[b] for b in rows]
        self.row_nfe = [self.row_nfe[b] for b in rows]
        self.max_new = [self.max_new[b] for b in rows]
        self.logprobs = [self.logprobs[b] for b in rows]
        self.sampling.keep_rows(rows)
        self.done = select_rows(self.done, rows)

    def ends_at_eos(self) -> torch.Tensor:
        """(B,) bool: the rows an EOS ends (all but those that ignore it)."""
        return torch.tensor([not r.settings.ignore_eos for r in self.sampling.rows], device=self.done.device)

    def context_inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """Each row's next token (B,) as the context tower's next input (B, 1): the pad id in the
        rows that are finished (the pass still runs over the whole batch)."""
        live = torch.zeros_like(tokens, dtype=torch.bool)
        live[self.live_rows()] = True
        return tokens.masked_fill(~live, self.pad_id)[:, None]

    def count_pass(self, rows, passes: int = 1) -> None:
        """Credit token-predicting passes to each row in `rows` (a (B,) bool mask or row indices)."""
        if isinstance(rows, torch.Tensor):
            rows = rows.nonzero().flatten().tolist()
        for b in rows:
            self.row_nfe[b] += passes

    def emit(self, new: list[list[int]], logprobs: list[list[TokenLogprob] | None] | None = None) -> StreamEvent:
        """Append final tokens per row, cutting each row after its first EOS and at its most
        tokens. logprobs: per row asking for them, one per token of `new` (cut with it)."""
        eos = set(self.eos.tolist())
        out = []
        for b, toks in enumerate(new):
            taken = []
            ends = () if self.sampling.rows[b].settings.ignore_eos else eos
            if not self.done[b]:
                for tok in toks[: self.max_new[b] - len(self.tokens[b])]:
                    taken.append(tok)
                    if tok in ends:
                        self.done[b] = True
                        break
            self.tokens[b].extend(taken)
            self.sampling.record(b, taken)
            out.append(taken)
        if logprobs is None:
            return StreamEvent(out)
        kept = [None if lp is None else lp[: len(taken)] for lp, taken in zip(logprobs, out)]
        for b, lp in enumerate(kept):
            if lp is not None:
                self.logprobs[b].extend(lp)
        return StreamEvent(out, kept)

    def result(self) -> GenerationResult:
        return GenerationResult(
            tokens=self.tokens,
            mode=self.mode,
            row_nfe=self.row_nfe,
            denoiser_passes=self.denoiser_passes,
            context_passes=self.context_passes,
            seconds=time.perf_counter() - self.started,
            logprobs=self.logprobs,
        )


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not rows or any(len(r) == 0 for r in rows):
        raise TwoTowerError("every prompt needs at least one token")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[b, width - len(r) :] = 1
    return ids, mask


def _token_rows(input_ids) -> list[list[int]]:
    """A list of ids, or a list of lists of ids (ragged is fine) -> list of rows."""
    is_id = lambda x: isinstance(x, int) and not isinstance(x, bool)
    if isinstance(input_ids, (list, tuple)) and input_ids and all(is_id(x) for x in input_ids):
        return [list(input_ids)]
    if isinstance(input_ids, (list, tuple)) and all(isinstance(r, (list, tuple)) and all(is_id(x) for x in r) for r in input_ids):
        return [list(r) for r in input_ids]
    raise TwoTowerError(
        "input_ids must be token ids: a tensor (B, T), a list of ints, a list of lists of ints, or a "
        f"tokenizer's output; got {type(input_ids).__name__} (encode text first, e.g. twotower.encode_prompt)"
    )


MIN_TEMPERATURE = 1e-5


def resolve_settings(model, mode: str, options: dict) -> GenerationSettings:
    """The settings of one generation, checked and resolved against the model's config once:
    `options` holds GenerationSettings fields, or `settings=` a GenerationSettings (with no
    other field); unknown options are refused, and modes that work in blocks get the trained
    block size by default and never a larger one."""
    settings = options.pop("settings", None)
    if settings is None:
        eos = options.pop("eos_token_id", None)
        eos = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
        fields, unknown = GenerationSettings.split(options)
        if unknown:
            raise TwoTowerError(f"unknown generation option(s) {sorted(unknown)}")
        settings = GenerationSettings(eos_token_id=eos, **fields)
    elif options:
        raise TwoTowerError(f"pass the generation options in `settings` or as keywords, not both: {sorted(options)}")
    if settings.temperature < MIN_TEMPERATURE:  # logits / T would overflow: that small a temperature is greedy
        settings = replace(settings, temperature=0.0)
    outside = [t for t in settings.logit_bias or {} if t >= model.num_embeddings]
    if outside:
        raise TwoTowerError(f"logit_bias names token ids outside the vocabulary [0, {model.num_embeddings}): {outside[:5]}")
    if mode in BLOCK_MODES:
        settings = replace(settings, block_size=resolve_block_size(settings.block_size, model.config.block_size))
    return settings


def start_run(model, input_ids, attention_mask, mode: str, options: dict) -> Run:
    """Validate everything before any forward pass and build the run state."""
    settings = resolve_settings(model, mode, options)
    eos = list(settings.eos_token_id)
    pad_id = eos[0] if eos else 0
    if isinstance(input_ids, Mapping):  # a tokenizer's output (BatchEncoding or dict)
        if attention_mask is None:
            attention_mask = input_ids.get("attention_mask")
        input_ids = input_ids["input_ids"]
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        attention_mask = torch.as_tensor(attention_mask)
    if attention_mask is not None and not isinstance(input_ids, torch.Tensor):
        rows = _token_rows(input_ids)  # with a mask, ids are one padded (B, T) batch
        if len({len(r) for r in rows}) != 1:
            raise TwoTowerError("with an attention_mask, input_ids must be padded to one length")
        input_ids = torch.tensor(rows)
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif attention_mask.dim() == 1:
            attention_mask = attention_mask[None]
        if attention_mask.shape != input_ids.shape:
            raise TwoTowerError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
        if (attention_mask[:, -1] == 0).any() or (attention_mask.diff(dim=1) < 0).any():
            raise TwoTowerError("prompts must be left-padded (attention_mask zeros first, then ones)")
        if (attention_mask.sum(1) == 0).any():
            raise TwoTowerError("every prompt needs at least one token")
        ids, mask = input_ids.long(), attention_mask.long()
    else:
        ids, mask = left_pad(_token_rows(input_ids), pad_id)
    vocab = model.num_embeddings
    if ((ids < 0) | (ids >= vocab))[mask.bool()].any():
        raise TwoTowerError(f"prompt holds token ids outside the backbone's vocabulary [0, {vocab})")
    longest, limit = int(mask.sum(1).max()), model.max_context
    if longest >= limit:
        raise TwoTowerError(f"the prompt has {longest} tokens, longer than the backbone's context ({limit} tokens)")
    if longest + settings.max_new_tokens > limit:
        raise TwoTowerError(
            f"the prompt has {longest} tokens and max_new_tokens={settings.max_new_tokens}: together they exceed "
            f"the backbone's context of {limit} tokens; lower max_new_tokens to at most {limit - longest}"
        )
    device = model.context_device
    return Run(
        ids=ids.to(device),
        attention_mask=mask.to(device),
        settings=settings,
        eos=torch.tensor(eos, dtype=torch.long, device=device),
        pad_id=pad_id,
        sampling=Sampling.of(settings, ids.shape[0]),
        mode=mode,
    )


class Decoder:
    """A mode as cycles over a run's rows, so that the library's streams, the benchmarks and the
    server (which lets rows join and leave between cycles) drive one implementation.

    start(): read the prompts (the prefill); may yield StreamEvents. cycle(): one cycle for every
    live row (a context pass, and denoiser passes where the mode drafts); yields StreamEvents.
    join(other): take the rows of another decoder of the same mode and settings (its `start`
    has run). keep_rows(rows): keep only these rows. details(): the mode's statistics.
    """

    prefilled = None  # (cache, logits (B, V)) of prompts read already (the server reads them in chunks), or None
    cycle_drafts = ()  # verify mode: the last cycle's drafts, (drafted, accepted) per row that drafted

    def __init__(self, model: DecodingModel, run: Run):
        self.model, self.run = model, run

    def read_prompts(self, logits: str | None = "last"):
        """The prefill: a cache holding the run's prompts and the AR logits after them, or the
        ones read already (`prefilled`)."""
        if self.prefilled is not None:
            prefilled, self.prefilled = self.prefilled, None
            return prefilled
        self.run.context_passes += 1
        return self.model.context_prefill(self.run.ids, self.run.attention_mask, logits=logits)

    def start(self):
        raise NotImplementedError

    def cycle(self):
        raise NotImplementedError

    def join(self, other: Decoder) -> None:
        raise NotImplementedError

    def keep_rows(self, rows: list[int]) -> None:
        raise NotImplementedError

    def details(self) -> dict:
        return {}


class NextTokenDecoder(Decoder):
    """A decoder whose rows hold, between cycles, the context cache and each row's next-token
    logits from the last context pass (the prefill's at first): AR and diffusion mode."""

    def start(self):
        self.cache, self.logits = self.read_prompts()  # (B, V)
        yield from ()

    def join(self, other: NextTokenDecoder) -> None:
        self.cache.join(other.cache)
        self.logits = torch.cat([self.logits, other.logits.to(self.logits.device)])

    def keep_rows(self, rows: list[int]) -> None:
        self.cache.select(rows)
        self.logits = select_rows(self.logits, rows)


def select_rows(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Rows of a batch-first tensor, in this order."""
    return t[torch.tensor(rows, dtype=torch.long, device=t.device)]


def drive(decoder: Decoder):
    """A decoder's stream: start, then cycles until every row is finished; returns the result."""
    yield from decoder.start()
    while not decoder.run.finished:
        yield from decoder.cycle()
    result = decoder.run.result()
    result.details = decoder.details()
    return result


def drain(stream) -> GenerationResult:
    """Run a mode's stream to its end and return its result."""
    while True:
        try:
            next(stream)
        except StopIteration as stop:
            return stop.value
