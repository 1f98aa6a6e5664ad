"""`twotower serve` in operation: a client that goes away frees its row within a cycle, long
prompts are read in chunks between the running streams' cycles (and decode as read whole),
/health reflects the engine's loop, the queue and generation time limits, the default reply
length, the drain on SIGTERM, every 5xx counted, and verify mode's drafts under vLLM's metric
names. Slow passes are made with a sleep, so that what is counted does not hang on the
machine's speed."""

from __future__ import annotations

import itertools
import json
import math
import re
import signal
import threading
import time

import httpx
import pytest
from conftest import perturb_trained, tiny_backbone, tiny_tokenizer
from test_serve import ThreadServer as Server

from twotower import TwoTowerForCausalLM, generate
from twotower.serve.engine import Engine, Job
from twotower.text import eos_token_ids

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from twotower.serve.app import POLL_SECONDS, Service, startup_line
from twotower.settings import LoadOptions, ServeOptions

PROMPT = [3 + (7 * i + 1) % 90 for i in range(40)]  # the tiny models write on after it (no early EOS)


def _model(family: str = "llama", context: int = 256) -> TwoTowerForCausalLM:
    model = TwoTowerForCausalLM.from_backbone(
        tiny_backbone(family, max_position_embeddings=context), tiny_tokenizer(), block_size=4, lora_rank=4
    )
    perturb_trained(model, scale=0.02)
    model.config.trained_tokens = 1  # counts as trained: diffusion mode is served
    return model


class Passes:
    """The model's context passes after a prompt, each slowed by `delay` seconds and counted."""

    def __init__(self, model, monkeypatch, delay: float):
        self.count, extend = 0, model.context_extend

        def slow(*args, **kwargs):
            time.sleep(delay)
            self.count += 1
            return extend(*args, **kwargs)

        monkeypatch.setattr(model, "context_extend", slow)


def _text_alone(model, mode: str, prompt: list[int], max_new: int) -> str:
    eos = eos_token_ids(model, tiny_tokenizer())
    tokens = generate(model, mode, [prompt], max_new_tokens=max_new, eos_token_id=eos).tokens[0]
    return tiny_tokenizer().decode(tokens, skip_special_tokens=True)


def _drain_events(job: Job) -> list:
    events = []
    while not job.events.empty():
        events.append(job.events.get())
    return events


# ------------------------------------------------------------------ cancel on disconnect
@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_goes_away_stops_its_tokens_within_a_cycle(monkeypatch, stream):
    """A 200-token reply at 0.1 s a pass; the client leaves after its first chunk (streamed) or
    after 1 s (not streamed): the passes stop within the poll interval and a cycle, and the row
    is freed."""
    model = _model()
    passes = Passes(model, monkeypatch, delay=0.1)
    body = {"prompt": "w5 w6", "max_tokens": 200, "temperature": 0, "mode": "ar", "stream": stream}
    with Server(model, max_batch=2) as server:
        if stream:
            with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
                next(line for line in r.iter_lines() if line.startswith("data:"))
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(server.url + "/v1/completions", json=body, timeout=1.0)
        at_disconnect = passes.count
        server.wait_idle()
        after = passes.count - at_disconnect
        assert after <= math.ceil(POLL_SECONDS / 0.1) + 3, after  # not the 200 the reply would take
        time.sleep(0.5)
        assert passes.count - at_disconnect == after  # and none since the row was freed


# ------------------------------------------------------------------ chunked prefill
@pytest.mark.parametrize("family", ["llama", "nemotron_h"])
@pytest.mark.parametrize("mode", ["ar", "verify", "diffusion"])
def test_a_prompt_read_in_chunks_decodes_as_one_read_whole(family, mode):
    """fp32, greedy: a 40-token prompt read 6 tokens a pass (prefill, then the cache extended)
    gives the reply of the library's one-pass prefill, for attention and hybrid Mamba caches."""
    model = _model(family)
    engine = Engine(model, tiny_tokenizer(), prefill_chunk=6)
    job = engine.submit(Job(PROMPT, mode, {"max_new_tokens": 16}))
    chunks = 0
    while engine.waiting or engine.reading:  # each turn of the loop reads one chunk
        engine.step()
        chunks += 1
    while engine.step():
        pass
    events = _drain_events(job)
    assert chunks == math.ceil(len(PROMPT) / 6) and events[-1][0] == "done"
    assert "".join(e[1] for e in events if e[0] == "text") == _text_alone(model, mode, PROMPT, 16)


def test_a_running_stream_gets_cycles_between_the_chunks_of_a_long_prompt(monkeypatch):
    """A stream is running when a 40-token prompt arrives (8-token chunks): every chunk pass is
    followed by a cycle of the running group before the next chunk; the new row joins after
    its last chunk, and both replies are their replies alone."""
    model = _model()
    engine = Engine(model, tiny_tokenizer(), prefill_chunk=8, prefill_share=0)  # chunks by tokens alone
    log = []
    read, cycle = engine._read_prompts, engine._cycle
    monkeypatch.setattr(engine, "_read_prompts", lambda: (log.append("chunk"), read())[1])
    monkeypatch.setattr(engine, "_cycle", lambda key: (log.append("cycle"), cycle(key))[1])
    running = engine.submit(Job([5, 6, 7], "ar", {"max_new_tokens": 30}))
    while not engine.groups:
        engine.step()
    new = engine.submit(Job(PROMPT, "ar", {"max_new_tokens": 10}))
    log.clear()
    while engine.step():
        pass
    chunks = [i for i, what in enumerate(log) if what == "chunk"]
    assert len(chunks) == 5  # 40 tokens, 8 a pass
    assert all(log[i + 1] == "cycle" for i in chunks)  # the running stream's cycle after every chunk
    texts = ["".join(e[1] for e in _drain_events(job) if e[0] == "text") for job in (running, new)]
    assert texts == [_text_alone(model, "ar", [5, 6, 7], 30), _text_alone(model, "ar", PROMPT, 10)]


def test_while_rows_decode_a_long_prompt_rides_their_passes_for_a_share_of_a_cycle(monkeypatch):
    """With a clock on which a cycle costs 0.1 and a chunk of c tokens carried by its context
    pass adds 0.004 + 0.002 c: while a stream decodes, a 120-token prompt (longer than
    prefill_chunk) is read by a first chunk of MIN_CHUNK tokens apart (a prefill), then in
    chunks that ride the cycles' passes (`TwoTowerForCausalLM.carrying`): one per cycle,
    starting at one token, growing at most twofold, sized to add about prefill_share of a cycle;
    the prompt is read whole and both replies equal their replies alone."""
    from twotower.serve import engine as engine_module

    model, long_prompt = _model(), PROMPT * 3
    engine = Engine(model, tiny_tokenizer(), prefill_chunk=32, prefill_share=0.5)
    clock, carried, apart = [0.0], [], []
    engine.clock = lambda: clock[0]
    read, cycle = engine_module.Reading.read_chunk, engine._cycle

    def timed_cycle(key):
        rider = model.rider
        clock[0] += 0.1 + (0.0 if rider is None else 0.004 + 0.002 * rider.tokens.shape[1])
        done = cycle(key)
        if rider is not None:
            assert model.rider is None and rider.logits is not None  # the cycle's pass carried it
            carried.append(rider.tokens.shape[1])
        return done

    monkeypatch.setattr(engine, "_cycle", timed_cycle)
    monkeypatch.setattr(engine_module.Reading, "read_chunk", lambda self, m, c: (apart.append(c), read(self, m, c))[1])
    running = engine.submit(Job([5, 6, 7], "ar", {"max_new_tokens": 80}))
    while not engine.groups:
        engine.step()
    engine.step()  # a cycle alone: its time is what a carried chunk adds to
    new = engine.submit(Job(long_prompt, "ar", {"max_new_tokens": 5}))
    while engine.reading or engine.waiting or len(engine.groups[next(iter(engine.groups))].rows) < 2:
        engine.step()
    assert apart == [3, engine_module.MIN_CHUNK] and sum(carried) == len(long_prompt) - engine_module.MIN_CHUNK
    assert carried[0] == 1 and all(b <= 2 * a for a, b in itertools.pairwise(carried))
    sized = carried[1:-1]  # the last one is what is left
    assert max(sized) > 8 and all(0.004 + 0.002 * c <= 0.5 * 0.1 + 1e-9 for c in sized)  # about half a cycle, not past it
    while engine.step():
        pass
    texts = ["".join(e[1] for e in _drain_events(job) if e[0] == "text") for job in (running, new)]
    assert texts == [_text_alone(model, "ar", [5, 6, 7], 80), _text_alone(model, "ar", long_prompt, 5)]


def test_while_rows_decode_a_turn_reads_prompts_apart_for_a_share_of_a_cycle(monkeypatch):
    """Where a pass cannot carry a chunk (`can_carry`: a hybrid backbone, compiled passes), with a
    clock on which a chunk of c tokens costs 0.002 + 0.002 c and a cycle 0.1: while a stream
    decodes, a 120-token prompt (longer than prefill_chunk) is read in chunks of its own sized
    to about prefill_share of a cycle (after the first, which has no measure yet; never fewer
    than MIN_CHUNK tokens, growing at most twofold) and still read whole; a short prompt is read whole in one turn,
    also behind the long one. Replies equal their replies alone."""
    from twotower.serve import engine as engine_module

    monkeypatch.setattr(TwoTowerForCausalLM, "can_carry", property(lambda self: False))
    model, long_prompt = _model(), PROMPT * 3
    engine = Engine(model, tiny_tokenizer(), prefill_chunk=32, prefill_share=0.5)
    clock = [0.0]
    engine.clock = lambda: clock[0]
    chunks, read, cycle = [], engine_module.Reading.read_chunk, engine._cycle
    cost = lambda c: 0.002 + 0.002 * c

    def timed_read(self, model, chunk):
        clock[0] += cost(chunk)
        chunks.append((chunk, bool(engine.groups), len(self.job.prompt_ids)))
        return read(self, model, chunk)

    monkeypatch.setattr(engine_module.Reading, "read_chunk", timed_read)
    monkeypatch.setattr(engine, "_cycle", lambda key: (clock.__setitem__(0, clock[0] + 0.1), cycle(key))[1])
    running = engine.submit(Job([5, 6, 7], "ar", {"max_new_tokens": 60}))
    while not engine.groups:
        engine.step()
    assert chunks == [(3, False, 3)]  # no row decoding yet: the whole prompt at once
    new = engine.submit(Job(long_prompt, "ar", {"max_new_tokens": 5}))
    engine.step()
    short = engine.submit(Job([8, 9, 10, 11], "ar", {"max_new_tokens": 5}))
    before = len(chunks)
    engine.step()
    assert chunks[before] == (4, True, 4) and engine.reading[0].job is new  # first and whole: not held up
    while engine.step():
        pass
    during = [c for c, decoding, length in chunks if decoding and length == len(long_prompt)]
    assert sum(during) == len(long_prompt) and during[0] == engine_module.MIN_CHUNK
    sized = during[1:-1]  # the last one is what is left
    assert sized and all(engine_module.MIN_CHUNK < c < 32 for c in sized)  # neither the floor nor the token budget
    assert all(b <= 2 * a for a, b in itertools.pairwise(during))  # growing at most twofold a turn
    assert all(cost(c) <= 0.5 * 0.1 + 1e-9 for c in sized) and cost(max(sized)) >= 0.04  # about half a cycle
    texts = ["".join(e[1] for e in _drain_events(job) if e[0] == "text") for job in (running, new, short)]
    alone = [([5, 6, 7], 60), (long_prompt, 5), ([8, 9, 10, 11], 5)]
    assert texts == [_text_alone(model, "ar", prompt, n) for prompt, n in alone]


def test_while_no_row_decodes_a_long_prompts_chunk_takes_about_the_idle_bound(monkeypatch):
    """No stream running: a long prompt is still read in timed chunks (about IDLE_CHUNK_SECONDS
    each, here 0.05 on a clock where c tokens cost 0.002 + 0.002 c), not a whole --prefill-chunk
    at once, so a request that arrives meanwhile waits one such chunk; the reply is its reply alone."""
    from twotower.serve import engine as engine_module

    monkeypatch.setattr(engine_module, "IDLE_CHUNK_SECONDS", 0.05)
    model, long_prompt = _model(), PROMPT * 3
    engine = Engine(model, tiny_tokenizer(), prefill_chunk=32, prefill_share=0.5)
    clock, chunks, read = [0.0], [], engine_module.Reading.read_chunk
    engine.clock = lambda: clock[0]
    cost = lambda c: 0.002 + 0.002 * c

    def timed_read(self, model, chunk):
        clock[0] += cost(chunk)
        chunks.append(chunk)
        return read(self, model, chunk)

    monkeypatch.setattr(engine_module.Reading, "read_chunk", timed_read)
    job = engine.submit(Job(long_prompt, "ar", {"max_new_tokens": 5}))
    while engine.reading or engine.waiting or not engine.groups:
        engine.step()
    assert sum(chunks) == len(long_prompt) and chunks[0] == engine_module.MIN_CHUNK
    assert all(cost(c) <= 0.05 + 1e-9 for c in chunks) and max(chunks) < 32  # never the whole budget
    while engine.step():
        pass
    assert "".join(e[1] for e in _drain_events(job) if e[0] == "text") == _text_alone(model, "ar", long_prompt, 5)


def test_short_prompts_that_arrive_together_are_read_in_one_turn():
    """The chunk is a budget per turn: three 3-token prompts within 16 tokens all join at once."""
    engine = Engine(_model(), tiny_tokenizer(), prefill_chunk=16)
    for prompt in ([5, 6, 7], [8, 9, 10], [11, 12, 13]):
        engine.submit(Job(prompt, "ar", {"max_new_tokens": 4}))
    engine.step()
    assert not engine.reading and sum(len(g.rows) for g in engine.groups.values()) == 3


# ------------------------------------------------------------------ /health
def test_health_is_503_with_a_reason_when_the_loop_is_stuck_or_dead(monkeypatch):
    model = _model()
    with Server(model) as server:
        assert server.health().status_code == 200
        server.engine.stuck_after = 0.3
        passes = Passes(model, monkeypatch, delay=1.5)
        body = {"prompt": "w5", "max_tokens": 2, "temperature": 0, "mode": "ar"}
        reply = threading.Thread(target=lambda: httpx.post(server.url + "/v1/completions", json=body, timeout=30))
        reply.start()
        deadline = time.time() + 10
        while passes.count == 0 and server.health().status_code == 200 and time.time() < deadline:
            time.sleep(0.05)
        stuck = server.health()
        assert stuck.status_code == 503 and "cycle" in stuck.json()["reason"], stuck.text
        reply.join()
        server.engine.stuck_after = 60.0
        assert server.health().status_code == 200

        def broken():
            raise RuntimeError("a bug in the loop")

        monkeypatch.setattr(server.engine, "step", broken)
        server.engine.wake.set()
        server.engine.thread.join(timeout=10)
        dead = server.health()
        assert dead.status_code == 503 and "a bug in the loop" in dead.json()["reason"]
        assert 'twotower_requests_total{route="/health",status="503"}' in httpx.get(server.url + "/metrics").text


# ------------------------------------------------------------------ time limits
def test_the_queue_limit_is_a_503_and_the_generation_limit_counts_from_the_row(monkeypatch):
    """0.15 s a pass. One row: a request that waits past --queue-timeout gets a 503 with
    Retry-After and a message naming the limit, and the reply holding the row ends at
    --timeout with finish_reason "length" and the tokens made so far. The generation limit
    starts with the row: a request that waited in the queue for longer than it still gets
    tokens (not a 200 with none)."""
    model = _model()
    Passes(model, monkeypatch, delay=0.15)
    url = "/v1/completions"
    ask = lambda n: {"prompt": "w5 w6", "max_tokens": n, "temperature": 0, "mode": "ar"}
    with Server(model, max_batch=1, queue_timeout=0.5, timeout=2.0) as server:
        results = {}
        first = threading.Thread(target=lambda: results.update(first=httpx.post(server.url + url, json=ask(100), timeout=60)))
        first.start()
        while server.health().json()["running"] == 0:
            time.sleep(0.02)
        late = httpx.post(server.url + url, json=ask(5), timeout=60)
        first.join()
        assert late.status_code == 503 and late.headers["retry-after"]
        assert "--queue-timeout" in late.json()["error"]["message"] and "0.5 s" in late.json()["error"]["message"]
        cut = results["first"].json()
        assert cut["choices"][0]["finish_reason"] == "length" and 1 <= cut["usage"]["completion_tokens"] < 100
        assert 'twotower_requests_total{route="/v1/completions",status="503"} 1.0' in httpx.get(server.url + "/metrics").text
    with Server(model, timeout=0.5) as server:
        admitting, admit = threading.Event(), server.engine._admit
        monkeypatch.setattr(server.engine, "_admit", lambda: admit() if admitting.is_set() else None)
        results = {}
        waiting = threading.Thread(target=lambda: results.update(r=httpx.post(server.url + url, json=ask(100), timeout=60)))
        waiting.start()
        while server.health().json()["queued"] == 0:
            time.sleep(0.05)
        time.sleep(1.0)  # in the queue for longer than --timeout
        admitting.set()
        waiting.join()
        reply = results["r"].json()
        assert reply["usage"]["completion_tokens"] >= 1 and reply["choices"][0]["finish_reason"] == "length"


def test_a_request_without_max_tokens_may_use_the_rest_of_the_context():
    from twotower.serve.protocol import CompletionRequest

    model = _model(context=64)
    ids = tiny_tokenizer()("w5 w6 w7")["input_ids"]
    body = CompletionRequest(prompt="w5 w6 w7")
    assert Service(model, tiny_tokenizer(), "tiny", ServeOptions()).room(body, ids) == 64 - len(ids)
    assert Service(model, tiny_tokenizer(), "tiny", ServeOptions(max_tokens_default=10)).room(body, ids) == 10
    assert Service(model, tiny_tokenizer(), "tiny", ServeOptions(max_tokens_default=500)).room(body, ids) == 64 - len(ids)


# ------------------------------------------------------------------ start-up and shutdown
def test_the_startup_line_names_address_model_mode_dtype_and_weights():
    service = Service(_model(), tiny_tokenizer(), "tiny", ServeOptions(host="0.0.0.0", port=8123))
    line = startup_line(service, LoadOptions(model="runs/tiny"))
    for part in ("http://0.0.0.0:8123/v1", "model runs/tiny", "mode verify", "dtype fp32", "weights dense"):
        assert part in line, line


def test_sigterm_drains_in_flight_requests_then_cuts_them_and_stops(monkeypatch):
    """--drain-seconds 1 at 0.1 s a pass: a short request in flight at SIGTERM finishes; a
    200-token stream is cut after the drain, the server and the engine's loop stop."""
    model = _model()
    Passes(model, monkeypatch, delay=0.1)
    server = Server(model, max_batch=4, drain_seconds=1.0)
    with server:
        streamed, short = [], {}

        def long_stream():
            body = {"prompt": "w5", "max_tokens": 200, "temperature": 0, "mode": "ar", "stream": True}
            try:
                with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
                    streamed.extend(line for line in r.iter_lines() if line.startswith("data:"))
            except httpx.HTTPError:
                pass  # the connection is cut

        body = {"prompt": "w9", "max_tokens": 4, "temperature": 0, "mode": "ar"}
        clients = [threading.Thread(target=long_stream)]
        clients.append(
            threading.Thread(target=lambda: short.update(r=httpx.post(server.url + "/v1/completions", json=body, timeout=60)))
        )
        for client in clients:
            client.start()
        while server.health().json()["running"] < 2:
            time.sleep(0.05)
        server.server.handle_exit(signal.SIGTERM, None)
        server.thread.join(timeout=20)
        for client in clients:
            client.join(timeout=20)
        assert not server.thread.is_alive() and not server.engine.thread.is_alive()
        assert short["r"].status_code == 200 and short["r"].json()["usage"]["completion_tokens"] == 4
        assert len(streamed) < 100 and "data: [DONE]" not in streamed


# ------------------------------------------------------------------ metrics
def test_an_error_inside_a_stream_is_counted_as_a_5xx(monkeypatch):
    from twotower.generate.ar import ARDecoder

    def broken(self):
        raise RuntimeError("a bug in a cycle")
        yield

    monkeypatch.setattr(ARDecoder, "cycle", broken)
    with Server(_model()) as server:
        body = {"prompt": "w5", "max_tokens": 5, "temperature": 0, "mode": "ar", "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data:")]
        assert r.status_code == 200 and any("internal error" in line for line in lines)
        text = httpx.get(server.url + "/metrics").text
    assert 'twotower_stream_errors_total{route="/v1/completions",status="500"} 1.0' in text


def test_verify_drafts_are_counted_under_vllm_names():
    """Counters named as vLLM's speculative-decoding metrics, fed by every verify cycle: drafts,
    drafted and accepted tokens, and accepted tokens per draft position, which add up."""
    from twotower.serve.metrics import Metrics

    # untrained, the denoiser's first draft token is AR's (shifted layout), so drafts are accepted
    model = TwoTowerForCausalLM.from_backbone(tiny_backbone(), tiny_tokenizer(), block_size=4, lora_rank=4)
    metrics = Metrics()
    engine = Engine(model, tiny_tokenizer(), metrics=metrics)
    engine.submit(Job(PROMPT, "verify", {"max_new_tokens": 24}, {"draft": "denoiser"}))
    while engine.step():
        pass
    text = metrics.render()
    value = lambda name: float(re.search(rf"^twotower_{name}_total (\S+)$", text, re.M).group(1))
    per_pos = {int(k): float(v) for k, v in re.findall(r'accepted_tokens_per_pos_total\{position="(\d+)"\} (\S+)', text)}
    drafts, drafted, accepted = (
        value("spec_decode_num_drafts"),
        value("spec_decode_num_draft_tokens"),
        value("spec_decode_num_accepted_tokens"),
    )
    assert drafts >= 1 and accepted >= 1 and drafted >= accepted
    assert sum(per_pos.values()) == accepted and sorted(per_pos) == list(range(len(per_pos)))
    counts = [per_pos[k] for k in sorted(per_pos)]
    assert counts[0] <= drafts and counts == sorted(counts, reverse=True)


def test_the_readme_example_names_the_served_model():
    """The documented request's "model" is the name /v1/models lists for the default model."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for doc in ("README.md", "docs/serving.md"):
        bodies = re.findall(r"-d '(\{.*?\})'", (root / doc).read_text())
        assert bodies and all(json.loads(b)["model"] == "twotower-smollm2-135m" for b in bodies), doc


def test_a_cycle_that_fails_while_carrying_a_chunk_ends_that_prompts_request_too(monkeypatch):
    """The prompt's cache may hold part of the failed pass, so its request ends with the cycle's
    (a 500's message), and the engine goes on serving."""
    model, long_prompt = _model(), PROMPT * 3
    engine = Engine(model, tiny_tokenizer(), prefill_chunk=32, prefill_share=0.5)
    running = engine.submit(Job([5, 6, 7], "ar", {"max_new_tokens": 80}))
    while not engine.groups:
        engine.step()
    engine.step()
    new = engine.submit(Job(long_prompt, "ar", {"max_new_tokens": 5}))
    engine.step()  # its first chunk, a pass of its own

    def broken(backbone, p, rider):
        raise RuntimeError("broken pass")

    monkeypatch.setattr(model.family, "run_two", broken)
    engine.step()  # the cycle carries its next chunk, and fails
    for job in (running, new):
        events = _drain_events(job)
        assert events[-1][0] == "error" and events[-1][1].startswith("internal error"), events[-1]
    assert not engine.reading and not engine.groups
    monkeypatch.undo()
    again = engine.submit(Job([8, 9], "ar", {"max_new_tokens": 3}))
    while engine.step():
        pass
    assert _drain_events(again)[-1][0] == "done"
