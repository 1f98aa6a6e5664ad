"""The serving engine: one loop that batches every running request (block-level continuous
batching).

Requests are grouped by what shapes a pass (`Job.group_key`: the mode, block size, steps per
block, threshold and verify's draft options); each row samples by its own settings and seed
(temperature, top_p, top_k, ...), so mixed sampling shares one group. The rows of a group
share every tower pass. The loop runs one cycle of one group at a time (round robin), through
the same decoders the library's streams use (`twotower.generate`). A request joins a group at
a cycle boundary: its prompt is read alone (its own prefill), then its row joins the group's
cache and run; it leaves at once when it finishes (EOS, its token limit, a stop string, its
time limit) or its client goes away, and its row is freed. Each row keeps its own position,
limit and stopping, so the greedy reply of a request under load is its reply alone.

Text goes out as tokens commit. A stop string may span two committed blocks: text that could
still become the start of a stop string is held back until it cannot, so nothing after a stop
string is ever sent.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from twotower.config import TwoTowerError
from twotower.generate import DECODERS
from twotower.generate.common import start_run
from twotower.generate.draft import DraftMemory
from twotower.settings import VerifyOptions
from twotower.text import eos_token_ids

BLOCK_MODES = ("diffusion", "verify")


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
    timeout: float = 300.0
    created: float = field(default_factory=time.monotonic)
    # filled by the engine
    events: queue.Queue = field(default_factory=queue.Queue)  # ("text", str) ... then ("done", info) or ("error", msg)
    cancelled: bool = False

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


class Engine:
    """Owns the model; `submit` from any thread, read the Job's events; `start`/`stop` the loop."""

    def __init__(self, model, tokenizer, max_batch: int = 8, max_queue: int = 64, metrics=None):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.metrics = metrics
        self.eos = eos_token_ids(model, tokenizer)
        self.draft_memory = DraftMemory()  # what verify requests measured, for the next ones
        self.waiting: deque[Job] = deque()
        self.groups: dict[tuple, Group] = {}
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.running = False
        self.thread: threading.Thread | None = None
        self.turn = 0

    # ------------------------------------------------------------------ outside the loop
    def submit(self, job: Job) -> Job:
        """Queue a request. Up to max_queue wait beyond the rows that are free (those are taken at
        the next cycle boundary), so a request that arrives just before its row is taken up is
        never refused while the batch has room."""
        with self.lock:
            free = max(self.max_batch - self.running_rows, 0)
            if len(self.waiting) >= self.max_queue + free:
                raise QueueFull(f"the queue holds {self.max_queue} requests; try again later")
            self.waiting.append(job)
        self.wake.set()
        return job

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def running_rows(self) -> int:
        return sum(len(g.rows) for g in list(self.groups.values()))  # read from other threads too: a copy

    def start(self) -> None:
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="twotower-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.running = False
        self.wake.set()
        if self.thread is not None:
            self.thread.join(timeout=10)

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while self.running:
            self._admit()
            if not self.groups:
                self.wake.wait(timeout=0.1)
                self.wake.clear()
                continue
            keys = list(self.groups)
            key = keys[self.turn % len(keys)]
            self.turn += 1
            self._cycle(key)

    def _admit(self) -> None:
        """Start waiting requests while there is room: each reads its prompt alone, then joins the
        group of its settings at this cycle boundary."""
        while self.waiting and self.running_rows < self.max_batch:
            with self.lock:
                job = self.waiting.popleft()
            if job.cancelled:
                continue
            try:
                self._start(job)
            except TwoTowerError as err:
                job.events.put(("error", str(err)))
            except Exception as err:  # never let one request take the engine down
                log.error("request failed to start", exc_info=err)
                job.events.put(("error", f"internal error: {type(err).__name__}: {err}"))

    def _start(self, job: Job) -> None:
        options = {**job.options, "eos_token_id": self.eos}
        run = start_run(self.model, [job.prompt_ids], None, job.mode, options)
        verify = {"options": VerifyOptions(**job.decoder_options), "memory": self.draft_memory} if job.mode == "verify" else {}
        decoder = DECODERS[job.mode](self.model, run, **verify)
        row = Row(job, TextStream(self.tokenizer, job.stop))
        for _ in decoder.start():
            pass
        key = job.group_key()
        group = self.groups.get(key)
        if group is None:
            self.groups[key] = Group(decoder, [row])
        else:
            group.run.join(run)
            group.decoder.join(decoder)
            group.rows.append(row)
        self._dispatch(self.groups[key])
        self._release(key)

    def _cycle(self, key) -> None:
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
            return
        if self.metrics is not None:
            self.metrics.passes(group.run.context_passes - before[0], group.run.denoiser_passes - before[1])
        self._dispatch(group)
        self._release(key)

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
                row.job.events.put(("text", delta))
            if stopped:
                row.finish_reason = "stop"
            elif row.job.cancelled:
                row.finish_reason = "cancelled"
            elif now - row.job.created > row.job.timeout:
                row.finish_reason = "length"  # the server's time limit for one request
            elif finished:
                row.finish_reason = "stop" if bool(run.done[b]) else "length"
            if row.finish_reason is not None:
                run.done[b] = True  # the decoder does no more work for this row
                row.job.events.put(("done", self._info(group, b, row)))

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
