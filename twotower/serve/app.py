"""`twotower serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the engine.

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models   GET /health   GET /metrics
    POST /tokenize   POST /detokenize   GET /tokenizer_info   (vLLM's; lm-eval's remote tokenizer reads them)

Every malformed request gets a 4xx with an OpenAI-style JSON error (a prompt longer than the
context is a 400, a field twotower does not implement a 400 naming it, an unknown model a 404,
a full queue a 429), never a 500 or a dead server. Request bodies are parsed and validated off
the event loop; the OpenAPI schema still describes them (`body_schema`). Streaming is Server-Sent
Events as tokens commit; a client that goes away cancels its request and frees its row.

`Service` holds what the routes share (the engine, the metrics, the settings) and the steps of
a request: encode, make the job, submit, follow its events. `add_routes` registers the routes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from twotower.generate.common import resolve_settings
from twotower.serve.engine import Engine, Job, QueueFull
from twotower.serve.guard import Guard, header_timeout_protocol
from twotower.serve.metrics import Metrics
from twotower.serve.protocol import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    chat_logprobs,
    completion_logprobs,
    error_body,
    new_id,
    now,
    usage,
)
from twotower.settings import (
    DTYPES,
    GenerationSettings,
    LoadOptions,
    ServeOptions,
    TwoTowerError,
    refuse_inapplicable,
    request_knobs,
)

log = logging.getLogger("twotower.serve")
POLL_SECONDS = 0.25  # how often a request asks whether its client is still there


class Channel:
    """Events from the engine's thread to one request's coroutine."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.items = loop, asyncio.Queue()

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.items.put_nowait, item)

    async def get(self, timeout: float):
        return await asyncio.wait_for(self.items.get(), timeout)


class BadRequest(Exception):
    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers=None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.message, self.status, self.param, self.kind, self.headers, self.code = message, status, param, kind, headers, code


class Service:
    """The model behind the routes: a request's steps from its body to its events."""

    def __init__(self, model, tokenizer, name: str, options: ServeOptions):
        self.model, self.tokenizer, self.name, self.options = model, tokenizer, name, options
        self.trained = bool(model.config.trained_tokens)
        self.default_mode = options.mode or ("verify" if self.trained else "ar")
        self.metrics = Metrics()
        limits = dict(max_batch=options.max_batch, max_queue=options.max_queue, queue_timeout=options.queue_timeout)
        reading = dict(prefill_chunk=options.prefill_chunk, prefill_share=options.prefill_share)
        self.engine = Engine(model, tokenizer, metrics=self.metrics, **limits, **reading)
        self.vocab_size = min(len(tokenizer), model.context_tower.get_input_embeddings().num_embeddings)

    def check_model(self, name: str | None) -> None:
        """A request names the served model or none (OpenAI answers 404 model_not_found)."""
        if name is not None and name != self.name:
            raise BadRequest(
                f"The model {name!r} does not exist: this server serves {self.name!r} (GET /v1/models)",
                status=404, param="model", code="model_not_found",
            )  # fmt: skip

    def encode_chat(self, body) -> list[int]:
        """The ids of a request's `messages` under the chat template."""
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        return readable(lambda: encode_chat(self.tokenizer, messages), "messages")

    def encode_text(self, prompt: str) -> list[int]:
        ids = readable(lambda: self.tokenizer(prompt)["input_ids"], "prompt")
        if not ids:
            raise BadRequest("the prompt is empty", param="prompt")
        return ids

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """A completions prompt's ids: its text tokenised, or its token ids checked against the vocabulary."""
        if isinstance(prompt, str):
            return self.encode_text(prompt)
        self.check_ids(prompt, "prompt")
        return list(prompt)

    def check_ids(self, ids: list[int], param: str) -> None:
        outside = [i for i in ids if not 0 <= i < self.vocab_size]
        if outside:
            raise BadRequest(
                f"{param} holds token id {outside[0]}, outside the vocabulary (0 to {self.vocab_size - 1})", param=param
            )

    def text_of(self, token: int) -> str:
        """One token's text, as logprobs name it."""
        return self.tokenizer.decode([token])

    def room(self, body, prompt_ids: list[int]) -> int:
        """The reply's most tokens: the request's limit, else the server's default (the rest of the
        context unless --max-tokens-default is set), within the context."""
        context = self.model.max_context
        room = context - len(prompt_ids)
        if room <= 0:
            where = "messages" if isinstance(body, ChatRequest) else "prompt"
            raise BadRequest(f"the prompt has {len(prompt_ids)} tokens, longer than the model's context ({context})", param=where)
        if body.limit is not None and body.limit > room:
            raise BadRequest(
                f"max_tokens {body.limit} and the prompt's {len(prompt_ids)} tokens exceed the context of {context} tokens; "
                f"ask for at most {room}",
                param="max_tokens",
            )
        return body.limit or min(self.options.max_tokens_default or room, room)

    def make_jobs(self, body, prompts: list[list[int]], loop) -> list[Job]:
        """The jobs of a request, n per prompt, every one checked before any is submitted; none
        for a scoring request (max_tokens 0, echo)."""
        if body.limit == 0:
            chosen = [name for name in ("mode", *request_knobs()) if getattr(body, name) is not None]
            if chosen:  # refused, not ignored
                raise BadRequest(f"{chosen[0]} applies to writing; max_tokens 0 only scores the prompt", param=chosen[0])
            for ids in prompts:
                if len(ids) > self.model.max_context:
                    raise BadRequest(f"the prompt has {len(ids)} tokens, more than the model's context", param="prompt")
            return []
        return [self.make_job(body, ids, loop, choice) for ids in prompts for choice in range(body.n)]

    def make_job(self, body, prompt_ids: list[int], loop, choice: int = 0) -> Job:
        """The job of one prompt (its choice-th choice: seed + choice): the request's knobs checked
        against its mode and the model once."""
        mode = body.mode or self.default_mode
        if mode == "diffusion" and not self.trained:
            raise BadRequest(f"no trained denoiser for {self.name}: use mode ar or verify (lossless)", param="mode")
        knobs = {name: getattr(body, name) for name in request_knobs() if getattr(body, name) is not None}
        try:
            refuse_inapplicable(mode, knobs)
        except TwoTowerError as err:
            raise BadRequest(str(err), param=next(iter(knobs), None)) from err
        sampled = body.temperature > 0
        options = dict(max_new_tokens=self.room(body, prompt_ids), temperature=body.temperature, top_p=body.top_p)
        options.update(seed=body.seed + choice if sampled and body.seed is not None else None, logprobs=body.top)
        generation, decoder = GenerationSettings.split(knobs)  # the rest are VerifyOptions'
        try:
            resolve_settings(self.model, mode, {**options, **generation})
        except TwoTowerError as err:
            raise BadRequest(str(err)) from err
        stop, timeout = list(body.stop or []), self.options.timeout
        return Job(prompt_ids, mode, {**options, **generation}, decoder, stop=stop, timeout=timeout, events=Channel(loop))

    def submit(self, jobs: list[Job]) -> list[Job]:
        """Queue a request's jobs: all of them, or (a full queue) none."""
        try:
            for job in jobs:
                self.engine.submit(job)
        except QueueFull as err:
            for job in jobs:
                job.cancel()
            raise BadRequest(str(err), status=429, kind="rate_limit_error", headers={"Retry-After": "1"}) from err
        self.metrics.queue(self.engine.queue_depth, self.engine.running_rows)
        return jobs

    async def events(self, request: Request, job: Job, stream: bool = False):
        """The job's events until it ends. Whether the client is still there is asked every
        POLL_SECONDS, also while events flow; when it is gone, or whoever reads the events stops
        (a stream closed, the task cancelled), the job is cancelled, and the engine frees its
        row at its next cycle. An error ends the events: raised as its HTTP error, or in a
        stream (whose 200 was sent) yielded as ("error", message) and counted."""
        ended, asked = False, time.monotonic()
        try:
            while True:
                if time.monotonic() - asked >= POLL_SECONDS:
                    asked = time.monotonic()
                    if await request.is_disconnected():
                        return
                try:
                    item = await job.events.get(timeout=POLL_SECONDS)
                except TimeoutError:
                    continue
                kind, value = item[:2]
                ended = kind != "text"
                if kind in ("text", "done"):
                    yield item  # a text event carries its tokens' entries too
                elif not stream:
                    raise engine_error(kind, value)
                else:
                    status = engine_error(kind, value).status
                    if status >= 500:
                        self.metrics.stream_error(request.url.path, status)
                    yield "error", value
                if ended:
                    return
        finally:
            if not ended:
                job.cancel()

    async def collect(self, request: Request, job: Job) -> tuple[str, list[tuple], dict]:
        """The whole reply of a job: (text, its tokens' entries (engine.py), the engine's closing info)."""
        parts, entries, info = [], [], None
        async for kind, value, *more in self.events(request, job):
            if kind == "text":
                parts.append(value)
                entries += more[0]
            elif kind == "done":
                info = value
        if info is None:  # the client went away
            raise BadRequest("the client disconnected", status=499)
        self.metrics.finished(info)
        return "".join(parts), entries, info

    async def collect_all(self, request: Request, jobs: list[Job]) -> list[tuple[str, list[tuple], dict]]:
        """The replies of a request's jobs; if one fails, the others are cancelled."""
        try:
            return [await self.collect(request, job) for job in jobs]
        finally:
            for job in jobs:
                job.cancel()  # a no-op for a finished job

    async def score(self, ids: list[int], top: int) -> list[tuple]:
        """Teacher-forced logprobs of a prompt's tokens (engine.score_tokens), run by the engine's loop."""
        return await asyncio.wrap_future(self.engine.score(ids, top))

    def envelope(self, kind: str, rid: str, created: int, choices: list, **extra) -> dict:
        """An OpenAI response object (or stream chunk) around its choices."""
        return {"id": rid, "object": kind, "created": created, "model": self.name, "choices": choices, **extra}


def engine_error(kind: str, message: str) -> BadRequest:
    """The HTTP error of an engine's error event (engine.py's docstring): 503 with Retry-After
    for "busy", else 500 for an internal error and 400 for the rest."""
    if kind == "busy":
        return BadRequest(message, status=503, kind="server_error", headers={"Retry-After": "1"})
    internal = message.startswith("internal error")
    return BadRequest(message, status=500 if internal else 400, kind="server_error" if internal else "invalid_request_error")


def readable(encode, param: str):
    """Run a tokenizer call; text it cannot encode (a lone surrogate) is the client's error."""
    try:
        return encode()
    except (UnicodeError, TypeError, ValueError) as err:
        raise BadRequest(f"{param} holds text that cannot be encoded as UTF-8 (a lone surrogate?): {err}", param=param) from err


SPLIT = re.compile("\ue000(\\d+)\ue001")  # a placeholder for message i in a rendered template


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    """A chat's ids under the tokenizer's template, in which only the template makes turns: a
    message whose text spells a special token ("<|im_end|>") gets the ids of that text, not the
    token (each message tokenised with special tokens split, between the template's pieces)."""
    if not getattr(tokenizer, "chat_template", None):
        return tokenizer("\n".join(m["content"] for m in messages), split_special_tokens=True)["input_ids"]
    specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special} | set(tokenizer.all_special_tokens)
    if not any(s and s in m["content"] for m in messages for s in specials):  # the common case: one pass, as always
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    marked = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
    text = tokenizer.apply_chat_template(marked, add_generation_prompt=True, tokenize=False)
    ids, pieces = [], SPLIT.split(text)  # template, index, template, index, ..., template
    for k, piece in enumerate(pieces):
        if k % 2:
            content = messages[int(piece)]["content"]
            ids += tokenizer(content, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        elif piece:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids


def printable(text: str) -> str:
    """Text safe to send as JSON: a lone surrogate (from a "\\ud800" escape) as its escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def stats(info: dict) -> dict:
    """twotower's own statistics of one reply (the `twotower` field of a response; None where a
    choice only scored its prompt)."""
    return {k: info.get(k) for k in ("mode", "passes", "tokens_per_pass", "seconds", "time_to_first_token")}


def sse(data) -> str:
    return f"data: {json.dumps(data) if not isinstance(data, str) else data}\n\n"


def create_app(model, tokenizer, model_name: str = "twotower", options: ServeOptions = ServeOptions()) -> FastAPI:
    """The app over a loaded model."""
    service = Service(model, tokenizer, model_name, options)

    async def lifespan(app):
        service.engine.start()
        yield
        service.engine.stop()

    app = FastAPI(title="twotower", version="0.1.0", lifespan=lifespan)
    app.state.service, app.state.engine, app.state.metrics = service, service.engine, service.metrics
    app.state.started = time.time()
    add_error_handlers(app, service.metrics)
    add_routes(app, service)
    app.openapi = lambda: openapi_with_400(app)
    key = options.api_key or os.environ.get("TWOTOWER_API_KEY") or None
    app.add_middleware(Guard, api_key=key, max_body_bytes=int(options.max_body_mb * 2**20), count=service.metrics.request)
    return app


BODIES = (ChatRequest, CompletionRequest, TokenizeRequest, DetokenizeRequest)  # the bodies the routes read themselves


def body_schema(model) -> dict:
    """The OpenAPI request body (and 400) of a route that parses its body off the event loop
    (`read_body`); `openapi_with_400` adds the model's schema to the components."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    content = {"application/json": {"schema": ref}}
    return {"requestBody": {"required": True, "content": content}, "responses": {"400": {"description": "Invalid request"}}}


async def read_body(request: Request, model):
    """A request body parsed and validated in a worker thread, so that a large one does not stall
    the event loop; a failure is the same 400 as FastAPI's own validation gives."""
    return await asyncio.to_thread(parse_body, await request.body(), model)


def parse_body(raw: bytes, model):
    """Python's JSON parser, as FastAPI's: a lone surrogate escape ("\\ud800") is parsed, and
    refused where text is read (`readable`), naming its field."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as err:  # not JSON, not UTF-8, nested too deep
        raise BadRequest(f"the request body is not valid JSON: {printable(str(err))}") from err
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise RequestValidationError(err.errors(include_url=False, include_context=False)) from err


def openapi_with_400(app: FastAPI) -> dict:
    """The schema as the server answers: a request that fails validation gets 400, not 422; the
    bodies the routes read themselves (BODIES) are described as FastAPI describes its own."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in BODIES:
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                responses = operation.get("responses", {})
                if "422" in responses:
                    responses["400"] = {**responses.pop("422"), "description": "Invalid request"}
        app.openapi_schema = schema
    return app.openapi_schema


def add_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Every failure as an OpenAI-style error body."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        where = printable(".".join(loc))
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        if first.get("type") == "extra_forbidden":  # OpenAI's words for a field it does not know
            message = f"Unrecognized request argument supplied: {where}"
        metrics.request(request.url.path, 400)
        param = printable(loc[0]) if loc else None  # the request's field, as OpenAI names it
        return JSONResponse(error_body(printable(message), param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):  # 404, 405 (with its Allow header)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        metrics.request(request.url.path, exc.status_code)
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(BadRequest)
    async def _bad(request, exc: BadRequest):
        metrics.request(request.url.path, exc.status)
        body = error_body(exc.message, exc.kind, exc.param, exc.code)
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):  # a bug: logged, counted, and an OpenAI-style 500
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        metrics.request(request.url.path, 500)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)


def add_routes(app: FastAPI, service: Service) -> None:
    engine, metrics = service.engine, service.metrics

    @app.get("/health")
    async def health():
        """200 while the engine's loop comes round; 503 with the reason when its thread is not
        running or one cycle has taken too long."""
        state = {"model": service.name, "running": engine.running_rows, "queued": engine.queue_depth}
        trouble = engine.trouble()
        if trouble is None:
            return {"status": "ok", **state}
        metrics.request("/health", 503)
        return JSONResponse({"status": "unavailable", "reason": trouble, **state}, status_code=503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": now(), "owned_by": "twotower"}]}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        metrics.queue(engine.queue_depth, engine.running_rows)
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions", openapi_extra=body_schema(ChatRequest))
    async def chat(request: Request):
        body = await read_body(request, ChatRequest)
        service.check_model(body.model)
        if body.stream and body.n > 1:
            raise BadRequest("stream takes n = 1", param="n")
        ids = await asyncio.to_thread(service.encode_chat, body)  # a long chat does not stall the other requests
        jobs = service.submit(service.make_jobs(body, [ids], asyncio.get_running_loop()))
        rid, created = new_id("chatcmpl"), now()
        if body.stream:
            metrics.request(request.url.path, 200)
            stream = chat_stream(service, request, body, jobs[0], rid, created)
            return StreamingResponse(stream, media_type="text/event-stream")
        results = await service.collect_all(request, jobs)
        choices = [chat_choice(service, i, body, result) for i, result in enumerate(results)]
        metrics.request(request.url.path, 200)
        used = usage(len(ids), sum(info["completion_tokens"] for *_, info in results))
        own = stats(results[0][2]) if body.n == 1 else [stats(info) for *_, info in results]
        return service.envelope("chat.completion", rid, created, choices, usage=used, twotower=own)

    @app.post("/v1/completions", openapi_extra=body_schema(CompletionRequest))
    async def completions(request: Request):
        body = await read_body(request, CompletionRequest)
        service.check_model(body.model)
        texts = body.prompts
        if body.stream and len(texts) * body.n > 1:
            raise BadRequest("stream takes one prompt and n = 1", param="prompt" if len(texts) > 1 else "n")
        prompts = await asyncio.to_thread(lambda: [service.encode_prompt(p) for p in texts])  # off the event loop
        jobs = service.submit(service.make_jobs(body, prompts, asyncio.get_running_loop()))  # all checked first
        rid, created = new_id("cmpl"), now()
        if body.stream:
            metrics.request(request.url.path, 200)
            stream = text_stream(service, request, body, jobs, (texts[0], prompts[0]), rid, created)
            return StreamingResponse(stream, media_type="text/event-stream")
        results = await service.collect_all(request, jobs) if jobs else [("", [], SCORED)] * (len(prompts) * body.n)
        choices = []
        for i, result in enumerate(results):
            prompt = texts[i // body.n], prompts[i // body.n]
            choices.append(await completion_choice(service, i, body, prompt, result))
        metrics.request(request.url.path, 200)
        used = usage(sum(map(len, prompts)), sum(info["completion_tokens"] for *_, info in results))
        return service.envelope("text_completion", rid, created, choices, usage=used, twotower=[stats(i) for *_, i in results])

    @app.post("/tokenize", openapi_extra=body_schema(TokenizeRequest))
    async def tokenize(request: Request):
        body = await read_body(request, TokenizeRequest)
        service.check_model(body.model)
        if body.messages is not None:
            ids = await asyncio.to_thread(service.encode_chat, body)
        else:
            encode = lambda: service.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"]
            ids = await asyncio.to_thread(readable, encode, "prompt")
        metrics.request(request.url.path, 200)
        return {"tokens": ids, "count": len(ids), "max_model_len": service.model.max_context}

    @app.post("/detokenize", openapi_extra=body_schema(DetokenizeRequest))
    async def detokenize(request: Request):
        body = await read_body(request, DetokenizeRequest)
        service.check_model(body.model)
        service.check_ids(body.tokens, "tokens")
        text = await asyncio.to_thread(service.tokenizer.decode, body.tokens)
        metrics.request(request.url.path, 200)
        return {"prompt": text}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        tok = service.tokenizer
        return {
            "tokenizer_class": type(tok).__name__,
            **{name: getattr(tok, name) for name in ("eos_token", "bos_token", "pad_token", "unk_token")},
            "chat_template": getattr(tok, "chat_template", None),
            "model_max_length": service.model.max_context,
        }


SCORED = {"finish_reason": "length", "completion_tokens": 0}  # the info of a choice that only scores its prompt


def chat_choice(service: Service, index: int, body: ChatRequest, result) -> dict:
    text, entries, info = result
    logprobs = None if body.top is None else chat_logprobs(entries, service.text_of)
    message = {"role": "assistant", "content": text}
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": info["finish_reason"]}


async def completion_choice(service: Service, index: int, body: CompletionRequest, prompt, result) -> dict:
    """A completions choice: the prompt's text first with echo, and logprobs: the prompt's tokens'
    (echo; a teacher-forced pass over the prompt) and the reply's (the engine's)."""
    (text_or_ids, prompt_ids), (text, entries, info) = prompt, result
    prompt_text = text_or_ids if isinstance(text_or_ids, str) else service.tokenizer.decode(prompt_ids)
    logprobs = None
    if body.top is not None:
        shown = (await service.score(prompt_ids, body.top) if body.echo else []) + entries
        logprobs = completion_logprobs(shown, service.text_of, 0 if body.echo else len(prompt_text))
    shown_text = prompt_text + text if body.echo else text
    return {"index": index, "text": shown_text, "logprobs": logprobs, "finish_reason": info["finish_reason"]}


async def chat_stream(service: Service, request: Request, body: ChatRequest, job: Job, rid: str, created: int):
    """A chat reply as Server-Sent Events: a role chunk, content chunks (each with the logprobs of
    its tokens when asked), the finish chunk, usage."""

    def chunk(delta, finish=None, logprobs=None, **extra):
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return sse(service.envelope("chat.completion.chunk", rid, created, [choice], **extra))

    yield chunk({"role": "assistant", "content": ""})
    async for kind, value, *more in service.events(request, job, stream=True):
        if kind == "text":
            logprobs = None if body.top is None else chat_logprobs(more[0], service.text_of)
            yield chunk({"content": value}, logprobs=logprobs)
        elif kind == "done":
            service.metrics.finished(value)
            yield chunk({}, value["finish_reason"], twotower=stats(value))
            if body.stream_options and body.stream_options.include_usage:
                used = usage(value["prompt_tokens"], value["completion_tokens"])
                yield sse(service.envelope("chat.completion.chunk", rid, created, [], usage=used))
        else:
            yield sse(error_body(value, "server_error"))
    yield sse("[DONE]")


async def text_stream(service: Service, request: Request, body: CompletionRequest, jobs: list[Job], prompt, rid, created):
    """A completion as Server-Sent Events: the prompt with echo, text chunks (each with the
    logprobs of its tokens when asked), the finish chunk, usage."""
    text_or_ids, prompt_ids = prompt

    def piece(text, logprobs=None, finish=None):
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return sse(service.envelope("text_completion", rid, created, [choice]))

    prompt_text = text_or_ids if isinstance(text_or_ids, str) else service.tokenizer.decode(prompt_ids)
    if body.echo:
        entries = None if body.top is None else await service.score(prompt_ids, body.top)
        yield piece(prompt_text, None if entries is None else completion_logprobs(entries, service.text_of))
    info, written = None if jobs else SCORED, len(prompt_text)
    async for kind, value, *more in service.events(request, jobs[0], stream=True) if jobs else no_events():
        if kind == "text":
            logprobs = None if body.top is None else completion_logprobs(more[0], service.text_of, written)
            written += len(value)
            yield piece(value, logprobs)
        elif kind == "done":
            service.metrics.finished(value)
            info = value
        else:
            yield sse(error_body(value, "server_error"))
    if info is not None:
        yield piece("", finish=info["finish_reason"])
        if body.stream_options and body.stream_options.include_usage:
            used = usage(len(prompt_ids), info["completion_tokens"])
            yield sse(service.envelope("text_completion", rid, created, [], usage=used))
    yield sse("[DONE]")


async def no_events():
    """The events of a request that writes nothing (echo with max_tokens 0)."""
    return
    yield


def server_config(app: FastAPI, options: ServeOptions):
    """uvicorn's settings: the address, slow request headers closed, and the drain on SIGTERM
    (in-flight requests get --drain-seconds, then their tasks are cancelled, which cancels their
    jobs, and the engine stops)."""
    import uvicorn

    protocol = header_timeout_protocol(options.header_timeout)
    return uvicorn.Config(app, host=options.host, port=options.port, log_level="warning", http=protocol,
                          timeout_graceful_shutdown=options.drain_seconds)  # fmt: skip


def startup_line(service: Service, load: LoadOptions) -> str:
    """What `twotower serve` prints once it listens: where, which model, mode, dtype and weights."""
    o, model = service.options, service.model
    dtype = {torch_name: name for name, torch_name in DTYPES.items()}.get(str(model.dtype).removeprefix("torch."), model.dtype)
    compiled = ", compiled" if model.step_layers is not None else ""
    return (
        f"twotower: serving {service.name} on http://{o.host}:{o.port}/v1 (model {load.model}, mode {service.default_mode}, "
        f"dtype {dtype}, weights {model.weights}{compiled}); Ctrl-C or SIGTERM stops it after a drain of {o.drain_seconds:g} s"
    )


def serve(load: LoadOptions = LoadOptions(), options: ServeOptions = ServeOptions()) -> None:
    """Load the model and run the server until interrupted (`twotower serve`); with compiled
    passes, batch 1's are compiled before the first request."""
    import uvicorn

    from twotower.runtime import load_for_inference

    model, tokenizer = load_for_inference(load, options.mode)
    model.warm_steps((1,))  # wider batches compile on first use
    name = "twotower-" + ("smollm2-135m" if load.model in (None, "default") else str(load.model).rstrip("/").split("/")[-1])
    app = create_app(model, tokenizer, name, options)
    print(startup_line(app.state.service, load), flush=True)
    uvicorn.Server(server_config(app, options)).run()
