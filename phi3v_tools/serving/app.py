"""The OpenAI-compatible HTTP app over one backend: ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /health`` and ``GET /metrics`` (:mod:`phi3v_tools.serving.metrics`), as a Starlette app (Starlette and
uvicorn come with the ``mcp`` extra, whose server this app will share a process with; FastAPI's OpenAPI page
would add a dependency for a documentation page that the OpenAI API reference already is).

- A request is validated (:mod:`phi3v_tools.serving.protocol`), its images loaded and checked off the event
  loop, and it goes to the backend, which batches it with every other caller's.
- Streaming is server-sent events, as OpenAI and vLLM send them: a first chunk with the role, one chunk per
  piece of text, a last one with ``finish_reason``, the usage when ``stream_options.include_usage`` is set,
  then ``data: [DONE]``. The response starts with the first piece, so a request refused at once (a full
  queue, a prompt too long) still gets its status code. A client that goes away cancels its generation,
  which leaves the batch at the next step.
- Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for a request that
  cannot run (naming the field), 404 for another model's name, 429 with ``Retry-After`` when the queue is
  full, 504 on a timeout, 503 while the engine is not serving, 500 for a failure of ours (no traceback).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from phi3v_tools.engine.types import Backend, GenerationRequest, GenerationResult
from phi3v_tools.errors import (
    BusyError,
    CancelledError,
    GenerationError,
    ImageError,
    OutOfMemoryError,
    Phi3VToolsError,
    PromptError,
    RequestTimeoutError,
)
from phi3v_tools.images import ImagePolicy
from phi3v_tools.serving.metrics import metrics_or_none, missing
from phi3v_tools.serving.protocol import (
    ChatCompletionRequest,
    ProtocolError,
    chunk_body,
    completion_body,
    completion_id,
    error_body,
    to_generation_request,
)

__all__ = ["OpenAIServer", "error_response"]

logger = logging.getLogger("phi3v_tools.serving")

RETRY_AFTER_S = 1  # what a 429 tells the client to wait


class OpenAIServer:
    """The routes over ``backend`` (or a factory for it, called once, off the event loop)."""

    def __init__(
        self,
        backend: Backend | Callable[[], Backend],
        policy: ImagePolicy,
        model_name: str,
        *,
        default_max_tokens: int = 512,
        max_context: int | None = None,
        max_images: int = 8,
    ) -> None:
        self._backend = backend
        self.policy = policy
        self.model_name = model_name
        self.default_max_tokens = default_max_tokens
        self.max_context = max_context
        self.max_images = max_images
        self.created = int(time.time())
        self._lock = asyncio.Lock()
        self.metrics = metrics_or_none(self._engine_info)

    @property
    def _loaded(self) -> bool:
        """Whether the backend is there (not still a factory)."""
        return hasattr(self._backend, "generate")

    def _engine_info(self) -> dict[str, Any] | None:
        """The engine's numbers for /metrics (None until it is loaded, or for a backend without ``info()``)."""
        info = getattr(self._backend, "info", None) if self._loaded else None
        return info() if callable(info) else None

    async def backend(self) -> Backend:
        if not self._loaded:
            async with self._lock:
                if not self._loaded:
                    self._backend = await asyncio.to_thread(self._backend)  # type: ignore[arg-type]
        return self._backend  # type: ignore[return-value]

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/metrics", self.prometheus, methods=["GET"]),
            ]
        )

    # -- routes -------------------------------------------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        model: dict[str, Any] = {"id": self.model_name, "object": "model", "created": self.created}
        model["owned_by"] = "phi3v-tools"
        if self.max_context is not None:
            model["max_model_len"] = self.max_context  # as vLLM lists it
        return JSONResponse({"object": "list", "data": [model]})

    async def health(self, request: Request) -> Response:
        """200 only while the engine serves (loaded, not closing)."""
        if not self._loaded:
            return JSONResponse({"status": "loading"}, status_code=503)
        if getattr(self._backend, "closed", False):
            return JSONResponse({"status": "closed"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def prometheus(self, request: Request) -> Response:
        if self.metrics is None:
            return _error(str(missing()), "NotImplementedError", 501)
        body, content_type = await asyncio.to_thread(self.metrics.exposition, request.headers.get("accept"))
        return Response(body, headers={"Content-Type": content_type})

    async def chat_completions(self, request: Request) -> Response:
        started = time.perf_counter()
        try:
            response = await self._chat_completions(request, started)
        except Exception:  # a bug of ours: the OpenAI shape, no traceback (it goes to the log)
            logger.exception("a chat completion failed")
            response = _error("the server failed to answer this request", "InternalServerError", 500)
        if self.metrics is not None and isinstance(response, JSONResponse) and response.status_code >= 400:
            self.metrics.failed(json.loads(bytes(response.body))["error"]["type"])
        elif self.metrics is not None and response.status_code == 499:
            self.metrics.failed("ClientDisconnected")
        return response

    def _answered(self, result: GenerationResult, stream: bool, started: float) -> None:
        if self.metrics is not None:
            self.metrics.answered(result, stream=stream, seconds=time.perf_counter() - started)

    async def _chat_completions(self, request: Request, started: float) -> Response:
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":  # also keeps a web page's form or text/plain POST (no preflight) out
            return _error("send the request as JSON (Content-Type: application/json)", "BadRequestError", 415)
        try:
            body = _parse(await request.body())
            if body.model is not None and body.model != self.model_name:
                return _error(
                    f"the model {body.model!r} does not exist; this server serves {self.model_name!r} (GET /v1/models)",
                    "NotFoundError",
                    404,
                    "model",
                )
            generation, _images = await asyncio.to_thread(
                to_generation_request, body, self.policy, self.default_max_tokens, self.max_images
            )
            backend = await self.backend()
            if not body.stream:
                task = asyncio.ensure_future(backend.generate(generation))
                if not await _unless_client_leaves(request, task):
                    return Response(status_code=499)  # nobody reads it; the generation was stopped
                self._answered(task.result(), False, started)
                return JSONResponse(completion_body(task.result(), self.model_name))
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return await self._stream(request, backend, generation, include_usage, started)
        except Phi3VToolsError as exc:
            return error_response(exc)

    # -- streaming ----------------------------------------------------------------------------------------------------

    async def _stream(
        self, request: Request, backend: Backend, generation: GenerationRequest, include_usage: bool, started: float
    ) -> Response:
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()

        def on_text(piece: str) -> None:  # an engine thread
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

        generation.on_text = on_text
        task: asyncio.Task[GenerationResult] = asyncio.ensure_future(backend.generate(generation))
        task.add_done_callback(lambda _task: pieces.put_nowait(None))
        waiting = asyncio.ensure_future(pieces.get())
        if not await _unless_client_leaves(request, waiting):  # left while queued or prefilling
            task.cancel()
            return Response(status_code=499)
        first = waiting.result()
        if first is None and task.exception() is not None:  # refused or failed before any text: a status code
            exc = task.exception()
            if isinstance(exc, Phi3VToolsError):
                return error_response(exc)
            logger.error("a streamed request failed", exc_info=exc)
            return _error("the server failed to answer this request", "InternalServerError", 500)
        ident, created = completion_id(), int(time.time())

        def sse(body: dict[str, Any]) -> str:
            return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"

        async def events() -> AsyncIterator[str]:
            try:
                yield sse(chunk_body(ident, self.model_name, created, delta={"role": "assistant", "content": ""}))
                piece = first
                while piece is not None:
                    yield sse(chunk_body(ident, self.model_name, created, delta={"content": piece}))
                    piece = await pieces.get()
                try:
                    result = await task
                except Exception as exc:  # failed after some text: an error event, as vLLM sends one
                    if not isinstance(exc, Phi3VToolsError):
                        logger.error("a streamed request failed", exc_info=exc)
                        exc = GenerationError("the server failed to finish this answer")
                    error = _error_parts(exc)[0]
                    if self.metrics is not None:
                        self.metrics.failed(error["error"]["type"])
                    yield sse(error)
                    yield "data: [DONE]\n\n"
                    return
                self._answered(result, True, started)
                yield sse(chunk_body(ident, self.model_name, created, finish_reason=result.finish_reason))
                if include_usage:
                    yield sse(chunk_body(ident, self.model_name, created, result=result))
                yield "data: [DONE]\n\n"
            finally:
                if not task.done():  # the client went away: the generation stops at the next step
                    task.cancel()
                    if self.metrics is not None:
                        self.metrics.failed("ClientDisconnected")

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _unless_client_leaves(request: Request, work: asyncio.Future[Any]) -> bool:
    """Wait for ``work``; True when it is done, False (and ``work`` cancelled) when the client went away first."""

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if work.done():
        return True
    work.cancel()  # the engine drops the request at its next step
    return False


def _parse(raw: bytes) -> ChatCompletionRequest:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"the request body is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ProtocolError("the request body must be a JSON object")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise ProtocolError(f"{param or 'the request'}: {first['msg']}", param) from None


def _error_parts(exc: Phi3VToolsError) -> tuple[dict[str, Any], int, dict[str, str]]:
    """(OpenAI error body, HTTP status, headers) for an expected failure."""
    message = str(exc)
    if isinstance(exc, BusyError):
        return error_body(message, "RateLimitError", 429), 429, {"Retry-After": str(RETRY_AFTER_S)}
    if isinstance(exc, RequestTimeoutError):  # the whole generation timed out: sending it again would too
        return error_body(message, "TimeoutError", 504), 504, {"x-should-retry": "false"}
    if isinstance(exc, CancelledError):
        return error_body(message, "ServiceUnavailableError", 503), 503, {}
    if isinstance(exc, PromptError | ImageError | OutOfMemoryError):
        param = exc.param if isinstance(exc, ProtocolError) else None
        return error_body(message, "BadRequestError", 400, param), 400, {}
    return error_body(message, "InternalServerError", 500), 500, {"x-should-retry": "false"}


def error_response(exc: Phi3VToolsError) -> JSONResponse:
    body, status, headers = _error_parts(exc)
    return JSONResponse(body, status_code=status, headers=headers)


def _error(message: str, kind: str, status: int, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, status, param), status_code=status)
