"""The shared runner: one model per process, concurrent requests micro-batched, image features cached.

One worker thread owns the model. Callers submit :class:`GenerationRequest` objects from any thread or
event loop (``await runner.generate(req)`` or ``runner.generate_sync(req)``); requests that arrive within
``batch_window_ms`` of each other are decoded as one left-padded batch. Each row keeps its own stop
condition, token budget, sampling seed and JSON-schema grammar; a finished, cancelled or timed-out row
leaves the batch at the next step. A row's greedy tokens do not depend on its batch companions.

Shared means isolated: one request's work cannot stall or fail another's.

- Everything a caller controls is checked at :meth:`Runner.submit`, on the caller's thread, before the
  request is admitted: message roles and text, sizes, and the output schema (checked, bounded, analysed
  and compiled to a grammar, :func:`~phi3v_tools.structured.prepare_schema`).
- On the worker, a failure in one row's work (its grammar, its tokens, its streaming listener) fails that
  row alone; a failure of a whole step (the model, out of memory) re-runs the batch in halves so the rows
  it did not come from still get their answers (their greedy/seeded tokens are the same alone).
- A finished row's output (detokenizing, closing and validating JSON, all bounded) is processed on a
  small thread pool, never on the thread that drives the model.
- A caller waits at most until its deadline (plus a short grace): if the engine is stuck, the caller gets
  a :class:`~phi3v_tools.errors.RequestTimeoutError` and the request is cancelled.

The runner knows nothing of tools or frameworks: it turns chat messages + images (+ a JSON schema) into
text (+ a parsed object), token counts and timings.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from PIL import Image

from phi3v_tools.errors import (
    BusyError,
    CancelledError,
    GenerationError,
    OutOfMemoryError,
    Phi3VToolsError,
    PromptError,
    RequestTimeoutError,
)
from phi3v_tools.feature_cache import CachedFeatures, FeatureCache, image_digest
from phi3v_tools.grammar import GrammarCompiler, JsonConstraint
from phi3v_tools.model.config import STOP_TOKEN_IDS
from phi3v_tools.model.generation import BatchDecoder
from phi3v_tools.model.image_processing import CROP_SIZE, num_image_tokens_for_grid, preprocess_image
from phi3v_tools.model.modeling import Phi3VForCausalLM
from phi3v_tools.model.processing import CHAT_ROLES, IMAGE_TAG, Phi3VProcessor, check_text
from phi3v_tools.settings import Settings
from phi3v_tools.structured import OutputSchema, prepare_schema

logger = logging.getLogger(__name__)
FinishReason = Literal["stop", "length"]
DEFAULT_MAX_NEW_TOKENS = 512
WATCHDOG_GRACE_S = 2.0  # a caller gives up this long after its deadline if the engine has not answered
OUTPUT_THREADS = 2  # threads that turn finished rows into results


# ---------------------------------------------------------------------------------------------------------------------
# Requests and results


@dataclass
class GenerationRequest:
    """Chat messages (``role``/``content``) and the images their ``<|image_k|>`` tags refer to.

    Without tags, the images are referenced at the start of the last user message. With ``json_schema``
    the answer is constrained to it (and the schema is described in the prompt).
    """

    messages: list[dict[str, str]]
    images: Sequence[Image.Image] = ()
    max_new_tokens: int | None = None  # None: min(512, the runner's max_new_tokens)
    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None
    seed: int | None = None  # per-request sampling seed
    json_schema: dict[str, Any] | None = None
    num_crops: int | None = None  # None: the runner's default
    timeout_s: float | None = None  # None: the runner's default
    image_digests: Sequence[str] | None = None  # precomputed image_digest() values, if the caller has them
    on_text: Callable[[str], None] | None = None  # streaming: called with each new piece of text (worker thread)

    @classmethod
    def from_text(cls, text: str, images: Sequence[Image.Image] = (), **options: Any) -> GenerationRequest:
        return cls(messages=[{"role": "user", "content": text}], images=images, **options)


@dataclass
class Timings:
    queue_s: float = 0.0  # submitted -> its batch started
    preprocess_s: float = 0.0  # hashing, HD transform (0 for cached images)
    vision_s: float = 0.0  # CLIP + projection of its uncached images (shared batch time)
    prefill_s: float = 0.0  # the batch's prompt forward pass
    decode_s: float = 0.0  # first to last new token
    total_s: float = 0.0  # submitted -> result

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
        self.started = self.submitted  # when its batch began
        self.future: concurrent.futures.Future[GenerationResult] = concurrent.futures.Future()
        self.finishing = False  # its tokens are complete and its result is being made (off the worker)
        self.streamed = ""  # text already sent to on_text (a re-run after a failed step skips it)
        # Sampling without a seed still gets one, drawn once: a re-run after a failed step then samples the same.
        self.seed = request.seed if request.seed is not None or request.temperature <= 0 else secrets.randbits(63)
        self._cancelled = threading.Event()

    @property
    def max_new_tokens(self) -> int:
        return self.request.max_new_tokens or DEFAULT_MAX_NEW_TOKENS  # submit() always sets it

    def cancel(self) -> None:
        """Stop the request: it leaves its batch before the next decode step."""
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
            raise self._timed_out() from None

    async def wait_async(self) -> GenerationResult:
        """:meth:`wait` for an event loop; cancelling the awaiting task cancels the request."""
        remaining = max(self.deadline - time.perf_counter(), 0.0) + WATCHDOG_GRACE_S
        try:
            return await asyncio.wait_for(asyncio.wrap_future(self.future), remaining)
        except asyncio.TimeoutError:
            self.cancel()
            raise self._timed_out() from None
        except asyncio.CancelledError:
            self.cancel()
            raise

    def _timed_out(self) -> RequestTimeoutError:
        logger.warning("a request got no answer %.1f s after its deadline; it was cancelled", WATCHDOG_GRACE_S)
        return RequestTimeoutError("the request timed out: the model did not answer within its time limit")


# ---------------------------------------------------------------------------------------------------------------------
# Per-request preparation


@dataclass
class _Prepared:
    handle: RequestHandle
    ids: list[int]
    features: list[torch.Tensor]
    image_tokens: int
    cached_images: int
    preprocess_s: float
    vision_s: float
    constraint: JsonConstraint | None

    @property
    def budget(self) -> int:
        return len(self.ids) + self.handle.max_new_tokens


@dataclass
class _Row:
    prepared: _Prepared
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    text: TextDeltas | None = None  # streaming: the text pieces not yet sent
    produced: str = ""  # streamed text this attempt has produced
    first_token_at: float = 0.0
    last_token_at: float = 0.0


class TextDeltas:
    """The new text of a growing token sequence, decoding a short window instead of the whole sequence.

    Decoding all tokens at every step costs O(n) per token (0.4 ms at 1000 tokens with Phi-3's tokenizer,
    per streaming row, on the worker thread that drives the GPU). Like TGI and vLLM, this decodes from a
    few tokens back (``prefix``) to the end and sends what goes beyond the text of the window's known
    part: the earlier tokens give the right leading space, and a piece that ends in half a UTF-8
    character waits for the rest.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._prefix = 0  # the window starts here
        self._read = 0  # tokens before this have been sent

    def push(self, tokens: list[int]) -> str:
        """The text that ``tokens`` (the whole sequence so far) adds to what was returned before."""
        known = self._decode(tokens[self._prefix : self._read])
        text = self._decode(tokens[self._prefix :])
        if len(text) <= len(known) or text.endswith("\ufffd"):
            return ""  # nothing new yet (a special token), or half a UTF-8 character so far
        self._prefix, self._read = self._read, len(tokens)
        return text[len(known) :]


def _generator(seed: int | None) -> torch.Generator | None:
    return torch.Generator().manual_seed(seed) if seed is not None else None


def _number_in(value: Any, low: float, high: float) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and low <= value <= high


def _check_messages(messages: Any, max_chars: int) -> None:
    """Roles, text and size of a request's messages, before anything tokenizes them."""
    if not isinstance(messages, list | tuple) or not messages:
        raise PromptError("a request needs at least one message (a list of {'role': ..., 'content': ...})")
    total = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise PromptError(f"message {i + 1} is a {type(message).__name__}, not a {{'role', 'content'}} dict")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise PromptError(f"message {i + 1} has role {str(role)[:40]!r}; use one of {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise PromptError(f"message {i + 1}'s content is a {type(content).__name__}, not text")
        total += len(content)
        if total > max_chars:
            raise PromptError(f"the messages have more than {max_chars} characters; shorten them")
        check_text(content, f"message {i + 1}")


def _with_image_tags(messages: list[dict[str, str]], n_images: int) -> list[dict[str, str]]:
    """Reference the images at the start of the last user message when no message tags them."""
    if n_images == 0 or any(IMAGE_TAG.search(m.get("content", "")) for m in messages):
        return messages
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not users:
        raise PromptError("a request with images needs a user message")
    tags = "".join(f"<|image_{k}|>\n" for k in range(1, n_images + 1))
    out = [dict(m) for m in messages]
    out[users[-1]]["content"] = tags + out[users[-1]]["content"]
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The runner


def load_pretrained(settings: Settings, *, progress: bool = False) -> tuple[Phi3VForCausalLM, Phi3VProcessor]:
    """The model and processor that ``settings`` name (model, device, dtype, attention, num_crops)."""
    processor = Phi3VProcessor.from_pretrained(
        settings.model, num_crops=settings.num_crops, cache_dir=settings.cache_dir
    )
    model = Phi3VForCausalLM.from_pretrained(
        settings.model,
        device_map=settings.device,
        dtype=settings.dtype,
        attn_implementation=settings.attn_implementation,
        cache_dir=settings.cache_dir,
        progress=progress,
    )
    return model, processor


class Runner:
    """Owns one loaded model and serves generation requests from a worker thread."""

    def __init__(self, model: Phi3VForCausalLM, processor: Phi3VProcessor, settings: Settings) -> None:
        self.model = model
        self.processor = processor
        self.settings = settings
        self.model_name = settings.model
        self.model_id = f"{settings.model}|{model.dtype}"
        cache_mb = settings.feature_cache_mb
        if cache_mb is None:
            cache_mb = 2048 if model.device.type == "cuda" else 512
        self.feature_cache = FeatureCache(cache_mb * 2**20)
        self.stop_ids = list(STOP_TOKEN_IDS)
        self.schema_limits = settings.schema_limits()
        self._grammars: GrammarCompiler | None = None
        self._grammar_lock = threading.Lock()
        self._queue: queue.Queue[RequestHandle] = queue.Queue(maxsize=settings.max_queue)
        self._carry: deque[RequestHandle] = deque()
        self._closed = threading.Event()
        self._outputs = concurrent.futures.ThreadPoolExecutor(OUTPUT_THREADS, thread_name_prefix="phi3v-output")
        self.decode_steps = 0  # forward passes after prefill, over the runner's life
        self.batches = 0
        self._worker = threading.Thread(target=self._work, name="phi3v-runner", daemon=True)
        self._worker.start()

    @classmethod
    def load(cls, settings: Settings, *, progress: bool = True, warm_up: bool = True) -> Runner:
        """Load ``settings.model`` (downloading with a progress bar if it is a hub id) and start serving.

        ``warm_up`` prepares the grammar engine on a background thread, so the first JSON request is not slow.
        """
        model, processor = load_pretrained(settings, progress=progress)
        runner = cls(model, processor, settings)
        if warm_up:
            threading.Thread(target=runner.grammars.warm_up, name="phi3v-grammar-warm-up", daemon=True).start()
        return runner

    # -- information --------------------------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {
            "model": self.settings.model,
            "device": str(self.model.device),
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "attn_implementation": self.model.attn_implementation,
            "num_crops": self.processor.num_crops,
            "queue": self._queue.qsize(),
            "max_queue": self.settings.max_queue,
            "batches": self.batches,
            "decode_steps": self.decode_steps,
            "feature_cache": self.feature_cache.stats(),
        }

    @property
    def grammars(self) -> GrammarCompiler:
        with self._grammar_lock:
            if self._grammars is None:
                vocab = int(self.model.config.text_config.vocab_size)
                self._grammars = GrammarCompiler(self.processor.tokenizer, vocab, self.stop_ids)
            return self._grammars

    # -- submitting ---------------------------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Check and queue a request; PromptError for what it asks wrongly, BusyError at once when the queue is full.

        Everything the caller controls is checked here, on the caller's thread (with an output schema this
        takes up to a few milliseconds: its grammar is compiled here, or found in the cache).
        """
        if self._closed.is_set():
            raise GenerationError("the runner is closed")
        wanted = request.max_new_tokens
        if isinstance(wanted, int) and not isinstance(wanted, bool) and wanted > self.settings.max_new_tokens:
            request = replace(request, max_new_tokens=self.settings.max_new_tokens)  # shortened, not refused
        elif wanted is None:
            request = replace(request, max_new_tokens=min(DEFAULT_MAX_NEW_TOKENS, self.settings.max_new_tokens))
        self._check_limits(request)
        schema = None
        if request.json_schema is not None:
            schema = prepare_schema(request.json_schema, self.schema_limits)
            self.grammars.grammar(schema.bounded)  # compiled (and cached) now: a grammar error is the caller's
        timeout = request.timeout_s if request.timeout_s is not None else self.settings.request_timeout_s
        handle = RequestHandle(request, time.perf_counter() + timeout, schema)
        try:
            self._queue.put_nowait(handle)
        except queue.Full:
            raise BusyError(
                f"the model is busy ({self.settings.max_queue} requests waiting); retry in a few seconds"
            ) from None
        return handle

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Run a request without blocking the event loop; cancelling the awaiting task cancels the request."""
        handle = await self._submit_async(request)
        return await handle.wait_async()

    async def _submit_async(self, request: GenerationRequest) -> RequestHandle:
        """:meth:`submit` from an event loop: a schema is checked and compiled in a thread (CPU work, not on the
        loop), and if the awaiting task is cancelled meanwhile, the request it submits is cancelled too."""
        if request.json_schema is None:
            return self.submit(request)
        submitting = asyncio.get_running_loop().run_in_executor(None, self.submit, request)
        try:
            return await asyncio.shield(submitting)
        except asyncio.CancelledError:

            def cancel_it(done: asyncio.Future[RequestHandle]) -> None:
                if not done.cancelled() and done.exception() is None:
                    done.result().cancel()

            submitting.add_done_callback(cancel_it)
            raise

    def stream(self, request: GenerationRequest) -> TextStream:
        """``async for piece in runner.stream(req)``: the answer's text as it is generated; then ``.result``."""
        return TextStream(self, request)

    def generate_sync(self, request: GenerationRequest) -> GenerationResult:
        return self.submit(request).wait()

    def close(self) -> None:
        """Stop the worker; waiting requests fail with CancelledError."""
        self._closed.set()
        self._worker.join(timeout=30)
        while True:
            try:
                self._queue.get_nowait().fail(CancelledError("the runner was closed"))
            except queue.Empty:
                break
        for handle in self._carry:
            handle.fail(CancelledError("the runner was closed"))
        self._outputs.shutdown(wait=False)  # results being made are still made (bounded work)

    def _check_limits(self, request: GenerationRequest) -> None:
        s = self.settings
        if len(request.images) > s.max_images:
            raise PromptError(f"{len(request.images)} images given; at most {s.max_images} per request")
        wanted = request.max_new_tokens
        if not isinstance(wanted, int) or isinstance(wanted, bool) or not 1 <= wanted <= s.max_new_tokens:
            raise PromptError(f"max_new_tokens must be between 1 and {s.max_new_tokens}, got {wanted!r}")
        crops = request.num_crops
        if crops is not None and (not isinstance(crops, int) or isinstance(crops, bool) or not 1 <= crops <= 16):
            raise PromptError(f"num_crops must be between 1 and 16, got {crops!r}")
        if not _number_in(request.temperature, 0, 100):
            raise PromptError(f"temperature must be a number from 0 to 100, got {request.temperature!r}")
        if request.top_p is not None and not (_number_in(request.top_p, 0, 1) and request.top_p > 0):
            raise PromptError(f"top_p must be a number above 0 and at most 1, got {request.top_p!r}")
        seed = request.seed
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63):
            raise PromptError(f"seed must be an integer from 0 to 2^63 - 1, got {seed!r}")
        if request.timeout_s is not None and not _number_in(request.timeout_s, 0, 7 * 86400):
            raise PromptError(f"timeout_s must be a number of seconds from 0 to a week, got {request.timeout_s!r}")
        _check_messages(request.messages, s.max_prompt_chars)

    # -- the worker ---------------------------------------------------------------------------------------------------

    def _work(self) -> None:
        while not self._closed.is_set():
            batch = self._collect()
            if not batch:
                continue
            self.batches += 1
            try:
                self._run(batch)
            except BaseException as exc:  # noqa: BLE001  # e.g. a grammar engine's panic: the worker must live on
                logger.exception("a batch failed outside its rows' own work")
                for handle in batch:
                    handle.fail(GenerationError(f"internal error while generating: {exc}"))

    def _next(self, timeout: float) -> RequestHandle | None:
        if self._carry:
            return self._carry.popleft()
        try:
            return self._queue.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return None

    def _collect(self) -> list[RequestHandle]:
        first = self._next(0.1)
        if first is None:
            return []
        batch = [first]
        window_end = time.perf_counter() + self.settings.batch_window_ms / 1000
        while len(batch) < self.settings.max_batch_size:
            handle = self._next(window_end - time.perf_counter())
            if handle is None:
                break
            batch.append(handle)
        return batch

    def _run(self, handles: list[RequestHandle]) -> None:
        live = [h for h in handles if self._still_wanted(h)]
        prepared: list[_Prepared] = []
        for handle in live:
            try:
                prepared.append(self._prepare(handle))
            except Phi3VToolsError as exc:
                handle.fail(exc)
            except Exception as exc:  # a bug or a hostile input we did not foresee: fail it, keep serving
                logger.exception("preparing a request failed")
                handle.fail(GenerationError(f"internal error while preparing the request: {exc}"))
        # Rows that would cross the LongRoPE switch run alone (the switch is per batch); the rest share
        # batches within the token budget.
        alone = [p for p in prepared if p.budget > self.model.config.original_max_position_embeddings]
        shared = [p for p in prepared if p not in alone]
        groups: list[list[_Prepared]] = [[p] for p in alone]
        current: list[_Prepared] = []
        for p in shared:
            if current and sum(q.budget for q in current) + p.budget > self.settings.max_batch_tokens:
                groups.append(current)
                current = []
            current.append(p)
        if current:
            groups.append(current)
        for group in groups:
            self._decode_with_retry(group)

    def _still_wanted(self, handle: RequestHandle) -> bool:
        handle.started = time.perf_counter()
        if handle.cancelled:
            handle.fail(CancelledError("the request was cancelled"))
            return False
        if time.perf_counter() > handle.deadline:
            handle.fail(RequestTimeoutError("the request timed out while waiting for the model"))
            return False
        return True

    def _prepare(self, handle: RequestHandle) -> _Prepared:
        request = handle.request
        num_crops = request.num_crops or self.processor.num_crops
        started = time.perf_counter()
        digests = list(request.image_digests or [image_digest(image) for image in request.images])
        if len(digests) != len(request.images):
            raise PromptError("image_digests must have one entry per image")
        keys = [FeatureCache.key(d, num_crops, self.model_id) for d in digests]
        entries = [self.feature_cache.get(key) for key in keys]
        cached = sum(e is not None for e in entries)
        missing = [i for i, e in enumerate(entries) if e is None]
        pixels, sizes = [], []
        for i in missing:
            crops, hd_h, hd_w = preprocess_image(request.images[i], num_crops)
            pixels.append(crops)
            sizes.append((hd_h, hd_w))
        preprocess_s = time.perf_counter() - started
        vision_s = 0.0
        if missing:
            started = time.perf_counter()
            with torch.inference_mode():
                features = self.model.get_image_features(torch.stack(pixels), torch.tensor(sizes))
            for i, (hd_h, hd_w), feature in zip(missing, sizes, features, strict=True):
                entry = CachedFeatures(feature, (hd_h // CROP_SIZE, hd_w // CROP_SIZE))
                self.feature_cache.put(keys[i], entry)
                entries[i] = entry
            vision_s = time.perf_counter() - started
        ready = [e for e in entries if e is not None]
        messages = _with_image_tags(request.messages, len(request.images))
        constraint = None
        if handle.schema is not None:
            last = dict(messages[-1])
            last["content"] = f"{last['content']}\n\n{handle.schema.prompt}"
            messages = [*messages[:-1], last]
            constraint = self.grammars.matcher(handle.schema.bounded)
        tokens = [num_image_tokens_for_grid(*e.grid) for e in ready]
        ids = self.processor.chat_ids(messages, tokens)  # contents are text: no caller writes control tokens
        if len(ids) + handle.max_new_tokens > self.settings.max_context:
            raise PromptError(
                f"the prompt takes {len(ids)} tokens ({sum(tokens)} for images) and max_new_tokens is "
                f"{request.max_new_tokens}: more than the {self.settings.max_context}-token limit; use fewer or "
                "smaller-num_crops images, or a shorter answer"
            )
        return _Prepared(
            handle, ids, [e.features for e in ready], sum(tokens), cached, preprocess_s, vision_s, constraint
        )

    def _decode_with_retry(self, group: list[_Prepared]) -> None:
        """Decode a group; when a whole step fails, re-run its unfinished rows in halves, down to one row.

        A re-run row gets the same tokens as before (greedy and seeded sampling do not depend on the batch),
        and streaming skips the text it already sent. Only the row a failure comes from fails.
        """
        try:
            self._decode(group)
            return
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            failure: Phi3VToolsError = OutOfMemoryError(
                f"out of accelerator memory for one request ({len(group[0].ids)} prompt tokens); use fewer "
                "images, a smaller num_crops or a smaller max_new_tokens"
            )
            what = "out of memory"
        except Exception as exc:
            logger.exception("a decoding step failed for a batch of %d", len(group))
            failure = GenerationError(f"internal error while generating: {exc}")
            what = "a step failed"
        except BaseException as exc:  # a native library's panic (not an Exception): treated the same
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            logger.exception("a decoding step failed for a batch of %d", len(group))
            failure = GenerationError(f"internal error while generating: {exc}")
            what = "a step failed"
        group = [p for p in group if p.handle.pending]
        if len(group) == 1:
            group[0].handle.fail(failure)
            return
        if not group:
            return
        logger.warning("%s with a batch of %d; re-running it in halves", what, len(group))
        half = len(group) // 2
        for part in (group[:half], group[half:]):
            for p in part:
                if p.constraint is not None:
                    p.constraint.matcher.reset()
            self._decode_with_retry(part)

    def _decode(self, group: list[_Prepared]) -> None:
        device = self.model.device
        started = time.perf_counter()
        longest = max(len(p.ids) for p in group)
        pad = int(self.model.config.text_config.pad_token_id or 0)
        input_ids = torch.full((len(group), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(group), longest), dtype=torch.long)
        for i, p in enumerate(group):
            input_ids[i, longest - len(p.ids) :] = torch.tensor(p.ids)
            mask[i, longest - len(p.ids) :] = 1
        features = [f for p in group for f in p.features]
        rows = [_Row(p, _generator(p.handle.seed)) for p in group]
        bitmask = self.grammars.allocate(len(rows)) if any(p.constraint for p in group) else None
        with torch.inference_mode():
            embeds = self.model.embed(input_ids.to(device), image_features=features)
            decoder = BatchDecoder(self.model, embeds, mask.to(device))
            prefill_s = time.perf_counter() - started
            while rows:
                # On CUDA the step's kernels are still running here: the grammar masks are computed meanwhile.
                if bitmask is not None:
                    self.grammars.fill([r.prepared.constraint for r in rows], bitmask)
                tokens = self._choose(decoder.logits, rows, bitmask)
                now = time.perf_counter()
                keep = [
                    i
                    for i, (row, token) in enumerate(zip(rows, tokens, strict=True))
                    if self._step(row, token, now, prefill_s)
                ]
                if not keep:
                    break
                if len(keep) < len(rows):
                    rows = [rows[i] for i in keep]
                    decoder.keep(keep)
                    bitmask = bitmask[: len(rows)] if bitmask is not None else None
                decoder.step(torch.tensor([r.tokens[-1] for r in rows], device=device))
                self.decode_steps += 1

    def _choose(self, logits: torch.Tensor, rows: list[_Row], bitmask: torch.Tensor | None) -> list[int]:
        logits = logits.float()
        chosen = logits.argmax(dim=-1).tolist()
        blocked: list[int] = []  # rows whose grammar allows no token at all
        if bitmask is not None:
            # Masking all 32k logits costs more than the mask itself; a greedy row whose favourite token is
            # allowed anyway (the usual case for a trained model) skips it.
            bits = bitmask.numpy()
            sampled = any(r.prepared.handle.request.temperature > 0 for r in rows)
            if sampled or not all(bits[i, t >> 5] >> (t & 31) & 1 for i, t in enumerate(chosen)):
                logits = logits.contiguous()
                self.grammars.apply(logits, bitmask)
                chosen = logits.argmax(dim=-1).tolist()
                blocked = torch.isneginf(logits.amax(dim=-1)).nonzero().flatten().tolist()
        for i, row in enumerate(rows):
            request = row.prepared.handle.request
            if i in blocked:
                chosen[i] = -1
            elif request.temperature > 0:
                probs = torch.softmax(logits[i] / request.temperature, dim=-1)
                if request.top_p is not None and request.top_p < 1.0:
                    sorted_probs, order = probs.sort(descending=True)
                    drop = sorted_probs.cumsum(0) - sorted_probs > request.top_p
                    probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
                chosen[i] = int(torch.multinomial(probs.cpu(), 1, generator=row.generator).item())
        return chosen

    def _step(self, row: _Row, token: int, now: float, prefill_s: float) -> bool:
        """:meth:`_advance`, failing this row alone if anything in its own work goes wrong."""
        try:
            return self._advance(row, token, now, prefill_s)
        except Phi3VToolsError as exc:
            row.prepared.handle.fail(exc)
        except Exception as exc:  # a bug or an input nobody foresaw: this row's, not its companions'
            logger.exception("a row failed")
            row.prepared.handle.fail(GenerationError(f"internal error while generating this answer: {exc}"))
        return False

    def _advance(self, row: _Row, token: int, now: float, prefill_s: float) -> bool:
        """Record ``token`` for ``row``; False when the row is done (its future then holds the outcome)."""
        handle = row.prepared.handle
        if handle.cancelled:
            handle.fail(CancelledError("the request was cancelled"))
            return False
        if now > handle.deadline:
            handle.fail(RequestTimeoutError(f"the request timed out after {len(row.tokens)} new tokens"))
            return False
        if not row.tokens:
            row.first_token_at = now
        row.last_token_at = now
        constraint = row.prepared.constraint
        stop = token in self.stop_ids
        if constraint is not None:
            if token < 0:
                problem = constraint.error or "no token can continue the answer"
                raise GenerationError(f"the output schema's grammar stopped this answer: {problem}")
            constraint.consume(token)
            stop = constraint.finished
        if not (stop and token in self.stop_ids):
            row.tokens.append(token)
        if handle.request.on_text is not None:
            self._stream(row)
        if stop:
            self._finish(row, "stop", prefill_s)
            return False
        if len(row.tokens) >= handle.max_new_tokens:
            self._finish(row, "length", prefill_s)
            return False
        return True

    def _text(self, tokens: list[int]) -> str:
        return str(self.processor.tokenizer.decode(tokens, skip_special_tokens=True))

    def _stream(self, row: _Row) -> None:
        if row.text is None:
            row.text = TextDeltas(self._text)
        delta = row.text.push(row.tokens)
        if not delta:
            return
        handle = row.prepared.handle
        row.produced += delta
        sent = handle.streamed
        if not (row.produced.startswith(sent) or sent.startswith(row.produced)):
            raise GenerationError("the answer changed when it was re-run after a failed step; retry the request")
        if len(row.produced) <= len(sent):  # a re-run after a failed step: this part was sent already
            return
        delta = row.produced[len(sent) :]
        handle.streamed = row.produced
        on_text = handle.request.on_text
        try:
            if on_text is not None:
                on_text(delta)
        except Exception:  # a broken listener must not break the batch
            logger.exception("a streaming callback failed")

    def _finish(self, row: _Row, reason: FinishReason, prefill_s: float) -> None:
        """Hand a finished row to the output threads: its result is made there, not on the worker."""
        row.prepared.handle.finishing = True
        try:
            self._outputs.submit(self._output, row, reason, prefill_s)
        except RuntimeError:  # the runner is closing
            row.prepared.handle.fail(CancelledError("the runner was closed"))

    def _output(self, row: _Row, reason: FinishReason, prefill_s: float) -> None:
        handle = row.prepared.handle
        try:
            handle.finish(self._result(row, reason, prefill_s))
        except Phi3VToolsError as exc:
            handle.fail(exc)
        except Exception as exc:  # also RecursionError, MemoryError...: this answer fails, nothing else
            logger.exception("making a result failed")
            handle.fail(GenerationError(f"internal error while reading the model's answer: {exc}"))

    def _result(self, row: _Row, reason: FinishReason, prefill_s: float) -> GenerationResult:
        p = row.prepared
        handle = p.handle
        text = self._text(row.tokens)
        parsed = None
        truncated = reason == "length"
        if handle.schema is not None:
            try:
                parsed = handle.schema.complete(text) if truncated else json.loads(text)
            except ValueError as exc:
                raise GenerationError(f"the model's JSON could not be read: {exc}") from None
            problem = handle.schema.validate(parsed)
            if problem is not None:
                raise GenerationError(f"the model's answer does not match the schema ({problem})")
            if truncated:
                text = json.dumps(parsed, ensure_ascii=False, separators=(",", ":"))
        total = time.perf_counter() - handle.submitted
        timings = Timings(
            queue_s=handle.started - handle.submitted,
            preprocess_s=p.preprocess_s,
            vision_s=p.vision_s,
            prefill_s=prefill_s,
            decode_s=row.last_token_at - row.first_token_at,
            total_s=total,
        )
        return GenerationResult(
            text=text,
            parsed=parsed,
            truncated=truncated,
            finish_reason=reason,
            prompt_tokens=len(p.ids),
            completion_tokens=len(row.tokens),
            image_tokens=p.image_tokens,
            cached_images=p.cached_images,
            timings=timings,
        )


class TextStream:
    """Async iterator over the pieces of text of one request; ``result`` holds the full result at the end.

    Breaking out of the loop (or cancelling the consuming task) cancels the request.
    """

    def __init__(self, runner: Runner, request: GenerationRequest) -> None:
        self._runner = runner
        self._request = request
        self.result: GenerationResult | None = None

    async def __aiter__(self) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()
        listener = self._request.on_text

        def on_text(piece: str) -> None:
            if listener is not None:
                listener(piece)
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

        handle = await self._runner._submit_async(replace(self._request, on_text=on_text))
        handle.future.add_done_callback(lambda _f: loop.call_soon_threadsafe(pieces.put_nowait, None))
        try:
            while True:
                remaining = max(handle.deadline - time.perf_counter(), 0.0) + WATCHDOG_GRACE_S
                try:
                    piece = await asyncio.wait_for(pieces.get(), remaining)
                except asyncio.TimeoutError:
                    handle.cancel()
                    raise handle._timed_out() from None
                if piece is None:
                    break
                yield piece
            self.result = await handle.wait_async()
        finally:
            if not handle.future.done():
                handle.cancel()


# ---------------------------------------------------------------------------------------------------------------------
# One runner per model per process

_RUNNERS: dict[Settings, Runner] = {}
_RUNNERS_LOCK = threading.Lock()


def get_runner(settings: Settings, *, progress: bool = True) -> Runner:
    """The process's runner for ``settings.model``: loaded on first use, then shared by every caller."""
    key = settings  # frozen, hashable: any difference (num_crops, limits...) is another runner
    with _RUNNERS_LOCK:
        runner = _RUNNERS.get(key)
        if runner is None:
            runner = Runner.load(settings, progress=progress)
            _RUNNERS[key] = runner
        return runner


def close_runners() -> None:
    with _RUNNERS_LOCK:
        for runner in _RUNNERS.values():
            runner.close()
        _RUNNERS.clear()
