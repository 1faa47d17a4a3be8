"""The OpenAI-compatible HTTP API (FastAPI): /v1/completions, /v1/chat/completions (streamed as
server-sent events or whole), /v1/models, /health, /metrics, and over tp-workers POST /admin/rejoin.

Every request is checked here, before it reaches the engine loop: a rejected one never costs
a step. Errors are OpenAI's shape with the right status (400 for any invalid parameter, never
FastAPI's 422; 401, 404, 413, 429 with Retry-After, 503). A client that goes away, streaming or
not, has its request aborted on every rank at the next step.

The state outlives a group generation (serve over tp-workers): while the group is formed again
after a lost worker, /health answers 503 with what happened ({"status": "re-forming", "lost":
[...]}) and a generation request 503 with Retry-After; once serving again with fewer ranks,
/health is 200 with {"status": "degraded", "tp": ..., "lost": [...]}.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError

from tp_runtime.engine.sampling import SamplingParams
from tp_runtime.engine.scheduler import Request
from tp_runtime.errors import TPRuntimeError
from tp_runtime.serve import protocol as P
from tp_runtime.serve.engine_loop import Leader, Stream
from tp_runtime.serve.metrics import ServeMetrics
from tp_runtime.serve.text import TextStream


@dataclass
class ServeState:
    model_name: str
    llm: Any = None  # these three once the model is loaded (ready)
    leader: Leader | None = None
    metrics: ServeMetrics | None = None
    max_model_len: int = 0
    api_key: str | None = None
    max_body_bytes: int = 4 << 20
    ready: bool = False
    tp: int = 0  # the serving group's size, and the size it was started at
    full_tp: int = 0
    lost: tuple[str, ...] = ()  # workers of --workers not in the group now
    reforming: str | None = None  # while the group is formed again: why
    rejoin: Any = None  # over tp-workers: a call that has the next re-form try every worker again


RETRY_AFTER_S = 5  # a request that arrives while the group is formed again


def _err(e: P.APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class _Guard:
    """The API key and the body-size limit, before any route. Plain ASGI (not FastAPI's
    http middleware, whose wrapped receive hides a client's disconnect from the handlers)."""

    def __init__(self, app, state: ServeState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            key = self.state.api_key
            if key and scope["path"] != "/health" and headers.get(b"authorization", b"") != f"Bearer {key}".encode():
                e = P.APIError(401, "a valid API key is required (Authorization: Bearer KEY)", "authentication_error", code="invalid_api_key")
                return await _err(e)(scope, receive, send)
            length = headers.get(b"content-length", b"")
            if length.isdigit() and int(length) > self.state.max_body_bytes:
                e = P.APIError(413, f"the request body has {int(length)} bytes; the limit is {self.state.max_body_bytes}", code="request_too_large")
                return await _err(e)(scope, receive, send)
        await self.app(scope, receive, send)


def build_app(state: ServeState) -> FastAPI:
    app = FastAPI(title="tp-runtime", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Guard, state=state)

    @app.exception_handler(404)
    async def not_found(request: HTTPRequest, exc):
        return _err(P.APIError(404, f"no route {request.method} {request.url.path}", "not_found_error"))

    @app.exception_handler(405)
    async def bad_method(request: HTTPRequest, exc):
        return _err(P.APIError(405, f"{request.method} is not allowed on {request.url.path}", "invalid_request_error"))

    @app.get("/health")
    async def health():
        if state.reforming is not None:
            body = {**P.error_body(f"degraded: re-forming the group ({state.reforming})", "server_error"),
                    "status": "re-forming", "lost": list(state.lost), "tp": state.tp, "full_tp": state.full_tp}
            return JSONResponse(body, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
        if state.leader is not None and state.leader.failed:
            return JSONResponse(P.error_body(f"the engine failed: {state.leader.failed}", "server_error"), status_code=503)
        if not state.ready:
            return JSONResponse(P.error_body("the model is loading", "server_error"), status_code=503)
        if state.lost:
            return JSONResponse({"status": "degraded", "lost": list(state.lost), "tp": state.tp, "full_tp": state.full_tp})
        return Response(status_code=200)

    @app.post("/admin/rejoin")
    async def rejoin():
        # behind the API key when one is set (_Guard): only /health is open
        if state.rejoin is None:
            return _err(P.APIError(400, "rejoin applies to a server over tp-workers (--workers)", "invalid_request_error"))
        return JSONResponse({"status": "scheduled", "detail": state.rejoin()}, status_code=202)

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if state.metrics is None:
            return _err(P.APIError(503, "the model is loading", "server_error"))
        return PlainTextResponse(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        if not state.ready:
            return _err(P.APIError(503, "the model is loading", "server_error"))
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": int(time.time()), "owned_by": "tp-runtime",
                                            "max_model_len": state.max_model_len}]}

    async def generation(request: HTTPRequest, model: type, prompt_ids, chat: bool):
        try:
            body = await _body(request, model, state)
            return await _respond(state, request, body, prompt_ids(state, body), chat)
        except P.APIError as e:
            return _err(e)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await generation(request, P.CompletionRequest, _prompt_ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        return await generation(request, P.ChatRequest, _chat_ids, chat=True)

    return app


# ---- requests -----------------------------------------------------------------------------


async def _body(request: HTTPRequest, model: type, state: ServeState):
    if state.reforming is not None:
        raise P.APIError(503, f"the server is re-forming its group ({state.reforming}); retry shortly", "server_error",
                         headers={"Retry-After": str(RETRY_AFTER_S)})
    if not state.ready:
        raise P.APIError(503, "the model is loading", "server_error")
    if state.leader.failed:
        raise P.APIError(503, f"the engine failed: {state.leader.failed}", "server_error")
    raw = await request.body()
    if len(raw) > state.max_body_bytes:
        raise P.APIError(413, f"the request body has {len(raw)} bytes; the limit is {state.max_body_bytes}", code="request_too_large")
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise P.APIError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise P.APIError(400, "the body must be a JSON object")
    try:
        body = model.model_validate(obj)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())) or None
        raise P.APIError(400, f"{where or 'body'}: {first.get('msg')}", param=where) from None
    except RecursionError:
        raise P.APIError(400, "the body is nested too deeply") from None
    if body.model is not None and body.model != state.model_name:
        raise P.APIError(404, f"The model `{body.model}` does not exist; this server serves `{state.model_name}`", "not_found_error", "model", "model_not_found")
    for name, bad, why in (("n", body.n != 1, "only n=1 is supported"), ("logprobs", body.logprobs not in (None, False, 0), "logprobs are not supported"),
                           ("presence_penalty", body.presence_penalty != 0, "penalties are not supported"),
                           ("frequency_penalty", body.frequency_penalty != 0, "penalties are not supported"),
                           ("echo", getattr(body, "echo", False), "echo is not supported")):
        if bad:
            raise P.APIError(400, why, param=name)
    return body


def _prompt_ids(state: ServeState, body: P.CompletionRequest) -> list[int]:
    from tp_runtime.checkpoint.tokenizer import encode_prompt

    prompt = body.prompt
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise P.APIError(400, f"one prompt per request (got {len(prompt)}); send them as separate requests", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise P.APIError(400, "the prompt is empty", param="prompt")
        try:
            return encode_prompt(state.llm.tokenizer, prompt)
        except TPRuntimeError as e:
            raise P.APIError(400, str(e), param="prompt") from None
    ids = list(prompt)
    if not ids:
        raise P.APIError(400, "the prompt is empty", param="prompt")
    vocab = state.llm.cfg.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise P.APIError(400, f"prompt token ids outside the vocabulary [0, {vocab}): {bad[:5]}", param="prompt")
    return ids


def _chat_ids(state: ServeState, body: P.ChatRequest) -> list[int]:
    if not state.llm.chat_template:
        raise P.APIError(400, "this model has no chat template: use /v1/completions", param="messages")
    messages = []
    for m in body.messages:
        content = m.content
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise P.APIError(400, f"message content parts of type {part.get('type')!r} are not supported (text only)", param="messages")
                parts.append(part["text"])
            content = "".join(parts)
        messages.append({**(m.model_extra or {}), "role": m.role, "content": content if content is not None else ""})
    try:
        return state.llm.chat_ids(messages)
    except TPRuntimeError as e:
        raise P.APIError(400, str(e), param="messages") from None


def _params(state: ServeState, body, n_prompt: int, chat: bool) -> SamplingParams:
    param = "messages" if chat else "prompt"
    room = state.max_model_len - n_prompt
    if room < 1:
        raise P.APIError(400, f"This model's maximum context length is {state.max_model_len} tokens. However, your prompt has {n_prompt} tokens, "
                              "which leaves no room for an answer", param=param, code="context_length_exceeded")
    asked = (body.max_completion_tokens if chat else None) or body.max_tokens
    if asked is not None and asked > room:
        raise P.APIError(400, f"This model's maximum context length is {state.max_model_len} tokens. However, you requested {n_prompt + asked} tokens "
                              f"({n_prompt} in the {param}, {asked} in the completion)", param="max_tokens", code="context_length_exceeded")
    stop_ids = body.stop_token_ids or []
    vocab = state.llm.cfg.vocab_size
    if any(not 0 <= t < vocab for t in stop_ids):
        raise P.APIError(400, f"stop_token_ids outside the vocabulary [0, {vocab})", param="stop_token_ids")
    try:
        return SamplingParams(
            max_new_tokens=asked or room,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_k=max(0, body.top_k or 0),
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=secrets.randbits(62) if body.seed is None else body.seed & ((1 << 63) - 1),
            ignore_eos=body.ignore_eos,
            stop_token_ids=tuple(stop_ids),
        )
    except TPRuntimeError as e:
        raise P.APIError(400, str(e)) from None


# ---- running one ---------------------------------------------------------------------------


async def _tokens(state: ServeState, request: HTTPRequest, ids: list[int], params: SamplingParams, stops: list[str], counts: dict) -> AsyncIterator[tuple[str, str | None]]:
    """(text delta, finish reason or None) as the engine produces them; the request is aborted
    on every rank if this generator is closed early (the client went away)."""
    leader, m = state.leader, state.metrics
    req_id = leader.new_id()
    stream = Stream(Request(req_id, ids, params, params.seed), asyncio.get_running_loop())
    text = TextStream(state.llm.tokenizer, stops)
    leader.submit(stream)
    done = False
    last = None
    labels = (state.model_name,)

    def finished(reason: str, now: float) -> None:
        m.e2e.labels(*labels).observe(now - stream.arrived)
        m.success.labels(*labels, reason).inc()
        m.prompt_tokens.labels(*labels).inc(len(ids))

    try:
        while True:
            item = await stream.events.get()
            now = time.perf_counter()
            if isinstance(item, tuple):
                _, reason, error = item
                if reason == "unavailable":  # the loop had ended before taking it (a lost worker, a re-form)
                    done = True
                    raise P.APIError(503, f"the server could not take this request: {error}; retry shortly", "server_error",
                                     headers={"Retry-After": str(RETRY_AFTER_S)})
                if error is not None:
                    raise P.APIError(500, f"the engine failed while serving this request: {error}", "server_error")
                done = True
                finished(reason, now)
                yield text.finish(), reason
                return
            counts["completion"] += 1
            m.generation_tokens.labels(*labels).inc()
            if last is None:
                m.ttft.labels(*labels).observe(now - stream.arrived)
                if stream.admitted is not None:
                    m.queue.labels(*labels).observe(max(0.0, stream.admitted - stream.arrived))
            else:
                m.itl.labels(*labels).observe(now - last)
            last = now
            delta = text.push(item.token_id)
            if text.stopped:  # a stop string: the engine need not go on
                done = True
                leader.abort(req_id)
                finished("stop", now)
                yield delta, "stop"
                return
            if delta:
                yield delta, None
    finally:
        if not done:  # the client went away (or the loop failed): free the slot on every rank
            leader.abort(req_id)
            m.success.labels(*labels, "abort").inc()


async def _respond(state: ServeState, request: HTTPRequest, body, ids: list[int], chat: bool):
    params = _params(state, body, len(ids), chat)
    if state.leader.queue_full():  # before any work: a rejected request never reaches the ranks
        raise P.APIError(429, f"the server's queue is full ({state.leader.max_queue} requests waiting, --max-queue); retry later", "rate_limit_error",
                         headers={"Retry-After": "1"})
    counts = {"completion": 0}
    rid = P.new_id("chatcmpl" if chat else "cmpl")
    name = state.model_name
    gen = _tokens(state, request, ids, params, body.stop_strings(), counts)
    if not body.stream:
        return await _whole(state, request, gen, rid, ids, counts, chat)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events():
        try:
            if chat:
                yield _sse(P.chat_chunk(rid, name, {"role": "assistant", "content": ""}, None))
            item = await _next(gen)
            while item is not None:
                delta, finish = item
                if delta or finish:
                    out_finish = "stop" if finish == "abort" else finish
                    if chat:
                        yield _sse(P.chat_chunk(rid, name, {"content": delta} if delta else {}, out_finish))
                    else:
                        yield _sse(P.completion_chunk(rid, name, delta, out_finish))
                if finish:
                    break
                item = await _next(gen)
            if include_usage:
                yield _sse(P.usage_chunk(rid, name, "chat.completion.chunk" if chat else "text_completion", len(ids), counts["completion"]))
        except P.APIError as e:
            yield _sse(e.body())
        finally:
            await gen.aclose()
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _next(gen):
    try:
        return await gen.__anext__()
    except StopAsyncIteration:
        return None


async def _whole(state: ServeState, request: HTTPRequest, gen, rid: str, ids: list[int], counts: dict, chat: bool):
    """Collect the whole answer, watching for the client going away meanwhile."""
    parts, finish = [], None
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        while True:
            nxt = asyncio.ensure_future(_next(gen))
            done, _ = await asyncio.wait({nxt, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if watcher in done:  # the client left: abort (closing gen does) and answer no one
                nxt.cancel()
                return Response(status_code=499)
            item = nxt.result()
            if item is None:
                break
            delta, finish = item
            parts.append(delta)
            if finish:
                break
    finally:
        watcher.cancel()
        await gen.aclose()
    finish = "stop" if finish in (None, "abort") else finish
    text = "".join(parts)
    build = P.chat_completion if chat else P.completion
    return build(rid, state.model_name, text, finish, len(ids), counts["completion"])


async def _disconnected(request: HTTPRequest) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.1)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"
