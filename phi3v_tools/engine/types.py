"""Request and result types of every backend, and the :class:`Backend` protocol. No torch here.

A backend turns a :class:`GenerationRequest` (chat messages, PIL images, options, an optional JSON schema)
into a :class:`GenerationResult`. The local engine (:mod:`phi3v_tools.engine.core`), a remote
OpenAI-compatible backend and the fakes in the tests all speak these types, so the tools above them
never import torch, a tokenizer or the model.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from phi3v_tools.errors import RequestTimeoutError

if TYPE_CHECKING:
    from PIL import Image

    from phi3v_tools.structured import OutputSchema

logger = logging.getLogger(__name__)
FinishReason = Literal["stop", "length"]
DEFAULT_MAX_NEW_TOKENS = 512
WATCHDOG_GRACE_S = 2.0  # a caller gives up this long after its deadline if the engine has not answered


@dataclass
class GenerationRequest:
    """Chat messages (``role``/``content``) and the images their ``<|image_k|>`` tags refer to.

    Without tags, the images are referenced at the start of the last user message. With ``json_schema``
    the answer is constrained to it (and the schema is described in the prompt).
    """

    messages: list[dict[str, str]]
    images: Sequence[Image.Image] = ()
    max_new_tokens: int | None = None  # None: min(512, the engine's max_new_tokens)
    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None
    seed: int | None = None  # per-request sampling seed
    json_schema: dict[str, Any] | None = None
    num_crops: int | None = None  # None: the engine's default
    timeout_s: float | None = None  # None: the engine's default
    image_digests: Sequence[str] | None = None  # precomputed image_digest() values, if the caller has them
    stop: Sequence[str] = ()  # free text ends before the first of these (not with a json_schema); at most 4
    on_text: Callable[[str], None] | None = None  # streaming: called with each new piece of text (engine thread)

    @classmethod
    def from_text(cls, text: str, images: Sequence[Image.Image] = (), **options: Any) -> GenerationRequest:
        return cls(messages=[{"role": "user", "content": text}], images=images, **options)


@dataclass
class Timings:
    queue_s: float = 0.0  # submitted -> admitted to the running batch (its prefill began)
    preprocess_s: float = 0.0  # hashing, HD transform (0 for cached images)
    vision_s: float = 0.0  # CLIP + projection of its uncached images (shared batch time)
    prefill_s: float = 0.0  # its prompt's forward passes (all chunks)
    decode_s: float = 0.0  # first to last new token
    total_s: float = 0.0  # submitted -> result
    first_token_s: float = 0.0  # submitted -> first new token

    def tokens_per_s(self, tokens: int) -> float:
        return tokens / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class GenerationResult:
    text: str
    parsed: Any = None  # the JSON value, when the request had a schema (always valid against it)
    truncated: bool = False  # the token budget ran out; with a schema, open structures were closed
    finish_reason: FinishReason = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    image_tokens: int = 0
    cached_images: int = 0  # images whose features came from the cache
    timings: Timings = field(default_factory=Timings)

    @property
    def tokens_per_s(self) -> float:
        return self.timings.tokens_per_s(self.completion_tokens)


class RequestHandle:
    """A submitted request: its future, and a way to cancel it."""

    def __init__(self, request: GenerationRequest, deadline: float, schema: OutputSchema | None = None) -> None:
        self.request = request
        self.deadline = deadline
        self.schema = schema  # the request's output schema, checked and prepared at submission
        self.submitted = time.perf_counter()
        self.started = self.submitted  # when it was admitted
        self.future: concurrent.futures.Future[GenerationResult] = concurrent.futures.Future()
        self.finishing = False  # its tokens are complete and its result is being made (off the engine thread)
        self.streamed = ""  # text already sent to on_text (a re-run after a failed step skips it)
        # Sampling without a seed still gets one, drawn once: a re-run after a failed step then samples the same.
        self.seed = request.seed if request.seed is not None or request.temperature <= 0 else secrets.randbits(63)
        self._cancelled = threading.Event()
        # Cancelling the future itself (e.g. through the caller's own asyncio.wrap_future) cancels the request.
        self.future.add_done_callback(lambda future: self._cancelled.set() if future.cancelled() else None)

    @property
    def max_new_tokens(self) -> int:
        return self.request.max_new_tokens or DEFAULT_MAX_NEW_TOKENS  # submit() always sets it

    def cancel(self) -> None:
        """Stop the request: it leaves the running batch before the next decode step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def fail(self, error: BaseException) -> None:
        with contextlib.suppress(concurrent.futures.InvalidStateError):  # a caller may cancel it at the same moment
            if not self.future.done():
                self.future.set_exception(error)

    def finish(self, result: GenerationResult) -> None:
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            if not self.future.done():
                self.future.set_result(result)

    @property
    def pending(self) -> bool:
        """Still to be decoded: neither answered nor being finished."""
        return not self.future.done() and not self.finishing

    def wait(self) -> GenerationResult:
        """The result, waiting at most until the deadline plus a grace period (then cancelled, timed out)."""
        try:
            return self.future.result(timeout=max(self.deadline - time.perf_counter(), 0.0) + WATCHDOG_GRACE_S)
        except concurrent.futures.TimeoutError:
            self.cancel()
            raise self.timed_out() from None

    async def wait_async(self) -> GenerationResult:
        """:meth:`wait` for an event loop; cancelling the awaiting task cancels the request."""
        remaining = max(self.deadline - time.perf_counter(), 0.0) + WATCHDOG_GRACE_S
        try:
            return await asyncio.wait_for(asyncio.wrap_future(self.future), remaining)
        except asyncio.TimeoutError:
            self.cancel()
            raise self.timed_out() from None
        except asyncio.CancelledError:
            self.cancel()
            raise

    def timed_out(self) -> RequestTimeoutError:
        logger.warning("a request got no answer %.1f s after its deadline; it was cancelled", WATCHDOG_GRACE_S)
        return RequestTimeoutError("the request timed out: the model did not answer within its time limit")

    _timed_out = timed_out  # the name older code and tests use


class Backend(Protocol):
    """What the tools need from a model server: the local engine, a remote backend, or a fake in tests."""

    @property
    def model_name(self) -> str: ...  # the model that answers (an attribute will do)

    async def generate(self, request: GenerationRequest) -> GenerationResult: ...

    def generate_sync(self, request: GenerationRequest) -> GenerationResult: ...
