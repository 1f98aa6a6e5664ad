"""Prometheus metrics of `twotower serve` (GET /metrics): requests by status (every 5xx, also an
error inside a stream whose status was already sent), tokens, tower passes, tokens per pass,
queue depth, time to first token, per-token latency, and verify mode's drafts under vLLM's
names (`spec_decode_num_drafts`, `..._num_draft_tokens`, `..._num_accepted_tokens`,
`..._num_accepted_tokens_per_pos{position}`), so that dashboards made for vLLM read them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests_total = Counter("twotower_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.tokens_total = Counter("twotower_tokens", "generated tokens by mode", ["mode"], registry=r)
        self.passes_total = Counter("twotower_passes", "batched tower passes", ["tower"], registry=r)
        self.tokens_per_pass = Gauge("twotower_tokens_per_pass", "generated tokens per batched tower pass", registry=r)
        self.queue_depth = Gauge("twotower_queue_depth", "requests waiting for a row", registry=r)
        self.running = Gauge("twotower_running_requests", "requests holding a row", registry=r)
        self.ttft = Histogram("twotower_time_to_first_token_seconds", "time to first token", buckets=LATENCY_BUCKETS, registry=r)
        self.token_latency = Histogram(
            "twotower_token_latency_seconds", "seconds per generated token, per request", buckets=LATENCY_BUCKETS, registry=r
        )
        self.stream_errors_total = Counter(
            "twotower_stream_errors", "errors inside a stream (sent after its 200) by route and the status they stand for",
            ["route", "status"], registry=r,
        )  # fmt: skip
        spec = "verify mode: "
        self.drafts_total = Counter(
            "twotower_spec_decode_num_drafts", spec + "drafts checked (a row's cycle that drafted)", registry=r
        )
        self.draft_tokens_total = Counter("twotower_spec_decode_num_draft_tokens", spec + "tokens drafted", registry=r)
        self.accepted_total = Counter("twotower_spec_decode_num_accepted_tokens", spec + "drafted tokens accepted", registry=r)
        self.accepted_per_pos = Counter(
            "twotower_spec_decode_num_accepted_tokens_per_pos", spec + "drafted tokens accepted at each draft position (from 0)",
            ["position"], registry=r,
        )  # fmt: skip
        self._tokens = self._passes = 0

    def request(self, route: str, status: int) -> None:
        self.requests_total.labels(route, str(status)).inc()

    def tokens(self, mode: str, n: int) -> None:
        self.tokens_total.labels(mode).inc(n)
        self._tokens += n
        self.tokens_per_pass.set(self._tokens / max(self._passes, 1))

    def passes(self, context: int, denoiser: int) -> None:
        self.passes_total.labels("context").inc(context)
        self.passes_total.labels("denoiser").inc(denoiser)
        self._passes += context + denoiser

    def drafts(self, cycle) -> None:
        """One verify cycle's drafts: (drafted, accepted) per row that drafted (`Decoder.cycle_drafts`)."""
        for drafted, accepted in cycle:
            self.drafts_total.inc()
            self.draft_tokens_total.inc(drafted)
            self.accepted_total.inc(accepted)
            for k in range(accepted):
                self.accepted_per_pos.labels(str(k)).inc()

    def stream_error(self, route: str, status: int) -> None:
        self.stream_errors_total.labels(route, str(status)).inc()

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def finished(self, info: dict) -> None:
        if info["completion_tokens"]:
            self.token_latency.observe(info["seconds"] / info["completion_tokens"])

    def queue(self, depth: int, running: int) -> None:
        self.queue_depth.set(depth)
        self.running.set(running)

    def render(self) -> str:
        return generate_latest(self.registry).decode()
