"""The HTTP side of ``edgemoe serve``: a Starlette app over one ``Scheduler``.

Routes follow OpenAI's API and llama-server's conventions: ``/v1/chat/
completions`` and ``/v1/completions`` (server-sent events with ``stream``),
``/v1/models``, ``/health`` and Prometheus ``/metrics``. Every error is
OpenAI's JSON, never a traceback; with an API key, everything but
``/health`` needs ``Authorization: Bearer KEY``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

from edgemoe.errors import ConfigError, ContextOverflowError
from edgemoe.runtime.scheduler import QueueFull, Scheduler
from edgemoe.runtime.scheduler import Request as Job
from edgemoe.serve import openai_api as api
from edgemoe.serve.metrics import prometheus_text

POLL_S = 0.25
"""How often a non-streamed request checks that its client is still there."""


@dataclass(frozen=True)
class ServeOptions:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    """Larger request bodies get 413 before they are read whole."""


def _error(e: api.ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status == 503 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def create_app(model, scheduler: Scheduler, options: ServeOptions) -> Starlette:
    async def body_of(request: Request):
        size = request.headers.get("content-length")
        limit = options.max_body_bytes
        if size is not None and size.isdigit() and int(size) > limit:
            raise api.ApiError(413, f"the request body is over {limit} bytes")
        chunks, n = [], 0
        try:
            async for chunk in request.stream():
                n += len(chunk)
                if n > limit:
                    raise api.ApiError(413, f"the request body is over {limit} bytes")
                chunks.append(chunk)
        except ClientDisconnect:
            raise api.ApiError(400, "the client went away") from None
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise api.ApiError(
                400, f"the request body is not valid JSON: {e}"
            ) from None

    def authorize(request: Request) -> None:
        if options.api_key is None:
            return
        got = request.headers.get("authorization", "")
        want = f"Bearer {options.api_key}"
        if not hmac.compare_digest(got.encode(), want.encode()):
            raise api.ApiError(
                401,
                "missing or wrong API key (Authorization: Bearer KEY)",
                kind="invalid_request_error",
                code="invalid_api_key",
            )

    async def start(parsed: api.Parsed):
        """Tokenize (the chat template, in its sandbox), queue; returns the
        job's handle and the asyncio queue its events arrive on."""
        from edgemoe.runtime.engine import prompt_ids

        try:
            ids = await run_in_threadpool(prompt_ids, model, parsed.prompt)
        except ConfigError as e:
            raise api.ApiError(400, str(e), "messages") from None
        params = parsed.params
        if not parsed.max_tokens_given:  # until the request's context is full
            left = scheduler.slot_ctx - len(ids)
            params = dataclasses.replace(params, max_tokens=max(left, 1))
        job = Job(tuple(ids), params, parsed.quality)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        try:
            handle = scheduler.submit(
                job, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)
            )
        except QueueFull as e:
            raise api.ApiError(503, f"server busy: {e}", kind="server_error") from None
        except ContextOverflowError as e:
            raise api.ApiError(
                400, str(e), "max_tokens", code="context_length_exceeded"
            ) from None
        except ConfigError as e:
            param = "quality" if "quality" in str(e) else None
            raise api.ApiError(400, str(e), param) from None
        return handle, events

    async def completions(request: Request, chat: bool) -> Response:
        authorize(request)
        body = await body_of(request)
        parse = api.parse_chat if chat else api.parse_completion
        parsed = parse(body, scheduler.slot_ctx)
        handle, events = await start(parsed)
        rid = api.new_id("chatcmpl" if chat else "cmpl")
        name = options.model_name
        if parsed.stream:
            return StreamingResponse(
                _sse(handle, events, rid, name, chat, parsed.include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        text, last = [], None
        try:
            while last is None:
                try:
                    ev = await asyncio.wait_for(events.get(), POLL_S)
                except TimeoutError:
                    if await request.is_disconnected():
                        handle.cancel()
                        return Response(status_code=499)
                    continue
                text.append(ev.text)
                if ev.finish_reason:
                    last = ev
        except asyncio.CancelledError:
            handle.cancel()
            raise
        if last.finish_reason == "error":
            raise api.ApiError(
                500, last.error or "generation failed", kind="server_error"
            )
        make = api.chat_response if chat else api.completion_response
        return JSONResponse(
            make(rid, name, "".join(text), last.finish_reason, last.prompt_tokens,
                 last.completion_tokens, last.cached_tokens)
        )  # fmt: skip

    async def chat_completions(request: Request) -> Response:
        return await completions(request, chat=True)

    async def text_completions(request: Request) -> Response:
        return await completions(request, chat=False)

    async def models(request: Request) -> Response:
        authorize(request)
        from pathlib import Path

        path = Path(model.path)
        created = int(path.stat().st_mtime) if path.exists() else 0
        entry = {"id": options.model_name, "object": "model", "created": created,
                 "owned_by": "edgemoe"}  # fmt: skip
        return JSONResponse({"object": "list", "data": [entry]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def metrics(request: Request) -> Response:
        authorize(request)
        text = prometheus_text(scheduler, model.levels)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def on_api_error(request: Request, e: api.ApiError) -> Response:
        return _error(e)

    async def on_http_error(request: Request, e: HTTPException) -> Response:
        return _error(api.ApiError(e.status_code, str(e.detail)))

    async def on_error(request: Request, e: Exception) -> Response:
        # The server's log gets the traceback (uvicorn prints it), never the client.
        return _error(api.ApiError(500, "internal server error", kind="server_error"))

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", text_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        exception_handlers={
            api.ApiError: on_api_error,
            HTTPException: on_http_error,
            Exception: on_error,
        },
    )


async def _sse(handle, events, rid, name, chat, include_usage) -> AsyncIterator[str]:
    """Server-sent events: chunks, then ``data: [DONE]``. A client that goes
    away cancels this generator (Starlette), which cancels the request."""

    def data(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    done = False
    try:
        if chat:
            yield data(api.chat_chunk(rid, name, {"role": "assistant", "content": ""}))
        while True:
            ev = await events.get()
            if ev.finish_reason == "error":
                done = True
                err = api.ApiError(
                    500, ev.error or "generation failed", kind="server_error"
                )
                yield data(err.body())
                break
            if ev.text:
                chunk = (
                    api.chat_chunk(rid, name, {"content": ev.text})
                    if chat
                    else api.completion_chunk(rid, name, ev.text)
                )
                yield data(chunk)
            if ev.finish_reason:
                done = True
                yield data(
                    api.chat_chunk(rid, name, {}, ev.finish_reason)
                    if chat
                    else api.completion_chunk(rid, name, "", ev.finish_reason)
                )
                if include_usage:
                    kind = "chat.completion.chunk" if chat else "text_completion"
                    yield data(
                        api.usage_chunk(rid, name, kind, ev.prompt_tokens,
                                        ev.completion_tokens, ev.cached_tokens)
                    )  # fmt: skip
                break
        yield "data: [DONE]\n\n"
    finally:
        if not done:
            handle.cancel()
