"""The server's API surface on a tiny fp32 model (in process): every field OpenAI has that
twotower does not implement is refused with a 400 naming it, an unknown model is a 404, and the
implemented ones have their effect: echo, logprobs of prompt and reply tokens (equal to the
model's own logits), token-id prompts, n seeded choices, /tokenize and /detokenize."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_tokenizer
from test_serve import _model

from twotower.text import encode_prompt

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def served():
    from fastapi.testclient import TestClient

    from twotower.serve.app import create_app

    model = _model()
    with TestClient(create_app(model, tiny_tokenizer(), "tiny")) as client:
        yield client, model


def _chat(**extra) -> dict:
    return {"messages": [{"role": "user", "content": "w5 w6"}], "max_tokens": 4, "temperature": 0, **extra}


def _completion(**extra) -> dict:
    return {"prompt": "w5 w6 w7", "max_tokens": 4, "temperature": 0, **extra}


def _logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's own logits over ids: row i is the distribution of token i + 1."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0, :-1].float(), dim=-1)


REFUSED = [
    ("/v1/chat/completions", _chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    ("/v1/chat/completions", _chat(tool_choice="auto"), "tool_choice"),
    ("/v1/chat/completions", _chat(functions=[{"name": "f"}]), "functions"),
    ("/v1/chat/completions", _chat(function_call="auto"), "function_call"),
    ("/v1/chat/completions", _chat(response_format={"type": "json_object"}), "response_format"),
    ("/v1/chat/completions", _chat(top_logprobs=2), "top_logprobs"),
    ("/v1/chat/completions", _chat(top_logprobs=21, logprobs=True), "top_logprobs"),
    ("/v1/chat/completions", _chat(parallel_tool_calls=True), "parallel_tool_calls"),
    ("/v1/chat/completions", _chat(n=17), "n"),
    ("/v1/completions", _completion(best_of=2), "best_of"),
    ("/v1/completions", _completion(n=2, best_of=1), "best_of"),
    ("/v1/completions", _completion(suffix="w9"), "suffix"),
    ("/v1/completions", _completion(logprobs=6), "logprobs"),
    ("/v1/completions", _completion(max_tokens=0), "echo"),
    ("/v1/completions", _completion(max_tokens=0, echo=True, mode="verify"), "mode"),
    ("/v1/completions", _completion(tools=[]), "tools"),  # a chat field
    ("/v1/completions", _completion(stream_options={"include_usage": True, "x": 1}), "stream_options"),
    ("/v1/completions", _completion(prompt=[5, 96]), "prompt"),  # outside the vocabulary
    ("/v1/completions", _completion(prompt=[[5], []]), "prompt"),
    ("/v1/completions", _completion(prompt=["w5", "w6"], stream=True), "prompt"),
    ("/v1/completions", _completion(n=2, stream=True), "n"),
    ("/tokenize", {"prompt": "w5", "messages": [{"role": "user", "content": "w5"}]}, None),
    ("/detokenize", {"tokens": [5, 1000]}, "tokens"),
]


@pytest.mark.parametrize("route,body,param", REFUSED, ids=[f"{r}:{p}" for r, _, p in REFUSED])
def test_what_is_not_implemented_is_refused_with_a_400_naming_it(served, route, body, param):
    client, _ = served
    r = client.post(route, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    if param is not None:
        assert param in error["message"]


SAMPLING = {"frequency_penalty": 0.5, "presence_penalty": 0.5, "logit_bias": {"5": 1.0}, "top_k": 5, "min_p": 0.1}


def test_sampling_fields_are_refused_until_they_are_request_knobs(served):
    """OpenAI's sampling fields twotower's settings do not have yet are refused as OpenAI refuses
    an unknown argument; once a settings knob carries one (request=True), it is a request field."""
    from twotower.settings import request_knobs

    client, _ = served
    for name, value in SAMPLING.items():
        r = client.post("/v1/completions", json=_completion(**{name: value}))
        if name in request_knobs():
            assert r.status_code == 200, r.text
        else:
            assert r.status_code == 400 and r.json()["error"] == {"message": f"Unrecognized request argument supplied: {name}",
                "type": "invalid_request_error", "param": name, "code": None}  # fmt: skip


def test_harmless_fields_are_accepted_and_change_nothing(served):
    client, _ = served
    plain = client.post("/v1/chat/completions", json=_chat()).json()
    ignored = {"user": "u1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto", "tools": [], "tool_choice": "none"}
    out = client.post("/v1/chat/completions", json=_chat(response_format={"type": "text"}, **ignored)).json()
    assert out["choices"][0]["message"] == plain["choices"][0]["message"]


def test_an_unknown_model_is_404_model_not_found(served):
    client, _ = served
    r = client.post("/v1/chat/completions", json=_chat(model="gpt-4o"))
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert client.post("/tokenize", json={"prompt": "w5", "model": "gpt-4o"}).status_code == 404
    served_name = client.get("/v1/models").json()["data"][0]["id"]
    assert client.post("/v1/chat/completions", json=_chat(model=served_name)).status_code == 200
    assert client.post("/v1/chat/completions", json=_chat()).status_code == 200  # no model: the served one


def test_echo_and_logprobs_score_the_prompt_as_the_models_own_logits(served):
    """lm-eval's loglikelihood request: prompt = context + continuation, echo, logprobs 1; with
    max_tokens 0 it only scores. Every prompt token's logprob (the first has none) and its top
    alternatives are log_softmax of the model's logits."""
    client, model = served
    ids = [5, 9, 14, 30, 7, 22]
    expected = _logprobs(model, ids)
    for max_tokens in (0, 1):
        out = client.post("/v1/completions", json={"prompt": ids, "echo": True, "logprobs": 3, "max_tokens": max_tokens,
                                                   "temperature": 0}).json()  # fmt: skip
        choice = out["choices"][0]
        logprobs = choice["logprobs"]
        assert choice["text"].startswith(tiny_tokenizer().decode(ids))
        assert len(logprobs["tokens"]) == len(ids) + max_tokens and logprobs["token_logprobs"][0] is None
        assert logprobs["top_logprobs"][0] is None
        for i in range(1, len(ids)):
            assert logprobs["token_logprobs"][i] == pytest.approx(expected[i - 1, ids[i]].item(), abs=1e-5)
            best = expected[i - 1].topk(3)
            tops = {tiny_tokenizer().decode([t]): v for t, v in zip(best.indices.tolist(), best.values.tolist())}
            assert logprobs["top_logprobs"][i] == pytest.approx(tops, abs=1e-5)
        assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": max_tokens, "total_tokens": len(ids) + max_tokens}
    plain = client.post("/v1/completions", json={"prompt": "w5 w9", "max_tokens": 3, "temperature": 0}).json()
    echoed = client.post("/v1/completions", json={"prompt": "w5 w9", "max_tokens": 3, "temperature": 0, "echo": True}).json()
    assert echoed["choices"][0]["text"] == "w5 w9" + plain["choices"][0]["text"] and plain["choices"][0]["logprobs"] is None


def test_reply_logprobs_are_the_models_logprobs_of_the_reply_tokens(served):
    client, model = served
    tok = tiny_tokenizer()
    prompt = tok("w5 w6 w7")["input_ids"]
    out = client.post("/v1/completions", json=_completion(max_tokens=5, logprobs=0)).json()["choices"][0]
    reply = tok(out["text"])["input_ids"]
    expected = _logprobs(model, prompt + reply)[len(prompt) - 1 :]
    assert out["logprobs"]["tokens"] == [tok.decode([t]) for t in reply]
    assert out["logprobs"]["token_logprobs"] == pytest.approx([expected[i, t].item() for i, t in enumerate(reply)], abs=1e-5)
    assert out["logprobs"]["top_logprobs"] == [{}] * len(reply)  # logprobs 0: the chosen token only
    assert out["logprobs"]["token_logprobs"] == pytest.approx(expected.max(-1).values.tolist(), abs=1e-5)  # greedy

    chat = client.post("/v1/chat/completions", json=_chat(logprobs=True, top_logprobs=2)).json()["choices"][0]
    chat_prompt, chat_reply = encode_prompt(tok, "w5 w6"), tok(chat["message"]["content"])["input_ids"]
    expected = _logprobs(model, chat_prompt + chat_reply)[len(chat_prompt) - 1 :]
    content = chat["logprobs"]["content"]
    assert [c["token"] for c in content] == [tok.decode([t]) for t in chat_reply]
    for i, (c, t) in enumerate(zip(content, chat_reply)):
        assert c["logprob"] == pytest.approx(expected[i, t].item(), abs=1e-5) and len(c["top_logprobs"]) == 2
        assert c["top_logprobs"][0]["logprob"] == pytest.approx(expected[i].max().item(), abs=1e-5)
    plain = client.post("/v1/chat/completions", json=_chat()).json()["choices"][0]
    assert plain["logprobs"] is None and plain["message"] == chat["message"]
    for mode in ("diffusion", "mock-ar"):  # the denoiser's distribution: one entry per reply token
        out = client.post("/v1/completions", json=_completion(max_tokens=6, logprobs=1, mode=mode)).json()["choices"][0]
        assert out["logprobs"]["tokens"] == [tok.decode([t]) for t in tok(out["text"])["input_ids"]]
        assert all(lp <= 0 for lp in out["logprobs"]["token_logprobs"]) and all(
            len(t) == 1 for t in out["logprobs"]["top_logprobs"]
        )


def _stream(client, route: str, body: dict) -> list[dict]:
    with client.stream("POST", route, json={**body, "stream": True}) as r:
        lines = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_streamed_chunks_carry_the_logprobs_of_their_own_tokens(served):
    client, _ = served
    tok = tiny_tokenizer()
    whole = client.post("/v1/completions", json=_completion(max_tokens=6, logprobs=2)).json()["choices"][0]["logprobs"]
    chunks = [c["choices"][0] for c in _stream(client, "/v1/completions", _completion(max_tokens=6, logprobs=2)) if c["choices"]]
    texts = [c for c in chunks if c["text"]]
    assert all(tok(c["text"])["input_ids"] == tok(" ".join(c["logprobs"]["tokens"]))["input_ids"] for c in texts)
    assert [t for c in texts for t in c["logprobs"]["tokens"]] == whole["tokens"]
    assert [lp for c in texts for lp in c["logprobs"]["token_logprobs"]] == pytest.approx(whole["token_logprobs"], abs=1e-5)
    chat_whole = client.post("/v1/chat/completions", json=_chat(logprobs=True)).json()["choices"][0]["logprobs"]["content"]
    chat_chunks = [c["choices"][0] for c in _stream(client, "/v1/chat/completions", _chat(logprobs=True)) if c["choices"]]
    streamed = [e for c in chat_chunks if c["delta"].get("content") for e in c["logprobs"]["content"]]
    assert [e["token"] for e in streamed] == [e["token"] for e in chat_whole]
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in chat_whole], abs=1e-5)
    echoed = _stream(client, "/v1/completions", _completion(echo=True, max_tokens=2))
    assert echoed[0]["choices"][0]["text"] == "w5 w6 w7"
    scored = [c["choices"][0] for c in _stream(client, "/v1/completions", _completion(echo=True, max_tokens=0, logprobs=1))]
    assert [c["text"] for c in scored] == ["w5 w6 w7", ""] and scored[-1]["finish_reason"] == "length"
    alone = client.post("/v1/completions", json=_completion(echo=True, max_tokens=0, logprobs=1)).json()["choices"][0]
    assert scored[0]["logprobs"] == alone["logprobs"]


def test_token_id_prompts_get_the_reply_of_their_text(served):
    client, _ = served
    tok = tiny_tokenizer()
    texts = ["w5 w6 w7", "w40 w41"]
    by_text = client.post("/v1/completions", json=_completion(prompt=texts)).json()
    by_ids = client.post("/v1/completions", json=_completion(prompt=[tok(t)["input_ids"] for t in texts])).json()
    one = client.post("/v1/completions", json=_completion(prompt=tok(texts[0])["input_ids"])).json()
    assert [c["text"] for c in by_ids["choices"]] == [c["text"] for c in by_text["choices"]]
    assert one["choices"][0]["text"] == by_text["choices"][0]["text"] and by_ids["usage"] == by_text["usage"]


def test_tokenize_and_detokenize_round_trip(served):
    client, model = served
    tok = tiny_tokenizer()
    out = client.post("/tokenize", json={"prompt": "w5 w6 w70", "add_special_tokens": False}).json()
    assert out == {"tokens": tok("w5 w6 w70", add_special_tokens=False)["input_ids"], "count": 3,
                   "max_model_len": model.max_context}  # fmt: skip
    assert client.post("/detokenize", json={"tokens": out["tokens"]}).json() == {"prompt": "w5 w6 w70"}
    chat = client.post("/tokenize", json={"messages": [{"role": "user", "content": "w5 w6"}]}).json()
    assert chat["tokens"] == encode_prompt(tok, "w5 w6")
    info = client.get("/tokenizer_info").json()
    assert info["eos_token"] == tok.eos_token and info["chat_template"] == tok.chat_template


def test_n_choices_are_seeded_seed_plus_index(served):
    """n = 2 with seed s: choice i is the request alone with seed s + i; with two prompts the
    choices are numbered prompt * n + i."""
    client, _ = served
    body = {"prompt": "w5 w6", "max_tokens": 8, "temperature": 1.0, "seed": 11}
    two = client.post("/v1/completions", json={**body, "n": 2}).json()["choices"]
    alone = [client.post("/v1/completions", json={**body, "seed": 11 + i}).json()["choices"][0]["text"] for i in range(2)]
    assert [c["index"] for c in two] == [0, 1] and [c["text"] for c in two] == alone and alone[0] != alone[1]
    chat = client.post("/v1/chat/completions", json=_chat(n=2, temperature=1.0, seed=11, max_tokens=8)).json()
    chat_alone = client.post("/v1/chat/completions", json=_chat(temperature=1.0, seed=12, max_tokens=8)).json()
    assert chat["choices"][1]["message"] == chat_alone["choices"][0]["message"] and len(chat["twotower"]) == 2
    many = client.post("/v1/completions", json={**body, "n": 2, "prompt": ["w5 w6", "w9"]}).json()["choices"]
    assert [c["index"] for c in many] == [0, 1, 2, 3] and [c["text"] for c in many[:2]] == alone


def test_a_bad_later_prompt_leaves_no_earlier_prompt_running(served):
    client, _ = served
    for prompts in ([[5, 6], [1000]], ["w5 w6", "w5 " * 300]):  # outside the vocabulary; longer than the context
        r = client.post("/v1/completions", json={"prompt": prompts, "max_tokens": 200, "temperature": 0})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        health = client.get("/health").json()
        assert health["running"] == 0 and health["queued"] == 0


def _with_surrogates(value):
    """Every string in value with a lone surrogate in front."""
    if isinstance(value, str):
        return "\ud800" + value
    if isinstance(value, list):
        return [_with_surrogates(v) for v in value]
    return {k: v if k == "role" else _with_surrogates(v) for k, v in value.items()}


def test_surrogate_escapes_deep_nesting_and_oversized_bodies_are_4xx(served):
    """What schemathesis does not generate: lone surrogate escapes in every string field and in a
    key (the text the reply reads is a 400 naming its field; none is a 5xx), JSON nested deeper
    than the parser goes, and a body over the size limit."""
    client, _ = served
    bodies = [("/v1/chat/completions", _chat(model="tiny", stop="w9", mode="ar")),
              ("/v1/completions", _completion(prompt=["w5", "w6"], stop=["w9"], user="u", metadata={"k": "v"})),
              ("/tokenize", {"prompt": "w5"}), ("/tokenize", {"messages": [{"role": "user", "content": "w5"}]})]  # fmt: skip
    for route, body in bodies:
        for key, value in body.items():
            if isinstance(value, (str, list, dict)):
                raw = json.dumps({**body, key: _with_surrogates(value)})  # escaped: "\\ud800"
                r = client.post(route, content=raw.encode())
                assert r.status_code in (200, 400, 404), (route, key, r.text)
                if key in ("messages", "prompt"):
                    assert r.status_code == 400 and r.json()["error"]["param"] == key
        raw = json.dumps(body)[:-1] + ', "\\udc00": 1}'
        assert client.post(route, content=raw.encode()).status_code == 400
    assert client.post("/v1/completions", content=b"[" * 100_000 + b"]" * 100_000).status_code == 400
    huge = json.dumps(_completion(prompt="w5 " * (3 * 2**20)))
    assert client.post("/v1/completions", content=huge.encode()).status_code == 413
    assert client.get("/health").json()["status"] == "ok"


def test_the_openapi_schema_describes_the_bodies_read_off_the_event_loop(served):
    client, _ = served
    schema = client.get("/openapi.json").json()
    for path, name in [("/v1/chat/completions", "ChatRequest"), ("/v1/completions", "CompletionRequest"),
                       ("/tokenize", "TokenizeRequest"), ("/detokenize", "DetokenizeRequest")]:  # fmt: skip
        operation = schema["paths"][path]["post"]
        assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/" + name)
        assert "400" in operation["responses"]
    completion = schema["components"]["schemas"]["CompletionRequest"]
    assert {"prompt", "echo", "logprobs", "n", "mode"} <= set(completion["properties"])
    assert completion["additionalProperties"] is False


def test_a_request_may_draft_token_trees(served):
    """tree_nodes is a request field of verify mode: a greedy reply with trees is the chain's
    (both AR's), and the field is refused for another mode, by name."""
    client, _ = served
    body = _completion(mode="verify", max_tokens=12)
    chain = client.post("/v1/completions", json=body)
    tree = client.post("/v1/completions", json=body | {"tree_nodes": 8})
    assert chain.status_code == tree.status_code == 200
    assert tree.json()["choices"][0]["text"] == chain.json()["choices"][0]["text"]
    refused = client.post("/v1/completions", json=_completion(mode="ar", tree_nodes=8))
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "tree_nodes"


def test_ignore_eos_writes_max_tokens_past_an_eos(served):
    """vLLM's ignore_eos: a reply forced to EOS (logit_bias) ends at once without it, and is
    max_tokens long with it (finish_reason "length")."""
    from conftest import EOS

    client, _ = served
    body = _completion(max_tokens=6, logit_bias={str(EOS): 100})
    stopped = client.post("/v1/completions", json=body).json()
    kept = client.post("/v1/completions", json=body | {"ignore_eos": True}).json()
    assert stopped["usage"]["completion_tokens"] == 1 and stopped["choices"][0]["finish_reason"] == "stop"
    assert kept["usage"]["completion_tokens"] == 6 and kept["choices"][0]["finish_reason"] == "length"
    assert client.post("/v1/completions", json=body | {"ignore_eos": "maybe"}).status_code == 400
