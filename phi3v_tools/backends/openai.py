"""A backend that runs the tools' requests on an OpenAI-compatible server: ``phi3v-tools serve``, vLLM, SGLang,
or any server of ``/v1/chat/completions``. This process imports no torch, tokenizer or grammar engine.

- Images were loaded and checked by this process's image layer; they go as PNG ``data:`` URIs in ``image_url``
  parts, where the request's ``<|image_k|>`` tags stand (or before the last user message's text, as the local
  engine places untagged images). A caller's URL is never forwarded. An image sent again (a chained call by
  handle) reuses its encoding, found by its digest in a bounded cache.
- A JSON schema goes as ``response_format: {"type": "json_schema", ...}`` and the answer is validated here
  anyway (vLLM answers unconstrained when it ignores a field): an answer cut at its length limit is closed and
  completed as the local engine does; one that does not validate is a :class:`GenerationError`.
- Streaming (``request.on_text``) reads server-sent events; cancelling the caller's task closes the stream.
- The official ``openai`` client does the HTTP: connect and read timeouts, and retries with backoff on
  connection errors, 408, 429, 5xx (honouring ``Retry-After``). Calls in flight are bounded
  (``remote_max_in_flight``): by the connection pool of the one synchronous client, and per event loop for the
  async calls, which use one client per loop (a pool belongs to its loop), kept while the loop runs. It is
  chosen over bare httpx because those retries, the SSE parsing and the error classes are what this module
  would otherwise write again.
- Each request carries its first image's digest in ``x-session-id``, which Ray Serve's consistent-hash router
  (``PHI3V_ROUTE_BY_IMAGE``) routes by; other servers ignore it.
- Failures become this package's errors with what to do: a refused key, an unknown model, a prompt too long, a
  busy server, a server that is up but not serving, one that cannot be reached.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from phi3v_tools.engine.types import GenerationRequest, GenerationResult, Timings
from phi3v_tools.errors import (
    BusyError,
    GenerationError,
    ModelNotFoundError,
    OptionalDependencyError,
    Phi3VToolsError,
    PromptError,
    RequestTimeoutError,
)
from phi3v_tools.model.chat_format import IMAGE_TAG
from phi3v_tools.structured import DEFAULT_LIMITS, OutputSchema, SchemaLimits, prepare_schema

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["OpenAIBackend", "RemoteError"]

MAX_RETRIES = 3  # the client's retries on connection errors, 408, 429 and 5xx, with exponential backoff
CONNECT_TIMEOUT_S = 10.0
# The first image's digest goes in this header: Ray Serve's consistent-hash router reads its session id from it, so
# repeats of an image reach the replica whose feature cache has it (phi3v_tools.serving.ray); others ignore it.
ROUTING_HEADER = "x-session-id"
URI_CACHE_BYTES = 64 * 2**20  # data URIs kept for images sent again (a 12-Mpx photo's is about 20 MB)


class RemoteError(Phi3VToolsError):
    """The remote model server refused the call or could not be used (the message says why and what to do)."""


def _openai() -> Any:
    try:
        import openai
    except ImportError as exc:
        raise OptionalDependencyError("openai", "remote", "PHI3V_BACKEND=openai") from exc
    return openai


class OpenAIBackend:
    """The :class:`~phi3v_tools.engine.types.Backend` over ``base_url`` (e.g. ``http://gpu-box:8000/v1``)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        model: str | None = None,
        timeout_s: float = 300.0,
        max_in_flight: int = 64,
        schema_limits: SchemaLimits = DEFAULT_LIMITS,
    ) -> None:
        self._openai = _openai()
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key or "none"  # the client insists on one; servers without auth ignore it
        self._model = model
        self.timeout_s = timeout_s
        self.max_in_flight = max_in_flight
        self.schema_limits = schema_limits
        self._lock = threading.Lock()
        self._sync: Any = None
        self._uris: OrderedDict[str, str] = OrderedDict()  # image digest -> its data URI
        self._uri_bytes = 0
        # Per running event loop: (the async generator holding its client, the client, its slots for calls in
        # flight); an entry leaves when its loop shuts down.
        self._loops: dict[asyncio.AbstractEventLoop, tuple[Any, Any, asyncio.Semaphore]] = {}

    # -- clients ------------------------------------------------------------------------------------------------------

    def _options(self) -> dict[str, Any]:
        import httpx  # comes with openai

        return {
            "base_url": self.base_url,
            "api_key": self._api_key,
            "max_retries": MAX_RETRIES,
            "timeout": httpx.Timeout(self.timeout_s, connect=CONNECT_TIMEOUT_S),
        }

    def _limits(self) -> Any:
        import httpx

        return httpx.Limits(max_connections=self.max_in_flight, max_keepalive_connections=self.max_in_flight)

    def sync_client(self) -> Any:
        """One client for every thread (its connection pool is thread-safe), closed when the backend goes."""
        import httpx

        with self._lock:
            if self._sync is None:
                http = httpx.Client(limits=self._limits(), timeout=self._options()["timeout"])
                self._sync = self._openai.OpenAI(http_client=http, **self._options())
                weakref.finalize(self, http.close)
            return self._sync

    @contextlib.asynccontextmanager
    async def async_client(self) -> AsyncIterator[Any]:
        """The client of the running event loop, with a slot among the loop's calls in flight.

        An async connection pool belongs to the loop that opened it, so each loop gets its own client, kept for
        the loop's life (its connections are reused from call to call: no new TCP or TLS handshake per call).
        It is closed when the loop shuts down: the client lives in an async generator, and ``asyncio.run`` (or
        anyio, or uvicorn) closes the loop's async generators before closing the loop.
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            entry = self._loops.get(loop)
        if entry is None:
            keeper = self._loop_client(loop)
            client = await keeper.__anext__()  # no await inside before its yield: nothing else runs meanwhile
            entry = (keeper, client, asyncio.Semaphore(self.max_in_flight))
            with self._lock:
                self._loops[loop] = entry
        _keeper, client, slots = entry
        async with slots:
            yield client

    async def _loop_client(self, loop: asyncio.AbstractEventLoop) -> AsyncIterator[Any]:
        import httpx

        http = httpx.AsyncClient(limits=self._limits(), timeout=self._options()["timeout"])
        client = self._openai.AsyncOpenAI(http_client=http, **self._options())
        try:
            yield client
        finally:
            with self._lock:  # the entry holds the loop (its semaphore does): let both go
                self._loops.pop(loop, None)
            await client.close()

    def close(self) -> None:
        """Close the connections of the synchronous client (each loop's async client closes with its loop)."""
        with self._lock:
            client, self._sync = self._sync, None
        if client is not None:
            client.close()

    @property
    def model_name(self) -> str:
        """The served model: ``model`` if given, else the first id of ``/v1/models`` (asked once)."""
        if self._model is None:
            try:
                models = self.sync_client().models.list()
            except self._openai.OpenAIError as exc:
                raise self._error(exc) from None
            ids = [m.id for m in models.data]
            if not ids:
                raise RemoteError(f"the model server at {self.base_url} lists no models (GET /models)")
            self._model = ids[0]
        return self._model

    def info(self) -> dict[str, Any]:
        """The server and what it serves (``phi3v-tools info`` with ``PHI3V_BACKEND=openai``)."""
        try:
            models = [m.id for m in self.sync_client().models.list().data]
        except self._openai.OpenAIError as exc:
            raise self._error(exc) from None
        return {"backend": "openai", "base_url": self.base_url, "model": self.model_name, "models": models}

    # -- the Backend protocol -----------------------------------------------------------------------------------------

    def generate_sync(self, request: GenerationRequest) -> GenerationResult:
        body, schema = self._body(request)
        started = time.perf_counter()
        client = self.sync_client()
        try:
            if request.on_text is None:
                return self._result(client.chat.completions.create(**body), schema, started)
            pieces: list[str] = []
            with client.chat.completions.create(**body, stream=True, stream_options={"include_usage": True}) as s:
                final = self._read_stream(s, request, pieces, started)
            return self._finish("".join(pieces), *final, schema, started)
        except self._openai.OpenAIError as exc:
            raise self._error(exc) from None

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        body, schema = await asyncio.to_thread(self._body, request)  # PNG encoding: off the loop
        started = time.perf_counter()
        try:
            async with self.async_client() as client:
                if request.on_text is None:
                    return self._result(await client.chat.completions.create(**body), schema, started)
                pieces: list[str] = []
                reason, usage, first = None, None, 0.0
                options = {"stream": True, "stream_options": {"include_usage": True}}
                stream = await client.chat.completions.create(**body, **options)
                async with stream:  # leaving it (a cancelled caller) closes the HTTP stream
                    async for chunk in stream:
                        reason, usage, first = self._take(chunk, request, pieces, reason, usage, first, started)
            return self._finish("".join(pieces), reason, usage, first, schema, started)
        except self._openai.OpenAIError as exc:
            raise self._error(exc) from None

    # -- requests -----------------------------------------------------------------------------------------------------

    def _body(self, request: GenerationRequest) -> tuple[dict[str, Any], OutputSchema | None]:
        schema = prepare_schema(request.json_schema, self.schema_limits) if request.json_schema is not None else None
        body: dict[str, Any] = {
            "model": self.model_name,
            "messages": to_openai_messages(request.messages, request.images, self._data_uris(request)),
            "max_tokens": request.max_new_tokens or 512,
            "temperature": request.temperature,
        }
        if request.top_p is not None:
            body["top_p"] = request.top_p
        if request.seed is not None:
            body["seed"] = request.seed
        if request.stop:
            body["stop"] = list(request.stop)
        if schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                # As the caller wrote it: phi3v-tools serve bounds it and describes it in the prompt as the local
                # engine does, so both give the same answer. (vLLM is bounded by max_tokens.)
                "json_schema": {"name": "answer", "schema": schema.schema, "strict": True},
            }
        if request.image_digests:  # a key a router may send repeats of an image by (Ray Serve: PHI3V_ROUTE_BY_IMAGE)
            body["extra_headers"] = {ROUTING_HEADER: request.image_digests[0]}
        if request.num_crops is not None:
            body["extra_body"] = {"mm_processor_kwargs": {"num_crops": request.num_crops}}  # vLLM's and ours
        return body, schema

    def _data_uris(self, request: GenerationRequest) -> list[str]:
        """The images as PNG data URIs, encoded once per image: a chained call (the same handle again) finds its
        URI by the image's digest (bounded: ``URI_CACHE_BYTES``, least recently used out first)."""
        images, digests = list(request.images), list(request.image_digests or ())
        if len(digests) != len(images):
            return [png_data_uri(image) for image in images]
        uris = []
        for image, digest in zip(images, digests, strict=True):
            with self._lock:
                uri = self._uris.get(digest)
                if uri is not None:
                    self._uris.move_to_end(digest)
            if uri is None:
                uri = png_data_uri(image)
                with self._lock:
                    if digest not in self._uris and len(uri) <= URI_CACHE_BYTES:
                        self._uris[digest] = uri
                        self._uri_bytes += len(uri)
                        while self._uri_bytes > URI_CACHE_BYTES:
                            self._uri_bytes -= len(self._uris.popitem(last=False)[1])
            uris.append(uri)
        return uris

    # -- results ------------------------------------------------------------------------------------------------------

    def _read_stream(
        self, stream: Any, request: GenerationRequest, pieces: list[str], started: float
    ) -> tuple[str | None, Any, float]:
        reason, usage, first = None, None, 0.0
        for chunk in stream:
            reason, usage, first = self._take(chunk, request, pieces, reason, usage, first, started)
        return reason, usage, first

    @staticmethod
    def _take(
        chunk: Any,
        request: GenerationRequest,
        pieces: list[str],
        reason: str | None,
        usage: Any,
        first: float,
        started: float,
    ) -> tuple[str | None, Any, float]:
        if getattr(chunk, "usage", None) is not None:
            usage = chunk.usage
        for choice in chunk.choices or ():
            text = choice.delta.content if choice.delta is not None else None
            if text:
                first = first or time.perf_counter() - started
                pieces.append(text)
                assert request.on_text is not None
                request.on_text(text)
            if choice.finish_reason:
                reason = choice.finish_reason
        return reason, usage, first

    def _result(self, completion: Any, schema: OutputSchema | None, started: float) -> GenerationResult:
        if not completion.choices:
            raise GenerationError(f"the model server at {self.base_url} answered with no choices")
        choice = completion.choices[0]
        elapsed = time.perf_counter() - started
        return self._finish(
            choice.message.content or "", choice.finish_reason, completion.usage, elapsed, schema, started
        )

    def _finish(
        self, text: str, reason: str | None, usage: Any, first: float, schema: OutputSchema | None, started: float
    ) -> GenerationResult:
        if reason not in ("stop", "length"):  # a stream cut short, vLLM's "abort", a filter: not a whole answer
            raise GenerationError(
                f"the model server at {self.base_url} ended the answer without completing it (finish_reason "
                f"{reason!r}); retry the call"
            )
        truncated = reason == "length"
        parsed = None
        if schema is not None:
            try:
                parsed = schema.complete(text) if truncated else json.loads(text)
            except ValueError as exc:
                raise GenerationError(f"the model server's JSON could not be read: {exc}") from None
            problem = schema.validate(parsed)
            if problem is not None:  # e.g. a server that ignored response_format
                raise GenerationError(f"the model server's answer does not match the schema ({problem})")
            if truncated:
                text = json.dumps(parsed, ensure_ascii=False, separators=(",", ":"))
        total = time.perf_counter() - started
        return GenerationResult(
            text=text,
            parsed=parsed,
            truncated=truncated,
            finish_reason="length" if truncated else "stop",
            prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
            completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
            cached_images=_count(getattr(usage, "cached_images", 0)),  # phi3v-tools serve's; other servers: 0
            timings=Timings(decode_s=max(total - first, 0.0), total_s=total, first_token_s=first),
        )

    def _error(self, exc: Exception) -> Phi3VToolsError:
        """This package's error for a failed call, saying what to do."""
        o = self._openai
        where = f"the model server at {self.base_url}"
        message = _message(exc)
        if isinstance(exc, o.AuthenticationError | o.PermissionDeniedError):
            return RemoteError(f"{where} refused the API key ({message}); set PHI3V_API_KEY to its key")
        if isinstance(exc, o.NotFoundError):
            return ModelNotFoundError(
                f"{where} does not serve the model asked for ({message}); unset PHI3V_REMOTE_MODEL to use the first "
                "model it lists, or check PHI3V_BASE_URL (it usually ends in /v1)"
            )
        if isinstance(exc, o.RateLimitError):
            return BusyError(f"{where} is busy ({message}); retry shortly")
        if isinstance(exc, o.BadRequestError):  # e.g. a prompt longer than the server's context
            return PromptError(f"{where} refused the request: {message}")
        if isinstance(exc, o.APITimeoutError):
            return RequestTimeoutError(f"{where} did not answer within {self.timeout_s:g} s (PHI3V_REMOTE_TIMEOUT_S)")
        if isinstance(exc, o.APIConnectionError):
            return RemoteError(f"cannot reach {where} ({message}); is it running, and is PHI3V_BASE_URL right?")
        if isinstance(exc, o.APIStatusError) and exc.status_code in (502, 503, 504):
            return RemoteError(f"{where} is up but not serving ({exc.status_code}: {message}); retry when it is ready")
        return RemoteError(f"{where} failed: {message}")


def _message(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"][:500]
    return str(exc)[:500]


def to_openai_messages(
    messages: list[dict[str, str]], images: Any, uris: list[str] | None = None
) -> list[dict[str, Any]]:
    """OpenAI messages with ``image_url`` parts where the ``<|image_k|>`` tags stand (untagged images: before the
    last user message's text, where the local engine would place them). ``uris``: the images' data URIs, if made
    already."""
    if uris is None:
        uris = [png_data_uri(image) for image in images]
    tagged = any(IMAGE_TAG.search(m.get("content", "")) for m in messages)
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    if uris and not tagged and last_user < 0:
        raise PromptError("a request with images needs a user message")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        content = message.get("content", "")
        if not uris or (tagged and not IMAGE_TAG.search(content)) or (not tagged and i != last_user):
            out.append({"role": message["role"], "content": content})
            continue
        parts: list[dict[str, Any]] = []
        if not tagged:
            parts += [{"type": "image_url", "image_url": {"url": uri}} for uri in uris]
            parts.append({"type": "text", "text": content})
        else:
            position = 0
            for match in IMAGE_TAG.finditer(content):
                if match.start() > position:
                    parts.append({"type": "text", "text": content[position : match.start()]})
                k = int(match.group(1))
                if not 1 <= k <= len(uris):
                    raise PromptError(f"<|image_{k}|> names no image: {len(uris)} given")
                parts.append({"type": "image_url", "image_url": {"url": uris[k - 1]}})
                position = match.end()
            if position < len(content):
                parts.append({"type": "text", "text": content[position:].lstrip("\n")})
        out.append({"role": message["role"], "content": parts})
    return out


def png_data_uri(image: Image.Image) -> str:
    """A lossless ``data:image/png;base64,...`` of a checked RGB image (fast compression: it is sent, not kept)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _count(value: Any) -> int:
    """A server's count as an int, 0 for anything else (a field another server may fill differently)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
