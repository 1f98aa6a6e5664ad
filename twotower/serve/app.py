"""`twotower serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the engine.

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models   GET /health   GET /metrics

Every malformed request gets a 4xx with an OpenAI-style JSON error (a prompt longer than the
context is a 400, a full queue a 429), never a 500 or a dead server. Streaming is Server-Sent
Events as tokens commit; a client that goes away cancels its request and frees its row.
"""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from twotower.config import BLOCK_MODES, TwoTowerError
from twotower.generate.common import resolve_settings
from twotower.serve.engine import Engine, Job, QueueFull
from twotower.serve.metrics import Metrics
from twotower.serve.protocol import ChatRequest, CompletionRequest, error_body, new_id, now, usage

DEFAULT_MAX_TOKENS = 256


class Channel:
    """Events from the engine's thread to one request's coroutine."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.items = loop, asyncio.Queue()

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.items.put_nowait, item)

    async def get(self, timeout: float):
        return await asyncio.wait_for(self.items.get(), timeout)


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.kind = message, status, param, kind


def create_app(
    model,
    tokenizer,
    model_name: str = "twotower",
    mode: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    request_timeout: float = 300.0,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
) -> FastAPI:
    """The app over a loaded model. mode: the default mode (verify when the denoiser is trained,
    else ar); default_max_tokens: a request's limit when it names none (never past the context)."""
    trained = bool(model.config.trained_tokens)
    default_mode = mode or ("verify" if trained else "ar")
    metrics = Metrics()
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue, metrics=metrics)

    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="twotower", version="0.1.0", lifespan=lifespan)
    app.state.engine, app.state.metrics = engine, metrics

    # ------------------------------------------------------------------ errors
    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        metrics.request(request.url.path, 400)
        return JSONResponse(error_body(message, param=where or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(BadRequest)
    async def _bad(request, exc: BadRequest):
        metrics.request(request.url.path, exc.status)
        return JSONResponse(error_body(exc.message, exc.kind, exc.param), status_code=exc.status)

    # ------------------------------------------------------------------ jobs
    def make_job(body, prompt_ids: list[int], loop) -> Job:
        request_mode = body.mode or default_mode
        if request_mode == "diffusion" and not trained:
            raise BadRequest(f"no trained denoiser for {model_name}: use mode ar or verify (lossless)", param="mode")
        if request_mode not in BLOCK_MODES and (body.threshold is not None or body.block_size is not None):
            raise BadRequest(f"threshold and block_size apply to diffusion and verify, not {request_mode}", param="mode")
        room = model.max_context - len(prompt_ids)
        if room <= 0:
            raise BadRequest(
                f"the prompt has {len(prompt_ids)} tokens, longer than the model's context ({model.max_context})",
                param="messages" if isinstance(body, ChatRequest) else "prompt",
                kind="invalid_request_error",
            )
        limit = body.limit
        if limit is not None and limit > room:
            raise BadRequest(
                f"max_tokens {limit} and the prompt's {len(prompt_ids)} tokens exceed the context of "
                f"{model.max_context} tokens; ask for at most {room}",
                param="max_tokens",
            )
        options = {
            "max_new_tokens": limit or min(default_max_tokens, room),
            "temperature": body.temperature,
            "top_p": body.top_p,
            "seed": body.seed if body.temperature > 0 else None,
        }
        if request_mode in BLOCK_MODES:
            options.update(block_size=body.block_size)
            if body.threshold is not None:
                options["threshold"] = body.threshold
        try:
            resolve_settings(model, request_mode, dict(options))
        except TwoTowerError as err:
            raise BadRequest(str(err)) from err
        draft = {"draft": body.draft} if request_mode == "verify" and body.draft else {}
        if body.draft and request_mode != "verify":
            raise BadRequest("draft applies to verify mode only", param="draft")
        return Job(
            prompt_ids, request_mode, options, draft, stop=list(body.stop or []), timeout=request_timeout, events=Channel(loop)
        )

    def submit(job: Job) -> Job:
        try:
            engine.submit(job)
        except QueueFull as err:
            raise BadRequest(str(err), status=429, kind="rate_limit_error") from err
        metrics.queue(engine.queue_depth, engine.running_rows)
        return job

    async def events(request: Request, job: Job):
        """The job's events; a client that goes away cancels it."""
        while True:
            try:
                item = await job.events.get(timeout=1.0)
            except TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    return
                continue
            yield item
            if item[0] in ("done", "error"):
                return

    def encode_chat(body: ChatRequest) -> list[int]:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        return tokenizer("\n".join(m["content"] for m in messages))["input_ids"]

    def encode_text(prompt: str) -> list[int]:
        ids = tokenizer(prompt)["input_ids"]
        if not ids:
            raise BadRequest("the prompt is empty", param="prompt")
        return ids

    async def collect(request: Request, job: Job) -> tuple[str, dict]:
        parts, info = [], None
        async for kind, value in events(request, job):
            if kind == "text":
                parts.append(value)
            elif kind == "done":
                info = value
            else:
                raise BadRequest(
                    value,
                    status=400 if not value.startswith("internal error") else 500,
                    kind="invalid_request_error" if not value.startswith("internal") else "server_error",
                )
        if info is None:  # the client went away
            raise BadRequest("the client disconnected", status=499)
        return "".join(parts), info

    def stats(info: dict) -> dict:
        return {k: info[k] for k in ("mode", "passes", "tokens_per_pass", "seconds", "time_to_first_token")}

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "running": engine.running_rows, "queued": engine.queue_depth}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": now(), "owned_by": "twotower"}]}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        metrics.queue(engine.queue_depth, engine.running_rows)
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        loop = asyncio.get_running_loop()
        job = submit(make_job(body, encode_chat(body), loop))
        rid, created = new_id("chatcmpl"), now()
        if not body.stream:
            text, info = await collect(request, job)
            metrics.finished(info)
            metrics.request(request.url.path, 200)
            return {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": model_name,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": info["finish_reason"]}
                ],
                "usage": usage(info["prompt_tokens"], info["completion_tokens"]),
                "twotower": stats(info),
            }

        def chunk(delta: dict, finish=None, extra=None) -> str:
            body_ = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return "data: " + json.dumps({**body_, **(extra or {})}) + "\n\n"

        async def sse():
            yield chunk({"role": "assistant", "content": ""})
            async for kind, value in events(request, job):
                if kind == "text":
                    yield chunk({"content": value})
                elif kind == "done":
                    metrics.finished(value)
                    yield chunk({}, value["finish_reason"], {"twotower": stats(value)})
                    if body.stream_options and body.stream_options.include_usage:
                        yield (
                            "data: "
                            + json.dumps(
                                {
                                    "id": rid,
                                    "object": "chat.completion.chunk",
                                    "created": created,
                                    "model": model_name,
                                    "choices": [],
                                    "usage": usage(value["prompt_tokens"], value["completion_tokens"]),
                                }
                            )
                            + "\n\n"
                        )
                else:
                    yield f"data: {json.dumps(error_body(value, 'server_error'))}\n\n"
            yield "data: [DONE]\n\n"

        metrics.request(request.url.path, 200)
        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        loop = asyncio.get_running_loop()
        jobs = [submit(make_job(body, encode_text(p), loop)) for p in body.prompts]
        rid, created = new_id("cmpl"), now()
        if not body.stream:
            results = [await collect(request, job) for job in jobs]
            for _, info in results:
                metrics.finished(info)
            metrics.request(request.url.path, 200)
            choices = [
                {"index": i, "text": text, "logprobs": None, "finish_reason": info["finish_reason"]}
                for i, (text, info) in enumerate(results)
            ]
            total = usage(sum(i["prompt_tokens"] for _, i in results), sum(i["completion_tokens"] for _, i in results))
            return {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": model_name,
                "choices": choices,
                "usage": total,
                "twotower": [stats(i) for _, i in results],
            }
        if len(jobs) > 1:
            for job in jobs:
                job.cancel()
            raise BadRequest("stream takes one prompt", param="prompt")
        job = jobs[0]

        async def sse():
            async for kind, value in events(request, job):
                if kind == "text":
                    piece = {"index": 0, "text": value, "logprobs": None, "finish_reason": None}
                elif kind == "done":
                    metrics.finished(value)
                    piece = {"index": 0, "text": "", "logprobs": None, "finish_reason": value["finish_reason"]}
                else:
                    yield f"data: {json.dumps(error_body(value, 'server_error'))}\n\n"
                    continue
                out = {"id": rid, "object": "text_completion", "created": created, "model": model_name, "choices": [piece]}
                yield f"data: {json.dumps(out)}\n\n"
                if kind == "done" and body.stream_options and body.stream_options.include_usage:
                    out = {
                        "id": rid,
                        "object": "text_completion",
                        "created": created,
                        "model": model_name,
                        "choices": [],
                        "usage": usage(value["prompt_tokens"], value["completion_tokens"]),
                    }
                    yield f"data: {json.dumps(out)}\n\n"
            yield "data: [DONE]\n\n"

        metrics.request(request.url.path, 200)
        return StreamingResponse(sse(), media_type="text/event-stream")

    app.state.started = time.time()
    return app


def serve(
    model_ref: str = "default",
    host: str = "127.0.0.1",
    port: int = 8000,
    mode: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    request_timeout: float = 300.0,
    dtype=None,
    weights: str = "dense",
    compile_steps: bool = False,
) -> None:
    """Load the model and run the server until interrupted (`twotower serve`); weights: dense,
    or int8 / int4 weight-only linear layers (CPU); compile_steps: the context passes decoding
    repeats compiled (`TwoTowerForCausalLM.compile_steps`), batch 1's before the first request."""
    import torch
    import uvicorn

    from twotower.model.checkpoint import load_model

    model, tokenizer = load_model(
        model_ref, dtype=dtype or torch.bfloat16, weights=weights, merge=True, compile_steps=compile_steps
    )
    model.warm_steps((1,))  # wider batches compile on first use
    name = "twotower-" + ("smollm2-135m" if model_ref in (None, "default") else str(model_ref).rstrip("/").split("/")[-1])
    app = create_app(model, tokenizer, name, mode, max_batch, max_queue, request_timeout)
    uvicorn.run(app, host=host, port=port, log_level="warning")
