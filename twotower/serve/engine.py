"""The serving engine: one loop that batches every running request (block-level continuous
batching).

Requests are grouped by what shapes a pass (`Job.group_key`: the mode, block size, steps per
block, threshold and verify's draft options); each row samples by its own settings and seed
(temperature, top_p, top_k, ...), so mixed sampling shares one group. The rows of a group
share every tower pass. Each turn of the loop reads up to `--prefill-chunk` tokens of new
requests' prompts (a long prompt a chunk per turn, several short ones at once) and runs one
cycle of one group (round robin), through the same decoders the library's streams use
(`twotower.generate`), so a long prompt never stalls the running streams for more than one
chunk. While rows decode, a long prompt's chunk rides the cycle's context pass
(`TwoTowerForCausalLM.carrying`: it shares that pass's calls, so it costs its tokens, not a
pass). A request takes a row when one is free; after its last chunk its row joins the group of
its settings at a cycle boundary. It leaves at once when it finishes (EOS, its token limit, a
stop string, its generation time limit) or its client goes away, and its row is freed. Each row
keeps its own position, limit and stopping, so the greedy reply of a request under load is its
reply alone.

Text goes out as tokens commit. A stop string may span two committed blocks: text that could
still become the start of a stop string is held back until it cannot, so nothing after a stop
string is ever sent.

A job's events: ("text", str, entries) ... (entries: the tokens whose text it carries, each as
(id, logprob, [(alternative id, logprob), ...]), logprob and alternatives None unless the job's
options ask for `logprobs`), then ("done", info), ("error", message) (a 400, or a 500
when the message starts with "internal error"), or ("busy", message) (a 503: the request waited
past the queue limit, or the server stopped before it finished).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from twotower.config import TwoTowerError
from twotower.generate import DECODERS
from twotower.generate.common import Decoder, start_run
from twotower.generate.draft import DraftMemory
from twotower.model.cache import ContextCache
from twotower.model.two_tower import Rider
from twotower.settings import VerifyOptions
from twotower.text import eos_token_ids

BLOCK_MODES = ("diffusion", "verify")
FLAT_DEPTH = 512  # a prompt token's cost that does not grow with depth, in tokens of depth (chunk sizing)
MIN_CHUNK = 16  # the fewest tokens a long prompt's chunk reads, and its first chunk's size
IDLE_CHUNK_SECONDS = 0.5  # while no row decodes, about how long a long prompt's chunk takes: the most a new request waits
STUCK_AFTER = 120.0  # seconds one turn of the loop (a cycle or a chunk) may take before /health answers 503


log = logging.getLogger("twotower.serve")


class QueueFull(Exception):
    """The engine's queue is full (the server answers 429)."""


@dataclass
class Job:
    """One request as the engine sees it."""

    prompt_ids: list[int]
    mode: str
    options: dict  # GenerationSettings fields (max_new_tokens, temperature, top_p, seed, block_size, ...)
    decoder_options: dict = field(default_factory=dict)  # verify: draft
    stop: list[str] = field(default_factory=list)
    timeout: float = 300.0  # most seconds of generation, from when the engine takes the job up (0: no limit)
    created: float = field(default_factory=time.monotonic)
    # filled by the engine
    events: queue.Queue = field(default_factory=queue.Queue)  # the module docstring's events
    cancelled: bool = False
    started: float | None = None  # when the engine took it up (its row's start)

    def cancel(self) -> None:
        self.cancelled = True

    def group_key(self) -> tuple:
        """What the rows of one group must share: what shapes a pass. Sampling is per row."""
        o = self.options
        return (
            self.mode,
            o.get("block_size"),
            o.get("steps_per_block"),
            o.get("threshold"),
            tuple(sorted(self.decoder_options.items())),
        )


class TextStream:
    """Decoded text of one row as its tokens commit: what may be sent now, and where a stop
    string ends the reply."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.sent = ""
        self.counted = 0  # tokens whose text is wholly sent

    def _held(self, text: str) -> int:
        """How many trailing characters could still become the start of a stop string."""
        held = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:k]):
                    held = k
                    break
        return held

    def update(self, tokens: list[int], final: bool) -> tuple[str, bool]:
        """The new text to send, and whether a stop string was reached (the text ends before it)."""
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        stopped = bool(cuts)
        if stopped:
            text = text[: min(cuts)]
        elif not final:
            text = text.rstrip("\ufffd")  # the rest of a multi-byte character is still to come
            text = text[: len(text) - self._held(text)]
        if len(text) <= len(self.sent):
            return "", stopped
        delta, self.sent = text[len(self.sent) :], text
        return delta, stopped

    def sent_entries(self, tokens: list[int], logprobs: list | None) -> list[tuple]:
        """The tokens whose text the last update sent wholly (not yet counted), as a text event
        carries them: (id, logprob, alternatives), from the row's TokenLogprobs when it asked for
        them, else (id, None, None); so per-token data goes out with exactly its text."""
        n = len(tokens)
        while n > self.counted and not self.sent.startswith(self.tokenizer.decode(tokens[:n], skip_special_tokens=True)):
            n -= 1
        first, self.counted = self.counted, n
        if logprobs is None:
            return [(t, None, None) for t in tokens[first:n]]
        return [(lp.token, lp.logprob, lp.top) for lp in logprobs[first:n]]


@dataclass
class Row:
    job: Job
    text: TextStream
    sent_tokens: int = 0
    first_token_at: float | None = None
    finish_reason: str | None = None


class Group:
    """The rows that share tower passes: one decoder, its run, and who each row belongs to."""

    def __init__(self, decoder, rows: list[Row]):
        self.decoder, self.rows = decoder, rows

    @property
    def run(self):
        return self.decoder.run


@dataclass
class Reading:
    """A request whose prompt is being read, a chunk per turn of the loop, before its row joins
    its group: its decoder (not started yet), and the cache and logits of what was read."""

    job: Job
    decoder: Decoder
    read: int = 0  # prompt tokens read
    cache: ContextCache | None = None
    logits: torch.Tensor | None = None  # (1, V) after the last token read
    chunk: int = 0  # tokens of the last chunk read
    took: float = 0.0  # the seconds it took (carried chunks: what they added to their cycles, smoothed)
    riding: bool = False  # whether the last chunk was carried by a cycle's pass (`TwoTowerForCausalLM.carrying`)
    last_added: float = 0.0  # what the last carried chunk added to its cycle

    def ride_chunk(self, seconds: float) -> int:
        """Tokens to carry in the next cycle's context pass so that they add about `seconds` to
        it: the last carried chunk scaled by how far what the last ones added fell short of
        `seconds` or went past, a token more at least while it fell short, never more than twice
        it, at least one token. A carried chunk's cost is mostly not in proportion to its tokens
        (its own calls, and reading its cache's keys once per layer, which grows with depth), so
        it grows a token or so a cycle up to what fits."""
        if not self.riding:
            return 1
        added = max(self.took, self.last_added)  # the dearer of the smoothed and the last: a chunk grows only on both
        scaled = int(self.chunk * seconds / added)
        if added <= seconds:
            return min(2 * self.chunk, max(self.chunk + 1, scaled))
        return max(1, scaled)

    def carried(self, chunk: int, added: float) -> None:
        """A chunk of `chunk` tokens was carried and added `added` seconds to its cycle (a
        cycle's time varies with its drafts: smoothed over the carried chunks)."""
        self.last_added = max(added, 1e-5)
        self.took = 0.5 * (self.took + self.last_added) if self.riding else self.last_added
        self.chunk, self.riding = chunk, True

    def next_chunk(self, seconds: float) -> int:
        """Tokens to read next in about `seconds`, from what the last chunk took, scaled for
        depth: a token's cost grows with the tokens before it (attention), so the last chunk's
        cost per token is scaled by the depths of the two chunks' middles (plus FLAT_DEPTH for
        what does not grow). Never more than twice the last chunk, nor fewer than MIN_CHUNK tokens
        (a pass reads every weight once whatever its width: that cost is shared by its tokens),
        which is also the first chunk's size."""
        if not self.chunk:
            return MIN_CHUNK
        before = FLAT_DEPTH + self.read - self.chunk / 2  # the last chunk's middle
        per_token = self.took / self.chunk * (FLAT_DEPTH + self.read + self.chunk / 2) / before
        return max(MIN_CHUNK, min(2 * self.chunk, int(seconds / max(per_token, 1e-9))))

    @property
    def total(self) -> int:
        return self.decoder.run.ids.shape[1]

    @property
    def left(self) -> int:
        return self.total - self.read

    def read_chunk(self, model, chunk: int) -> None:
        """Read the next `chunk` prompt tokens: the first chunk as a prefill, each later one
        extends the cache. After the last, the decoder starts from them (`Decoder.prefilled`)."""
        ids = self.decoder.run.ids[:, self.read : self.read + chunk]  # (1, C): one row, no padding
        if self.cache is None:
            self.cache, logits = model.context_prefill(ids, torch.ones_like(ids), logits="last")
        else:
            logits = model.context_extend(self.cache, ids, logits="last")
        self.riding = False
        self.have_read(ids.shape[1], logits)

    def rider(self, chunk: int) -> Rider:
        """The next `chunk` prompt tokens as a rider of another context pass (`carrying`)."""
        return Rider(self.cache, self.decoder.run.ids[:, self.read : self.read + chunk])

    def have_read(self, chunk: int, logits: torch.Tensor) -> None:
        """`chunk` more prompt tokens are in the cache, `logits` (1, V) after the last of them."""
        self.logits = logits
        self.decoder.run.context_passes += 1
        self.read += chunk
        if self.left == 0:
            self.decoder.prefilled = (self.cache, self.logits)


class Engine:
    """Owns the model; `submit` from any thread, read the Job's events; `start`/`stop` the loop.
    prefill_chunk: most prompt tokens read per turn of the loop; queue_timeout: most seconds a job
    waits for a row (0: no limit)."""

    def __init__(self, model, tokenizer, max_batch: int = 8, max_queue: int = 64, metrics=None, prefill_chunk: int = 512,
                 queue_timeout: float = 0.0, prefill_share: float = 0.5):  # fmt: skip
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.prefill_chunk, self.queue_timeout, self.prefill_share = prefill_chunk, queue_timeout, prefill_share
        self.clock = time.perf_counter  # what chunks and cycles are timed with
        self.cycle_seconds: float | None = None  # a running average of what one cycle takes
        self.metrics = metrics
        self.eos = eos_token_ids(model, tokenizer)
        self.draft_memory = DraftMemory()  # what verify requests measured, for the next ones
        self.waiting: deque[Job] = deque()
        self.reading: deque[Reading] = deque()  # rows whose prompts are being read, oldest first
        self.scores: queue.SimpleQueue = queue.SimpleQueue()  # (ids, top, Future): scoring passes to run
        self.groups: dict[tuple, Group] = {}
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.running = False
        self.thread: threading.Thread | None = None
        self.turn = 0
        self.beat = time.monotonic()  # when the loop last began a turn
        self.stuck_after = STUCK_AFTER
        self.failure: str | None = None  # what ended the loop's thread, if an error did

    # ------------------------------------------------------------------ outside the loop
    def submit(self, job: Job) -> Job:
        """Queue a request. Up to max_queue wait beyond the rows that are free (those are taken at
        the next turn of the loop), so a request that arrives just before its row is taken up is
        never refused while the batch has room."""
        with self.lock:
            free = max(self.max_batch - self.running_rows, 0)
            if len(self.waiting) >= self.max_queue + free:
                raise QueueFull(f"the queue holds {self.max_queue} requests; try again later")
            self.waiting.append(job)
        self.wake.set()
        return job

    def score(self, ids: list[int], top: int) -> Future:
        """Queue a teacher-forced scoring pass over `ids` (`score_tokens`) for the loop, which owns
        the model; the future holds its entries."""
        future = Future()
        self.scores.put((ids, top, future))
        self.wake.set()
        return future

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def running_rows(self) -> int:
        """Rows taken: requests decoding, and those whose prompts are being read."""
        return sum(len(g.rows) for g in list(self.groups.values())) + len(self.reading)  # read from other threads too: a copy

    def trouble(self) -> str | None:
        """Why the engine cannot serve now (its thread is not running, or one turn of its loop
        has taken longer than `stuck_after`), or None."""
        if self.thread is None or not self.thread.is_alive():
            return "the engine's loop is not running" + (f": {self.failure}" if self.failure else "")
        busy = time.monotonic() - self.beat
        if busy > self.stuck_after:
            return f"the engine has been on one cycle for {busy:.0f} s (the bound is {self.stuck_after:g} s)"
        return None

    def start(self) -> None:
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="twotower-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """End the loop after its current turn; requests still queued or running end with a 503."""
        self.running = False
        self.wake.set()
        if self.thread is not None:
            self.thread.join(timeout=10)
        with self.lock:
            jobs = [*self.waiting, *(r.job for r in self.reading), *(row.job for g in self.groups.values() for row in g.rows)]
            self.waiting.clear()
        for job in jobs:
            job.cancel()
            job.events.put(("busy", "the server stopped before the request finished"))

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        try:
            while self.running:
                self.beat = time.monotonic()
                if not self.step():
                    self.wake.wait(timeout=0.1)
                    self.wake.clear()
        except Exception as err:  # a bug in the loop itself: the thread ends, /health reports it
            self.failure = f"{type(err).__name__}: {err}"
            log.critical("the engine's loop stopped", exc_info=err)

    def step(self) -> bool:
        """One turn of the loop: take waiting requests into free rows, read up to a chunk of their
        prompts, run one cycle of one group (round robin). False when there was nothing to do."""
        self._score_waiting()
        self._admit()
        if not self.reading and not self.groups:
            return False
        ride = self._read_prompts() if self.reading else None
        if self.groups:
            keys = list(self.groups)
            key = keys[self.turn % len(keys)]
            self.turn += 1
            rider = None if ride is None else ride[0].rider(ride[1])
            begin = self.clock()
            with self.model.carrying(rider):
                ok = self._cycle(key)
            took = self.clock() - begin
            if rider is None or rider.logits is None:
                self.cycle_seconds = took if self.cycle_seconds is None else 0.7 * self.cycle_seconds + 0.3 * took
            if rider is not None and (rider.logits is not None or not ok):
                self._carried(*ride, rider, took - self.cycle_seconds, ok)
                ride = None
        if ride is not None:  # no pass of the cycle could carry it: read apart
            self._read(*ride)
        return True

    def _admit(self) -> None:
        """Requests whose clients went away leave the queue, those that waited past the queue
        limit get a 503; the others take free rows, where their prompts are read (`_read_prompts`)."""
        now = time.monotonic()
        overdue = lambda job: bool(self.queue_timeout) and now - job.created > self.queue_timeout
        with self.lock:
            late = [job for job in self.waiting if not job.cancelled and overdue(job)]
            self.waiting = deque(job for job in self.waiting if not job.cancelled and not overdue(job))
        for job in late:
            waited = now - job.created
            message = f"the request waited {waited:.1f} s for a row, past the server's queue limit of {self.queue_timeout:g} s"
            job.events.put(("busy", message + " (--queue-timeout); try again later"))
        while self.waiting and self.running_rows < self.max_batch:
            with self.lock:
                job = self.waiting.popleft()
            self._guarded(job, self._take_up, job)

    def _score_waiting(self) -> None:
        """Run the scoring passes asked for since the last turn (`score`)."""
        while not self.scores.empty():
            ids, top, future = self.scores.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(score_tokens(self.model, ids, top))
            except Exception as err:  # the request gets it, the engine goes on
                future.set_exception(err)

    def _guarded(self, job: Job, step, *args) -> bool:
        """Run one request's step; a bad request or a bug ends that request, not the engine."""
        try:
            step(*args)
            return True
        except TwoTowerError as err:
            job.events.put(("error", str(err)))
        except Exception as err:  # never let one request take the engine down
            log.error("a request failed", exc_info=err)
            job.events.put(("error", f"internal error: {type(err).__name__}: {err}"))
        return False

    def _take_up(self, job: Job) -> None:
        """The job's run and decoder; its prompt is read from the next turn on."""
        job.started = time.monotonic()
        options = {**job.options, "eos_token_id": self.eos}
        run = start_run(self.model, [job.prompt_ids], None, job.mode, options)
        verify = {"options": VerifyOptions(**job.decoder_options), "memory": self.draft_memory} if job.mode == "verify" else {}
        self.reading.append(Reading(job, DECODERS[job.mode](self.model, run, **verify)))

    def _read_prompts(self) -> tuple[Reading, int] | None:
        """Read up to prefill_chunk prompt tokens a turn; a row whose prompt is read joins its
        group. Short prompts (prefill_chunk tokens at most) are read whole, oldest first, several
        in one turn; then the oldest long prompt gets a chunk: while rows are decoding, one that
        adds about prefill_share of a cycle's time (sized by what its last chunks took: a chunk
        gets dearer as the prompt gets longer), so running streams keep their pace at any prompt
        length and a long prompt never holds up the short ones behind it; while no row decodes,
        one that takes about IDLE_CHUNK_SECONDS, so a request that arrives meanwhile soon starts.
        Returns (reading, tokens) for the cycle's pass to carry (`Reading.ride_chunk`: the model
        carries riders and the prompt's first chunk is read), or None when the chunk was read
        here as a pass of its own."""
        self.reading = deque(r for r in self.reading if not r.job.cancelled)
        budget = self.prefill_chunk
        for reading in [r for r in self.reading if r.total <= self.prefill_chunk]:
            if reading.left > budget:
                break
            budget -= reading.left
            self._read(reading, reading.left)
        long = next((r for r in self.reading if r.total > self.prefill_chunk), None)
        if long is None or budget <= 0:
            return None
        decoding = bool(self.groups and self.cycle_seconds and self.prefill_share)
        if decoding and long.cache is not None and self.model.can_carry:
            return long, min(budget, long.left, long.ride_chunk(self.prefill_share * self.cycle_seconds))
        seconds = None
        if self.prefill_share:
            seconds = self.prefill_share * self.cycle_seconds if decoding else IDLE_CHUNK_SECONDS
        self._read(long, min(budget, long.left, long.next_chunk(seconds) if seconds else budget))
        return None

    def _read(self, reading: Reading, chunk: int) -> None:
        """Read `chunk` tokens of one prompt (timed); the row joins its group after its last."""
        begin = self.clock()
        if not self._guarded(reading.job, reading.read_chunk, self.model, chunk):
            self.reading.remove(reading)
            return
        reading.chunk, reading.took = chunk, self.clock() - begin
        if self.metrics is not None:
            self.metrics.passes(1, 0)
        self._after_chunk(reading)

    def _carried(self, reading: Reading, chunk: int, rider: Rider, added: float, ok: bool) -> None:
        """After a cycle that carried `chunk` tokens of a prompt (`rider`), or failed while it did
        (the prompt's cache may hold part of the pass: that request ends with the cycle's)."""
        if rider.logits is None:
            self.reading.remove(reading)
            reading.job.events.put(("error", "internal error: the decoding pass that read a chunk of its prompt failed"))
            return
        reading.carried(chunk, added)
        reading.have_read(chunk, rider.logits)
        self._after_chunk(reading)

    def _after_chunk(self, reading: Reading) -> None:
        if reading.left == 0:
            self.reading.remove(reading)
            self._guarded(reading.job, self._join, reading)

    def _join(self, reading: Reading) -> None:
        """A row whose prompt is read starts (verify mode: its first token) and joins the group
        of its settings at this cycle boundary."""
        job, decoder = reading.job, reading.decoder
        for _ in decoder.start():
            pass
        row = Row(job, TextStream(self.tokenizer, job.stop))
        key = job.group_key()
        group = self.groups.get(key)
        if group is None:
            self.groups[key] = Group(decoder, [row])
        else:
            group.run.join(decoder.run)
            group.decoder.join(decoder)
            group.rows.append(row)
        self._dispatch(self.groups[key])
        self._release(key)

    def _cycle(self, key) -> bool:
        """One cycle of a group; False when it failed (its rows' requests end with an error)."""
        group = self.groups[key]
        before = (group.run.context_passes, group.run.denoiser_passes)
        try:
            for _ in group.decoder.cycle():
                self._dispatch(group)
        except Exception as err:  # a failed cycle ends its rows' requests, not the server
            log.error("a decoding cycle failed; its requests end with an error", exc_info=err)
            for row in group.rows:
                row.job.events.put(("error", f"internal error: {type(err).__name__}: {err}"))
            del self.groups[key]
            return False
        if self.metrics is not None:
            self.metrics.passes(group.run.context_passes - before[0], group.run.denoiser_passes - before[1])
            self.metrics.drafts(group.decoder.cycle_drafts)
        self._dispatch(group)
        self._release(key)
        return True

    def _dispatch(self, group: Group) -> None:
        """Send each row's newly committed text; finish rows that stopped."""
        run, now = group.run, time.monotonic()
        for b, row in enumerate(group.rows):
            if row.finish_reason is not None:
                continue
            tokens = run.tokens[b]
            if len(tokens) > row.sent_tokens and row.first_token_at is None:
                row.first_token_at = now
                if self.metrics is not None:
                    self.metrics.first_token(now - row.job.created)
            if self.metrics is not None and len(tokens) > row.sent_tokens:
                self.metrics.tokens(row.job.mode, len(tokens) - row.sent_tokens)
            row.sent_tokens = len(tokens)
            finished = run.room(b) == 0
            delta, stopped = row.text.update(tokens, finished)
            if delta:
                row.job.events.put(("text", delta, row.text.sent_entries(tokens, run.logprobs[b])))
            row.finish_reason = self._finish_reason(row, run, b, stopped, finished, now)
            if row.finish_reason is not None:
                run.done[b] = True  # the decoder does no more work for this row
                row.job.events.put(("done", self._info(group, b, row)))

    @staticmethod
    def _finish_reason(row: Row, run, b: int, stopped: bool, finished: bool, now: float) -> str | None:
        """Why row b ends now, or None. The generation time limit ends a row only once it has a
        token, so a reply is never empty for want of time."""
        job = row.job
        if stopped:
            return "stop"
        if job.cancelled:
            return "cancelled"
        if job.timeout and run.tokens[b] and now - job.started > job.timeout:
            return "length"  # the server's generation time limit
        if finished:
            return "stop" if bool(run.done[b]) else "length"
        return None

    def _info(self, group: Group, b: int, row: Row) -> dict:
        run = group.run
        n = len(run.tokens[b])
        return {
            "finish_reason": row.finish_reason,
            "prompt_tokens": len(row.job.prompt_ids),
            "completion_tokens": n,
            "mode": row.job.mode,
            "passes": run.row_nfe[b],
            "tokens_per_pass": round(n / max(run.row_nfe[b], 1), 4),
            "seconds": round(time.monotonic() - row.job.created, 4),
            "time_to_first_token": None if row.first_token_at is None else round(row.first_token_at - row.job.created, 4),
        }

    def _release(self, key) -> None:
        """Free the rows of finished requests at once."""
        group = self.groups[key]
        keep = [b for b, row in enumerate(group.rows) if row.finish_reason is None]
        if not keep:
            del self.groups[key]
        elif len(keep) < len(group.rows):
            group.decoder.keep_rows(keep)
            group.run.keep_rows(keep)
            group.rows = [group.rows[b] for b in keep]


def score_tokens(model, ids: list[int], top: int) -> list[tuple]:
    """Teacher-forced logprobs of a token sequence under the context tower (the AR model), one
    pass: for each token, (id, its logprob given the tokens before it, the `top` most likely
    tokens there with theirs, best first); the first token has neither (None, None)."""
    x = torch.tensor([ids], device=model.context_device)  # (1, T)
    logp = torch.log_softmax(model(x)[0, :-1].float(), dim=-1)  # (T-1, V): the distribution of token i+1
    chosen = logp.gather(1, x[0, 1:, None].to(logp.device))[:, 0].tolist()
    if top:
        best = logp.topk(top, dim=-1)
        alternatives = [list(zip(i, v)) for i, v in zip(best.indices.tolist(), best.values.tolist())]
    else:
        alternatives = [[] for _ in chosen]
    return [(ids[0], None, None), *zip(ids[1:], chosen, alternatives)]
