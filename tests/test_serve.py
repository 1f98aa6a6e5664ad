"""`twotower serve` with real parts on a tiny model: the openai client against a live server
process, stop strings across block boundaries, errors as OpenAI-style 4xx, continuous batching
whose greedy replies equal the replies alone, schema fuzzing (no 5xx), a short load test, and
lm-eval as a client."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from conftest import perturb_trained, tiny_backbone, tiny_tokenizer

from twotower import TwoTowerForCausalLM, generate
from twotower.text import encode_prompt

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


SERVED = "twotower-checkpoint"  # the name `twotower serve` gives the checkpoint folder of process_server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(context: int = 256):
    model = TwoTowerForCausalLM.from_backbone(
        tiny_backbone(max_position_embeddings=context), tiny_tokenizer(), block_size=4, lora_rank=4
    )
    perturb_trained(model, scale=0.02)
    model.config.trained_tokens = 1  # counts as trained: diffusion mode is served
    return model


class ThreadServer:
    """The app in uvicorn on a thread of this process (a real HTTP port), configured as `twotower
    serve` runs it (`server_config`)."""

    def __init__(self, model, **options):
        import uvicorn

        from twotower.serve.app import create_app, server_config
        from twotower.settings import ServeOptions

        self.options = ServeOptions(port=_free_port(), **options)
        self.app = create_app(model, tiny_tokenizer(), "tiny", self.options)
        self.engine = self.app.state.engine
        self.server = uvicorn.Server(server_config(self.app, self.options))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.port = self.options.port
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def health(self) -> httpx.Response:
        return httpx.get(self.url + "/health", timeout=10)

    def wait_idle(self, seconds: float = 10.0) -> None:
        deadline = time.time() + seconds
        while self.health().json()["running"] and time.time() < deadline:
            time.sleep(0.05)
        assert self.health().json()["running"] == 0


@pytest.fixture(scope="module")
def process_server(tmp_path_factory):
    """`twotower serve` as its own process, over a tiny checkpoint folder."""
    folder = tmp_path_factory.mktemp("serve")
    backbone = folder / "backbone"
    tiny_tokenizer().save_pretrained(backbone)
    tiny_backbone().save_pretrained(backbone)
    from twotower import load_model

    model, _ = load_model(str(backbone), dtype=torch.float32, block_size=4, lora_rank=4)
    perturb_trained(model, scale=0.02)
    model.config.trained_tokens = 1
    model.save_pretrained(folder / "checkpoint")
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "twotower.cli", "serve", "--model", str(folder / "checkpoint"), "--port", str(port),
           "--dtype", "fp32", "--max-batch", "8", "--mode", "ar"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("twotower serve did not start: " + (proc.stdout.read() if proc.stdout else ""))
        time.sleep(0.2)
    reference = TwoTowerForCausalLM.from_pretrained(folder / "checkpoint", dtype=torch.float32)
    yield url, reference
    proc.terminate()
    proc.wait(timeout=20)


def _greedy(model, mode: str, prompt_ids, max_new: int, **options) -> list[int]:
    from twotower.text import eos_token_ids

    eos = eos_token_ids(model, tiny_tokenizer())
    return generate(model, mode, [prompt_ids], max_new_tokens=max_new, eos_token_id=eos, **options).tokens[0]


# ------------------------------------------------------------------ the openai client, a live process
def test_openai_client_chat_and_completions(process_server):
    from openai import OpenAI

    url, reference = process_server
    tok = tiny_tokenizer()
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [SERVED]
    for mode in ("ar", "verify", "diffusion"):
        expected = _greedy(reference, mode, encode_prompt(tok, "w5 w6 w7"), 12)
        text = tok.decode(expected, skip_special_tokens=True)
        out = client.chat.completions.create(
            model=SERVED, messages=[{"role": "user", "content": "w5 w6 w7"}], max_tokens=12, temperature=0,
            extra_body={"mode": mode},
        )  # fmt: skip
        assert out.choices[0].message.content == text
        assert out.usage.completion_tokens == len(expected) and out.usage.prompt_tokens == len(encode_prompt(tok, "w5 w6 w7"))
        assert out.choices[0].finish_reason == ("length" if len(expected) == 12 else "stop")
        assert out.model_extra["twotower"]["mode"] == mode
        chunks = list(client.chat.completions.create(
            model=SERVED, messages=[{"role": "user", "content": "w5 w6 w7"}], max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"mode": mode},
        ))  # fmt: skip
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == text and chunks[-1].usage.completion_tokens == len(expected)
    raw = tok("w9 w10")["input_ids"]
    expected = _greedy(reference, "ar", raw, 8)
    out = client.completions.create(model=SERVED, prompt=["w9 w10", "w5"], max_tokens=8, temperature=0)
    assert out.choices[0].text == tok.decode(expected, skip_special_tokens=True) and len(out.choices) == 2
    assert out.usage.completion_tokens == len(expected) + len(_greedy(reference, "ar", tok("w5")["input_ids"], 8))
    pieces = client.completions.create(model=SERVED, prompt="w9 w10", max_tokens=8, temperature=0, stream=True)
    assert "".join(p.choices[0].text for p in pieces if p.choices) == out.choices[0].text


def test_stop_strings_across_block_boundaries_never_send_what_follows(process_server):
    """A stop string made of the end of one diffusion block and the start of the next: the
    reply ends before it, streamed or not, and no text after it is ever sent."""
    from openai import OpenAI

    url, reference = process_server
    tok = tiny_tokenizer()
    ids = encode_prompt(tok, "w20 w21")
    result = generate(reference, "diffusion", [ids], max_new_tokens=24, eos_token_id=[1])
    tokens, starts = result.tokens[0], result.details["block_starts"][0]
    full = tok.decode(tokens, skip_special_tokens=True)
    for boundary in (s for s in starts if 0 < s < len(tokens) - 1):
        edge = len(tok.decode(tokens[:boundary], skip_special_tokens=True))  # where the block starting there begins
        stop = full[edge - 2 : edge + 3]  # the end of one block and the start of the next
        if full.find(stop) == edge - 2:  # and its first occurrence is that one
            break
    else:
        pytest.fail(f"no block boundary to test in {starts}")
    expected = full[: edge - 2]
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "w20 w21"}]
    options = dict(model=SERVED, messages=messages, max_tokens=24, temperature=0, stop=[stop], extra_body={"mode": "diffusion"})
    out = client.chat.completions.create(**options)
    assert out.choices[0].message.content == expected and out.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **options) if c.choices
    )
    assert streamed == expected


def test_malformed_requests_get_openai_style_4xx(process_server):
    url, _ = process_server
    chat = url + "/v1/chat/completions"
    cases = [
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "user", "content": "w5"}], "n": 99}, 400, "n"),
        ({"messages": [{"role": "user", "content": "w5"}], "temperature": -1}, 400, "temperature"),
        ({"messages": [{"role": "user", "content": "w5"}], "tools": [{"type": "function"}]}, 400, "tools"),
        ({"messages": [{"role": "user", "content": "w5"}], "mode": "fast"}, 400, "mode"),
        ({"messages": [{"role": "user", "content": "w5"}], "block_size": 64, "mode": "verify"}, 400, None),
        ({"messages": [{"role": "user", "content": "w5"}], "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"messages": [{"role": "user", "content": "w5 " * 300}]}, 400, "messages"),
        ({"messages": [{"role": "user", "content": "w5"}], "max_tokens": 10_000}, 400, "max_tokens"),
    ]
    for body, status, param in cases:
        r = httpx.post(chat, json=body, timeout=30)
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert error["message"] and error["type"] == "invalid_request_error" and (param is None or error["param"] == param)
    r = httpx.post(chat, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    assert httpx.get(url + "/v1/nothing").status_code == 404
    assert httpx.get(chat).status_code == 405
    assert httpx.get(url + "/health").json()["status"] == "ok"  # still alive


def test_metrics_are_prometheus_text(process_server):
    url, _ = process_server
    httpx.post(url + "/v1/completions", json={"prompt": "w5", "max_tokens": 3, "temperature": 0}, timeout=30)
    text = httpx.get(url + "/metrics").text
    names = ["twotower_requests_total", "twotower_tokens_total", "twotower_passes_total", "twotower_tokens_per_pass"]
    names += ["twotower_queue_depth", "twotower_time_to_first_token_seconds_bucket", "twotower_token_latency_seconds_count"]
    assert all(name in text for name in names)


# ------------------------------------------------------------------ the engine under load
async def _ask(client, url, prompt, mode, max_tokens):
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0, "mode": mode}
    r = await client.post(url + "/v1/chat/completions", json=body, timeout=120)
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def test_concurrent_requests_get_the_replies_they_get_alone():
    """Continuous batching: 32 clients at once, of three modes, requests joining and leaving
    the running batches at different points of their blocks; every greedy (fp32) reply equals
    the same request sent alone, and none fails (the short version of the load test)."""
    model = _model()
    prompts = [" ".join(f"w{3 + (7 * i + j) % 90}" for j in range(1 + i % 5)) for i in range(32)]
    modes = ["ar", "verify", "diffusion"]
    with ThreadServer(model, max_batch=8, max_queue=64) as server:

        async def run_all():
            async with httpx.AsyncClient() as client:
                alone = [await _ask(client, server.url, p, modes[i % 3], 6 + i % 11) for i, p in enumerate(prompts)]
                together = await asyncio.gather(
                    *(_ask(client, server.url, p, modes[i % 3], 6 + i % 11) for i, p in enumerate(prompts))
                )
                return alone, together

        alone, together = asyncio.run(run_all())
        assert together == alone
        assert httpx.get(server.url + "/health").json()["running"] == 0


def test_a_full_queue_answers_429():
    """(A client that goes away: tests/test_serve_ops.py.)"""
    model = _model()
    with ThreadServer(model, max_batch=1, max_queue=1, max_tokens_default=200) as server:

        async def crowd():
            async with httpx.AsyncClient() as client:
                body = {"prompt": "w5", "max_tokens": 200, "temperature": 0}
                tasks = [
                    asyncio.create_task(client.post(server.url + "/v1/completions", json=body, timeout=120)) for _ in range(4)
                ]
                return [r.status_code for r in await asyncio.gather(*tasks)]

        codes = asyncio.run(crowd())
        assert codes.count(200) >= 2 and 429 in codes and set(codes) <= {200, 429}


# ------------------------------------------------------------------ property-based fuzzing from the OpenAPI schema
def test_schema_fuzzing_finds_no_server_error(tmp_path):
    """schemathesis generates requests from the server's own OpenAPI schema (valid and invalid):
    at least 1,000 of them, not one 5xx."""
    import shutil

    if shutil.which("schemathesis") is None:
        pytest.skip("schemathesis is not installed")
    model = _model(context=48)
    with ThreadServer(model, max_batch=8, max_queue=256, max_tokens_default=4) as server:
        report = tmp_path / "fuzz.ndjson"
        cmd = ["schemathesis", "run", server.url + "/openapi.json", "--checks", "not_a_server_error", "-n", "300",
               "--seed", "1", "--report", "ndjson", "--report-ndjson-path", str(report), "--request-timeout", "60",
               "--no-color"]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-4000:]
    import re

    generated, passed = map(int, re.search(r"(\d+) generated, (\d+) passed", done.stdout).groups())
    print(f"schemathesis: {generated} requests generated, {passed} passed (no 5xx)")  # shown with pytest -s
    assert generated >= 1000 and passed == generated, done.stdout[-1500:]


# ------------------------------------------------------------------ lm-eval as a real client
def test_lm_eval_local_completions_runs_against_the_server(tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_tokenizer().save_pretrained(tmp_path / "tokenizer")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"question": f"w{5 + i} w{6 + i}", "answer": f"w{7 + i}"}) + "\n" for i in range(4)))
    (tasks / "tiny_words.yaml").write_text(
        "task: tiny_words\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n  do_sample: false\n  temperature: 0\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    model = _model()
    with ThreadServer(model, max_batch=4) as server:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager

        results = simple_evaluate(
            model="local-completions",
            model_args=(
                f"model=tiny,base_url={server.url}/v1/completions,tokenized_requests=False,num_concurrent=2,"
                f"max_retries=1,tokenizer={tmp_path / 'tokenizer'}"
            ),
            tasks=["tiny_words"],
            task_manager=TaskManager(include_path=str(tasks)),
            limit=4,
        )
    assert results is not None and "exact_match,none" in results["results"]["tiny_words"]
    assert lm_eval.__version__


def test_lm_eval_multiple_choice_scores_equal_the_models_own_logits(tmp_path, monkeypatch):
    """lm-eval's loglikelihood requests (echo, logprobs 1, token-id prompts, its remote tokenizer
    through /tokenizer_info and /tokenize) on a multiple-choice task: every choice's score and
    is_greedy, and the accuracy, are what the model's own logits give."""
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    docs = [{"question": f"w{5 + 3 * i} w{6 + 3 * i}", "choices": [f"w{7 + i}", f"w{30 + i}", f"w{50 + i} w{60 + i}"],
             "label": i % 3} for i in range(4)]  # fmt: skip
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tiny_choice.yaml").write_text(
        f"task: tiny_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: choices\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n"
    )
    model, tok = _model(), tiny_tokenizer()
    with ThreadServer(model, max_batch=4) as server:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager

        results = simple_evaluate(
            model="local-completions",
            model_args=f"model=tiny,base_url={server.url}/v1/completions,num_concurrent=2,max_retries=1",
            tasks=["tiny_choice"], task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True,
        )  # fmt: skip
    correct = []
    for sample in sorted(results["samples"]["tiny_choice"], key=lambda s: s["doc_id"]):
        doc, expected = docs[sample["doc_id"]], []
        for choice in doc["choices"]:
            context = tok(doc["question"], add_special_tokens=False)["input_ids"]
            whole = tok(doc["question"] + " " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([whole]))[0, :-1].float(), dim=-1)
            rows = logprobs[len(context) - 1 :]  # the distributions of the choice's tokens
            chosen = [rows[i, t] for i, t in enumerate(whole[len(context) :])]
            greedy = all(rows[i].argmax() == t for i, t in enumerate(whole[len(context) :]))
            expected.append((sum(chosen).item(), greedy))
        got = [tuple(r) for r in sample["filtered_resps"]]
        assert [g for _, g in got] == [g for _, g in expected]
        assert [s for s, _ in got] == pytest.approx([s for s, _ in expected], abs=1e-4)
        correct.append(max(range(3), key=lambda k: expected[k][0]) == doc["label"])
    assert results["results"]["tiny_choice"]["acc,none"] == pytest.approx(sum(correct) / len(correct))


def test_the_load_test_command_runs_short(tmp_path):
    """The documented load test (python -m twotower.serve.load), for a few seconds on the tiny
    model: no errors, every reply equal to the same request alone."""
    from twotower.serve import load

    model = _model()
    with ThreadServer(model, max_batch=8) as server:
        out = tmp_path / "load.json"
        code = load.main([server.url, "--clients", "1,8", "--seconds", "2", "--modes", "ar,diffusion", "--prompts", "6",
                          "--max-tokens", "8", "--out", str(out)])  # fmt: skip
    runs = json.loads(out.read_text())["runs"]
    assert code == 0 and len(runs) == 4
    assert all(r["errors"] == 0 and r["mismatched_vs_alone"] == 0 and r["requests"] >= r["clients"] for r in runs)
    assert all(r["tokens_per_second"] > 0 and r["ttft_median_s"] is not None for r in runs)


def test_the_load_test_reports_stream_gaps_while_a_long_prompt_is_read(tmp_path):
    """--long-prompt N: one more request with an N-token prompt joins each run; the run reports it
    (answered 200) and the streams' chunk gaps while it was read and otherwise, and the replies
    still equal the requests alone."""
    from twotower.serve import load

    with ThreadServer(_model(), max_batch=8) as server:
        out = tmp_path / "load.json"
        code = load.main([server.url, "--clients", "2", "--seconds", "3", "--modes", "ar", "--prompts", "4",
                          "--max-tokens", "16", "--long-prompt", "200", "--out", str(out)])  # fmt: skip
    (run,) = json.loads(out.read_text())["runs"]
    assert code == 0 and run["long_prompt"]["status"] == 200 and run["long_prompt"]["tokens"] == 200
    assert run["gap_p90_otherwise_s"] > 0 and run["latency_p90_s"] >= run["latency_median_s"] > 0
    assert run["gap_p90_while_long_prompt_s"] is None or run["gap_p90_while_long_prompt_s"] > 0


def test_the_load_test_with_mixed_sampling_runs_short(tmp_path):
    """--mixed: clients with different sampling settings (greedy, seeded top-p, seeded top-k)
    share the batch, and every reply, seeded ones too, equals the same request sent alone."""
    from twotower.serve import load

    model = _model()
    with ThreadServer(model, max_batch=8) as server:
        out = tmp_path / "load.json"
        code = load.main([server.url, "--clients", "4", "--seconds", "2", "--modes", "ar,verify", "--prompts", "8",
                          "--max-tokens", "8", "--mixed", "--out", str(out)])  # fmt: skip
    runs = json.loads(out.read_text())["runs"]
    assert code == 0 and len(runs) == 2 and all(r["mixed"] for r in runs)
    assert all(r["errors"] == 0 and r["mismatched_vs_alone"] == 0 and r["requests"] >= r["clients"] for r in runs)


def test_a_request_is_not_refused_while_a_row_is_free():
    """The queue limit counts what waits beyond the free rows: requests that arrive before the
    engine takes them up (here: its thread not started) fill the free rows first."""
    from twotower.serve.engine import Engine, Job, QueueFull

    engine = Engine(_model(), tiny_tokenizer(), max_batch=2, max_queue=1)
    for _ in range(3):  # two free rows, one waiting place
        engine.submit(Job([5, 6], "ar", {"max_new_tokens": 2}))
    with pytest.raises(QueueFull):
        engine.submit(Job([5, 6], "ar", {"max_new_tokens": 2}))
    assert engine.queue_depth == 3
