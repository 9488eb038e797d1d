"""The local engine: one model, one step loop, continuous batching.

Callers submit :class:`~phi3v_tools.engine.types.GenerationRequest` objects from any thread or event loop.
A request goes through:

1. **submission** (the caller's thread): every option, the messages and the output schema are checked
   and the schema's grammar compiled (:func:`~phi3v_tools.engine.prompts.check_request`,
   :func:`~phi3v_tools.structured.prepare_schema`); a full queue answers :class:`BusyError` at once;
2. **preparation** (a small thread pool, off the thread that drives the model): image hashing, cache
   look-ups, the HD transform of uncached images, the prompt's token ids and the grammar matcher;
3. **the step loop** (one thread owns the model). Each step: admit waiting requests within the batch,
   KV and LongRoPE limits (:mod:`~phi3v_tools.engine.scheduler`); encode the uncached images of the
   admitted requests in one vision batch (at most ``max_step_images``); prefill at most
   ``prefill_chunk_tokens`` prompt tokens, one chunk of a long prompt or a group of short ones (a
   finished prompt joins the running batch); then one decode
   step for every running row (:mod:`~phi3v_tools.engine.model_runner`, :mod:`~phi3v_tools.engine.sampler`).
   A short request admitted beside long ones therefore starts within one bounded chunk and finishes on
   its own schedule;
4. **output** (a small thread pool): detokenizing, closing and validating JSON
   (:mod:`~phi3v_tools.engine.output`).

Shared means isolated: a failure in one row's own work (its grammar, its tokens, its listener, its
images, its prefill) fails that row alone. A failed decode step (the model, out of memory) re-runs each of
its rows on its own (greedy and seeded tokens are the same alone), so only the row the failure came from
fails. A caller waits at most until its deadline plus a short grace.

Guarantees under joins: a row's greedy tokens and seeded samples do not depend on when it joined or who
left (a long prompt is prefilled in chunks cut at fixed offsets; attention sees only the row's own
tokens; its sampler has its own generator). As in every batching engine, a batched matrix product may
differ from a single row's in the last bits; the tests check the tokens are the same (joins at random
steps, on the fp32 tiny model). Cancelling leaves the batch before the next decode step.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
import weakref
from collections import deque
from dataclasses import replace
from typing import Any

import torch

from phi3v_tools.engine import model_runner, output, prompts, scheduler
from phi3v_tools.engine.model_runner import load_pretrained
from phi3v_tools.engine.preparation import Preparer
from phi3v_tools.engine.row import Row
from phi3v_tools.engine.sampler import SAMPLING_FAILED, choose
from phi3v_tools.engine.stream import TextStream
from phi3v_tools.engine.types import (
    DEFAULT_MAX_NEW_TOKENS,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    RequestHandle,
)
from phi3v_tools.engine.vision import VisionStage
from phi3v_tools.errors import (
    BusyError,
    CancelledError,
    GenerationError,
    OutOfMemoryError,
    Phi3VToolsError,
    RequestTimeoutError,
)
from phi3v_tools.feature_cache import FeatureCache
from phi3v_tools.grammar import GrammarCompiler
from phi3v_tools.model.config import STOP_TOKEN_IDS
from phi3v_tools.model.memory import available_bytes
from phi3v_tools.model.modeling import Phi3VForCausalLM
from phi3v_tools.model.processing import Phi3VProcessor
from phi3v_tools.model.quantize import describe
from phi3v_tools.settings import Settings
from phi3v_tools.structured import prepare_schema

logger = logging.getLogger(__name__)
PREP_THREADS = 2  # threads that prepare requests (hashing, HD transform, tokenizing)
OUTPUT_THREADS = 2  # threads that turn finished rows into results
CLOSE_TIMEOUT_S = 30.0


class Engine:
    """Owns one loaded model and serves generation requests from its step loop."""

    def __init__(self, model: Phi3VForCausalLM, processor: Phi3VProcessor, settings: Settings) -> None:
        self.model = model
        self.processor = processor
        self.settings = settings
        self.limits = settings.engine_limits()
        self.model_name = settings.model
        self.quantization = describe(model)  # what the model holds (a model quantized in memory too)
        self.model_id = f"{settings.model}|{model.dtype}|{self.quantization}"
        self.num_crops = self.limits.num_crops or processor.num_crops
        cache_mb = self.limits.feature_cache_mb
        if cache_mb is None:
            free = available_bytes(model.device) if model.device.type == "cuda" else None
            cache_mb = default_feature_cache_mb(model.device.type, free)
        self.feature_cache = FeatureCache(cache_mb * 2**20)
        self.stop_ids = list(STOP_TOKEN_IDS)
        self.schema_limits = self.limits.schema_limits()
        kv_tokens = self.limits.max_batch_tokens
        if kv_tokens is None:  # what memory holds, the feature cache's promise set aside (it fills on the GPU)
            reserved = cache_mb * 2**20 if model.device.type == "cuda" else 0
            kv_tokens = scheduler.kv_budget_tokens(
                model_runner.kv_bytes_per_token(model),
                model_runner.kv_memory_bytes(model.device, reserved),
                self.limits.max_batch_size,
                self.limits.max_context,
            )
        self.admission = scheduler.AdmissionLimits(self.limits.max_batch_size, kv_tokens)
        self._alone_above = int(model.config.original_max_position_embeddings)
        self.preparer = Preparer(processor, self.feature_cache, self.model_id, lambda: self.grammars, self._alone_above)
        self.vision = VisionStage(model, self.feature_cache)
        self._grammars: GrammarCompiler | None = None
        self._grammar_lock = threading.Lock()
        # Submitted and not yet admitted (being prepared or waiting): bounded by max_queue.
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._intake: queue.SimpleQueue[Row] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._fail_lock = threading.Lock()
        # Owned by the step loop's thread:
        self._waiting: deque[Row] = deque()
        self._prefilling: list[Row] = []
        self._running: list[Row] = []
        self._batch: model_runner.RunningBatch | model_runner.AloneBatch | None = None
        self._prep = concurrent.futures.ThreadPoolExecutor(PREP_THREADS, thread_name_prefix="phi3v-prep")
        self._outputs = concurrent.futures.ThreadPoolExecutor(OUTPUT_THREADS, thread_name_prefix="phi3v-output")
        self.decode_steps = 0  # decode forward passes over the engine's life
        self.batches = 0  # times the running batch started from empty
        self.joins = 0  # rows that joined a running batch
        self.prefill_chunks = 0
        self.prompt_tokens = 0  # prompt tokens admitted (a row admitted again after a failed step counts again)
        self.sampled_tokens = 0  # tokens chosen by decode steps (stop tokens too)
        self._batch_sizes = [0] * (self.admission.max_rows + 1)  # decode steps by how many rows they decoded
        self.static_batching = False  # benchmarks only: admit a new batch only when the last one has finished
        self._warm_up: threading.Thread | None = None
        self._masks: torch.Tensor | None = None  # grammar-mask buffer (step loop only)
        self._worker = threading.Thread(target=self._work, name="phi3v-engine", daemon=True)
        _LIVE.add(self)
        self._worker.start()

    @classmethod
    def load(cls, settings: Settings, *, progress: bool = True, warm_up: bool = True) -> Engine:
        """Load ``settings.model`` (downloading with a progress bar if it is a hub id) and start serving.

        ``warm_up`` prepares the grammar engine on a background thread, so the first JSON request is not slow.
        """
        if settings.cpu_threads is not None:  # process-wide: a CPU model's matmuls, before anything runs
            torch.set_num_threads(settings.cpu_threads)
        model, processor = load_pretrained(
            settings.model_config(), num_crops=settings.num_crops, progress=progress, max_context=settings.max_context
        )
        engine = cls(model, processor, settings)
        if warm_up:
            engine._warm_up = threading.Thread(
                target=engine._warm_up_grammars, name="phi3v-grammar-warm-up", daemon=True
            )
            engine._warm_up.start()
        return engine

    def _warm_up_grammars(self) -> None:
        try:
            self.grammars.warm_up()
        except Exception as exc:  # a slow first JSON request, not a broken engine (or an interpreter exiting)
            if not self._closed.is_set():
                logger.warning("warming up the grammar engine failed (%s); the first JSON request will be slower", exc)

    def wait_until_warm(self, timeout: float | None = None) -> None:
        """Wait for the grammar engine's one-time warm-up (started by :meth:`load`; about 2 s on a CPU). A first
        JSON request waits for it anyway, inside its first step; the tools wait here, so that the wait is
        counted as part of loading in their timings."""
        warm_up = self._warm_up
        if warm_up is not None and warm_up is not threading.current_thread():
            warm_up.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    # -- information --------------------------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {
            "model": self.settings.model,
            "device": str(self.model.device),
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "attn_implementation": self.model.attn_implementation,
            "quantization": self.quantization,
            "num_crops": self.num_crops,
            "queue": self._pending,
            "max_queue": self.limits.max_queue,
            "max_batch_size": self.admission.max_rows,
            "kv_budget_tokens": self.admission.kv_tokens,
            "running": len(self._running),
            "prefilling": len(self._prefilling),
            "batches": self.batches,
            "joins": self.joins,
            "decode_steps": self.decode_steps,
            "prompt_tokens": self.prompt_tokens,
            "sampled_tokens": self.sampled_tokens,
            "decode_batch_sizes": {rows: n for rows, n in enumerate(list(self._batch_sizes)) if n},
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
        limit = self.limits.max_new_tokens
        wanted = request.max_new_tokens
        if isinstance(wanted, int) and not isinstance(wanted, bool) and wanted > limit:
            request = replace(request, max_new_tokens=limit)  # shortened, not refused
        elif wanted is None:
            request = replace(request, max_new_tokens=min(DEFAULT_MAX_NEW_TOKENS, limit))
        prompts.check_request(request, self.limits)
        schema = None
        if request.json_schema is not None:
            schema = prepare_schema(request.json_schema, self.schema_limits)
            self.grammars.grammar(schema.bounded)  # compiled (and cached) now: a grammar error is the caller's
        timeout = request.timeout_s if request.timeout_s is not None else self.limits.request_timeout_s
        handle = RequestHandle(request, time.perf_counter() + timeout, schema)
        with self._pending_lock:
            if self._pending >= self.limits.max_queue:
                raise BusyError(f"the model is busy ({self.limits.max_queue} requests waiting); retry in a few seconds")
            self._pending += 1
        try:
            self._prep.submit(self._prepare_and_queue, handle)
        except RuntimeError:  # closing
            self._unpend()
            raise GenerationError("the runner is closed") from None
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

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Stop the step loop (after the step in progress); every unanswered request fails with CancelledError."""
        if self._closed.is_set() and not self._worker.is_alive():
            return
        self._closed.set()
        self._wake.set()
        self._prep.shutdown(wait=True)  # each request still being prepared sees the engine closed and fails
        if threading.current_thread() is not self._worker:
            self._worker.join(timeout=timeout)
        if self._warm_up is not None:  # a daemon thread inside torch or llguidance at interpreter exit aborts it
            self._warm_up.join(timeout=timeout)
        self._fail_all(CancelledError("the runner was closed"))  # also when the loop is stuck in a step
        self._outputs.shutdown(wait=False)  # results being made are still made (bounded work)
        _LIVE.discard(self)

    # -- preparation (prep threads) -----------------------------------------------------------------------------------

    def _unpend(self, count: int = 1) -> None:
        with self._pending_lock:
            self._pending -= count

    def _prepare(self, handle: RequestHandle) -> Row:
        return self.preparer.prepare(handle, self.num_crops, self.limits.max_context)

    def _prepare_and_queue(self, handle: RequestHandle) -> None:
        try:
            if self._closed.is_set():
                raise CancelledError("the runner was closed")
            if handle.cancelled:
                raise CancelledError("the request was cancelled")
            row = self._prepare(handle)
        except Phi3VToolsError as exc:
            self._unpend()
            handle.fail(exc)
            return
        except Exception as exc:  # a bug or a hostile input we did not foresee: fail it, keep serving
            logger.exception("preparing a request failed")
            self._unpend()
            handle.fail(GenerationError(f"internal error while preparing the request: {exc}"))
            return
        if self._closed.is_set():
            self._unpend()
            handle.fail(CancelledError("the runner was closed"))
            return
        self._intake.put(row)  # if the engine closes now, close() fails it (it waits for the prep threads first)
        self._wake.set()

    # -- the step loop ------------------------------------------------------------------------------------------------

    def _work(self) -> None:
        while not self._closed.is_set():
            try:
                wait = self._step()
            except BaseException as exc:  # noqa: BLE001  # e.g. a native library's panic: the loop must live on
                logger.exception("an engine step failed outside its rows' own work")
                self._fail_all(GenerationError(f"internal error while generating: {exc}"), waiting=False)
                wait = 0.0
            if wait > 0:
                self._wake.wait(wait)
                self._wake.clear()
        self._fail_all(CancelledError("the runner was closed"))

    def _step(self) -> float:
        """One engine step; returns how long to wait for new work before the next one (0: go on at once)."""
        while True:
            try:
                row = self._intake.get_nowait()
            except queue.Empty:
                break
            row.ready_at = time.perf_counter()
            self._waiting.append(row)
        self._expire()
        if not (self._running or self._prefilling):
            if not self._waiting:
                return 0.1
            # An idle engine gives the first request a moment for company (arrivals in a burst batch together),
            # counted from when it was ready (its preparation is not company's fault).
            waited = time.perf_counter() - self._waiting[0].ready_at
            window = self.limits.batch_window_ms / 1000
            if waited < window and len(self._waiting) < self.limits.max_batch_size:
                return window - waited
        self._admit()
        for row, exc in self.vision.run(self._prefilling, self.limits.max_step_images):
            self._fail_row(row, exc, "encoding its images")
        self._prefill()
        self._decode()
        return 0.0

    def _expire(self) -> None:
        """Drop waiting and prefilling rows that were cancelled or ran out of time."""
        now = time.perf_counter()

        def gone(row: Row) -> bool:
            handle = row.handle
            if handle.cancelled:
                handle.fail(CancelledError("the request was cancelled"))
                return True
            if now > handle.deadline:
                handle.fail(RequestTimeoutError("the request timed out while waiting for the model"))
                return True
            return False

        if self._waiting:
            kept = [row for row in self._waiting if not gone(row)]
            self._unpend(len(self._waiting) - len(kept))
            self._waiting = deque(kept)
        self._prefilling = [row for row in self._prefilling if not gone(row)]

    def _admit(self) -> None:
        active = [*self._prefilling, *self._running]
        if self.static_batching and active:
            return  # benchmarks only: the previous engine's behaviour (a batch is decoded to its end, then the next)
        count = scheduler.admit(self._waiting, active, self.admission)
        now = time.perf_counter()
        for _ in range(count):
            row = self._waiting.popleft()
            row.handle.started = now
            self.prompt_tokens += len(row.ids)
            self._prefilling.append(row)
        self._unpend(count)

    def _fail_row(self, row: Row, exc: BaseException, doing: str) -> None:
        """Fail a row being prepared for decoding (its images or its prefill) and drop it."""
        if isinstance(exc, torch.OutOfMemoryError):
            error: Phi3VToolsError = _out_of_memory(len(row.ids))
        elif isinstance(exc, Phi3VToolsError):
            error = exc
        else:
            logger.error("a request failed while %s", doing, exc_info=exc)
            error = GenerationError(f"internal error while {doing}: {exc}")
        row.handle.fail(error)
        if row in self._prefilling:
            self._prefilling.remove(row)

    def _prefill(self) -> None:
        """Prefill the admitted rows' prompts, at most one chunk budget this step; finished prompts join the batch."""
        ready = [row for row in self._prefilling if not row.pixels]
        if not ready:
            return
        if ready[0].crosses_switch:  # no company (admission made sure): prefilled whole, then decoded alone
            row = ready[0]
            started = time.perf_counter()
            try:
                self._batch = model_runner.AloneBatch(self.model, row.ids, self._features(row))
            except Exception as exc:
                self._fail_row(row, exc, "reading the prompt")
                return
            row.prefill_s += time.perf_counter() - started
            self._prefilling.remove(row)
            self._running = [row]
            self.batches += 1
            return
        chunk = self.limits.prefill_chunk_tokens
        for row in ready:
            if row.prefill is None:
                try:
                    row.prefill = model_runner.Prefill(self.model, row.ids, self._features(row))
                except Exception as exc:
                    self._fail_row(row, exc, "reading the prompt")
        ready = [row for row in ready if row.prefill is not None and row in self._prefilling]
        group = self._short_prompts(ready, chunk)
        if len(group) > 1:
            self._prefill_group(group)
            return
        plan = scheduler.prefill_plan([row.prefill.remaining for row in ready if row.prefill], chunk, chunk)
        for row, tokens in zip(ready, plan, strict=False):
            prefill = row.prefill
            assert prefill is not None
            started = time.perf_counter()
            try:
                prefill.run(tokens)
            except Exception as exc:
                self._fail_row(row, exc, "reading the prompt")
                continue
            row.prefill_s += time.perf_counter() - started
            self.prefill_chunks += 1
            if prefill.remaining == 0:
                if self._batch is None:
                    self._batch = model_runner.RunningBatch(self.model)
                    self.batches += 1
                elif self._running:
                    self.joins += 1
                assert isinstance(self._batch, model_runner.RunningBatch)
                try:
                    self._batch.join(prefill)
                except Exception as exc:  # the batch is unchanged: only the joining row fails
                    self._fail_row(row, exc, "joining the running batch")
                    continue
                row.prefill = None
                self._prefilling.remove(row)
                self._running.append(row)

    @staticmethod
    def _short_prompts(ready: list[Row], chunk: int) -> list[Row]:
        """Not-yet-started prompts that each fit in one chunk, oldest first, while the padded group fits in one."""
        group: list[Row] = []
        longest = 0
        for row in ready:
            prefill = row.prefill
            if prefill is None or prefill.done or prefill.length > chunk or row.prefill_alone:
                if not group:
                    return []  # the oldest prompt is long: it goes first, in chunks
                continue
            longest = max(longest, prefill.length)
            if (len(group) + 1) * longest > chunk:
                break
            group.append(row)
        return group

    def _prefill_group(self, rows: list[Row]) -> None:
        started = time.perf_counter()
        batch = self._batch if isinstance(self._batch, model_runner.RunningBatch) else None
        try:
            cache, mask, last, logits = model_runner.PromptGroup(
                self.model, [r.prefill for r in rows if r.prefill]
            ).run()
            batch = batch or model_runner.RunningBatch(self.model)
            batch.join_rows(cache, mask, last, logits)  # changes the batch only when it succeeds
        except Exception:  # one prompt may be the cause: each is prefilled on its own from the next step
            logger.warning("prefilling %d prompts together failed; one by one now", len(rows), exc_info=True)
            for row in rows:
                row.prefill_alone = True
                row.prefill = None
            return
        elapsed = time.perf_counter() - started
        self.prefill_chunks += 1
        assert self._batch is None or self._batch is batch, "a group joins only a shared batch"
        if self._batch is None:
            self._batch = batch
            self.batches += 1
        elif self._running:
            self.joins += len(rows)
        for row in rows:
            row.prefill_s += elapsed
            row.prefill = None
            self._prefilling.remove(row)
            self._running.append(row)

    @staticmethod
    def _features(row: Row) -> list[torch.Tensor]:
        return [entry.features for entry in row.entries if entry is not None]

    def _decode(self) -> None:
        """One token for every running row: choose, record (finished rows leave), then the next forward pass."""
        batch, rows = self._batch, self._running
        if batch is None or not rows:
            return
        try:
            constraints = [row.constraint for row in rows]
            grammars = self.grammars if any(c is not None for c in constraints) else None
            bitmask = self._bitmask(grammars, len(rows)) if grammars is not None else None
            with torch.inference_mode():  # the logits are the model's inference tensors: masked in place
                tokens = choose(batch.logits, [row.sampling for row in rows], constraints, grammars, bitmask)
        except BaseException as exc:  # noqa: BLE001  # a native library's panic too: the step failed, not the loop
            self._step_failed(exc)
            return
        self.sampled_tokens += len(rows)
        self._batch_sizes[min(len(rows), len(self._batch_sizes) - 1)] += 1
        now = time.perf_counter()
        keep = [i for i, (row, token) in enumerate(zip(rows, tokens, strict=True)) if self._step_row(row, token, now)]
        if len(keep) < len(rows):
            try:
                batch.keep(keep)
            except BaseException as exc:  # noqa: BLE001  # the batch's state is unknown: re-run its rows
                self._running = [rows[i] for i in keep]
                self._step_failed(exc)
                return
            rows = [rows[i] for i in keep]
            self._running = rows
        if not rows:
            self._batch = None
            return
        try:
            batch.step([row.tokens[-1] for row in rows])
        except BaseException as exc:  # noqa: BLE001
            self._step_failed(exc)
            return
        self.decode_steps += 1

    def _bitmask(self, grammars: GrammarCompiler, rows: int) -> torch.Tensor:
        """The grammar-mask buffer for ``rows`` rows, allocated once for the largest batch seen."""
        if self._masks is None or self._masks.shape[0] < rows:
            self._masks = grammars.allocate(max(rows, self.limits.max_batch_size))
        return self._masks[:rows]

    def _step_failed(self, exc: BaseException) -> None:
        """A decode step failed: one row fails; several are re-run each on its own, so only the culprit fails."""
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise exc
        rows = [row for row in self._running if row.handle.pending]
        self._running, self._batch = [], None
        if isinstance(exc, torch.OutOfMemoryError):
            failure: Phi3VToolsError = _out_of_memory(len(rows[0].ids) if rows else 0)
            logger.warning("out of memory with a batch of %d", len(rows))
        else:
            logger.error("a decoding step failed for a batch of %d", len(rows), exc_info=exc)
            failure = GenerationError(f"internal error while generating: {exc}")
        if len(rows) == 1:
            rows[0].handle.fail(failure)
            return
        logger.warning("re-running the %d rows of the failed step each on its own", len(rows))
        for row in reversed(rows):
            row.isolated = True
            row.restart()
            self._waiting.appendleft(row)
        with self._pending_lock:
            self._pending += len(rows)

    def _step_row(self, row: Row, token: int, now: float) -> bool:
        """:meth:`_advance`, failing this row alone if anything in its own work goes wrong."""
        try:
            return self._advance(row, token, now)
        except Phi3VToolsError as exc:
            row.handle.fail(exc)
        except Exception as exc:  # a bug or an input nobody foresaw: this row's, not its companions'
            logger.exception("a row failed")
            row.handle.fail(GenerationError(f"internal error while generating this answer: {exc}"))
        return False

    def _advance(self, row: Row, token: int, now: float) -> bool:
        """Record ``token`` for ``row``; False when the row is done (its future then holds the outcome)."""
        handle = row.handle
        if token == SAMPLING_FAILED:
            raise GenerationError("sampling this answer's next token failed; retry, or use another temperature")
        if handle.cancelled:
            handle.fail(CancelledError("the request was cancelled"))
            return False
        if now > handle.deadline:
            handle.fail(RequestTimeoutError(f"the request timed out after {len(row.tokens)} new tokens"))
            return False
        if not row.tokens:
            row.first_token_at = now
        row.last_token_at = now
        constraint = row.constraint
        stop = token in self.stop_ids
        if constraint is not None:
            if token < 0:
                problem = constraint.error or "no token can continue the answer"
                raise GenerationError(f"the output schema's grammar stopped this answer: {problem}")
            constraint.consume(token)
            stop = constraint.finished
        if not (stop and token in self.stop_ids):
            row.tokens.append(token)
            stop = stop or output.hit_stop(row, self._text)
        if handle.request.on_text is not None:
            output.stream(row, self._text)
        if stop:
            self._finish(row, "stop")
            return False
        if len(row.tokens) >= handle.max_new_tokens:
            self._finish(row, "length")
            return False
        return True

    def _text(self, tokens: list[int]) -> str:
        return str(self.processor.tokenizer.decode(tokens, skip_special_tokens=True))

    # -- output (output threads) --------------------------------------------------------------------------------------

    def _finish(self, row: Row, reason: FinishReason) -> None:
        """Hand a finished row to the output threads: its result is made there, not on the step loop."""
        row.handle.finishing = True
        try:
            self._outputs.submit(self._output, row, reason)
        except RuntimeError:  # the engine is closing
            row.handle.fail(CancelledError("the runner was closed"))

    def _output(self, row: Row, reason: FinishReason) -> None:
        handle = row.handle
        try:
            result = self._result(row, reason)
            output.flush(row, result.text)
            handle.finish(result)
        except Phi3VToolsError as exc:
            handle.fail(exc)
        except Exception as exc:  # also RecursionError, MemoryError...: this answer fails, nothing else
            logger.exception("making a result failed")
            handle.fail(GenerationError(f"internal error while reading the model's answer: {exc}"))

    def _result(self, row: Row, reason: FinishReason) -> GenerationResult:
        return output.make_result(row, reason, self._text)

    def _fail_all(self, error: Phi3VToolsError, *, waiting: bool = True) -> None:
        """Fail every request not yet answered (closing), or with ``waiting=False`` the admitted ones only (a step
        loop failure outside any row: the waiting requests took no part in it)."""
        with self._fail_lock:
            queued: list[Row] = []
            if waiting:
                queued = list(self._waiting)
                while True:
                    try:
                        queued.append(self._intake.get_nowait())
                    except queue.Empty:
                        break
                self._waiting = deque()
                self._unpend(len(queued))
            rows = [*queued, *self._prefilling, *self._running]
            self._prefilling, self._running, self._batch = [], [], None
            for row in rows:
                if row.handle.pending:
                    row.handle.fail(error)


def default_feature_cache_mb(device_type: str, free_bytes: int | None) -> int:
    """512 MB on the CPU; on a GPU 2 GB, or a quarter of what is free after loading if less (an 8 GB card
    running int8 keeps room for its KV cache: about 0.7 GB)."""
    if device_type != "cuda":
        return 512
    return int(min(2048, (free_bytes or 0) / 4 / 2**20))


def _out_of_memory(prompt_tokens: int) -> OutOfMemoryError:
    """The error for a request that ran out of accelerator memory (the allocator's cache is emptied first)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return OutOfMemoryError(
        f"out of accelerator memory for one request ({prompt_tokens} prompt tokens); use fewer images, a smaller "
        "num_crops or a smaller max_new_tokens"
    )


# Every live engine is closed at interpreter exit: its step loop must not be inside torch while the
# interpreter tears down (that aborted the process: "terminate called without an active exception").
_LIVE: weakref.WeakSet[Engine] = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    for engine in list(_LIVE):
        with contextlib.suppress(Exception):
            engine.close(timeout=10.0)
