"""``GET /metrics`` for ``phi3v-tools serve``: Prometheus text, made by ``prometheus_client`` (the ``serve``
extra) rather than by hand, so names, types, escaping and the exposition format are the library's.

Each server keeps its own registry (two apps in one process, as in the tests, do not share counters). What it
holds:

- **HTTP**, for every path: ``phi3v_http_requests_total{surface, code}`` (surface ``openai``, ``mcp`` or
  ``other``; the code the client got, 401 and 421 included).
- **Chat completions**, observed on each answer: ``phi3v_request_success_total{finish_reason, stream}``,
  ``phi3v_request_failure_total{type}`` (the OpenAI error type), the histograms
  ``phi3v_e2e_request_latency_seconds`` (request in -> answer out, image loading included),
  ``phi3v_time_to_first_token_seconds`` and ``phi3v_request_queue_time_seconds`` (the engine's timings), and
  the counters ``phi3v_prompt_tokens_total``, ``phi3v_generation_tokens_total`` and
  ``phi3v_cached_images_total``.
- **The engine**, read from the backend's ``info()`` at each scrape (plain numbers: nothing here imports
  torch), so MCP tool calls count as much as OpenAI requests: ``phi3v_num_requests_waiting``,
  ``phi3v_num_requests_prefilling``, ``phi3v_num_requests_running``, ``phi3v_max_queue``,
  ``phi3v_kv_budget_tokens``, ``phi3v_decode_steps_total``, ``phi3v_batch_size`` (a histogram: decode steps by
  rows decoded), ``phi3v_batches_total``, ``phi3v_batch_joins_total``, ``phi3v_engine_prompt_tokens_total``,
  ``phi3v_engine_sampled_tokens_total`` and the feature cache's ``phi3v_feature_cache_{hits,misses,
  evictions}_total``, ``phi3v_feature_cache_bytes``, ``phi3v_feature_cache_max_bytes`` and
  ``phi3v_feature_cache_entries``.
- The process (CPU seconds, resident memory, open files) from the library's own collectors.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from phi3v_tools.errors import OptionalDependencyError

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from phi3v_tools.engine.types import GenerationResult

__all__ = ["CountResponses", "Metrics", "metrics_or_none", "surface_of"]

logger = logging.getLogger("phi3v_tools.serving")

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 60.0)


# The engine's numbers in info(): where, the metric's name, its kind and its help text.
ENGINE_NUMBERS = (
    (
        ("queue",),
        "phi3v_num_requests_waiting",
        "gauge",
        "Requests submitted and not yet admitted (preparing or waiting)",
    ),
    (("prefilling",), "phi3v_num_requests_prefilling", "gauge", "Requests admitted whose prompts are being prefilled"),
    (("running",), "phi3v_num_requests_running", "gauge", "Requests in the running (decoding) batch"),
    (("max_queue",), "phi3v_max_queue", "gauge", "Requests the engine holds before it answers 429"),
    (("kv_budget_tokens",), "phi3v_kv_budget_tokens", "gauge", "Tokens of KV cache the scheduler admits rows into"),
    (("decode_steps",), "phi3v_decode_steps", "counter", "Decode forward passes"),
    (("batches",), "phi3v_batches", "counter", "Times the running batch started from empty"),
    (("joins",), "phi3v_batch_joins", "counter", "Requests that joined a running batch"),
    (
        ("prompt_tokens",),
        "phi3v_engine_prompt_tokens",
        "counter",
        "Prompt tokens admitted by the engine (all surfaces)",
    ),
    (("sampled_tokens",), "phi3v_engine_sampled_tokens", "counter", "Tokens chosen by decode steps (all surfaces)"),
    (("feature_cache", "hits"), "phi3v_feature_cache_hits", "counter", "Images whose features the cache held"),
    (("feature_cache", "misses"), "phi3v_feature_cache_misses", "counter", "Images encoded by the vision tower"),
    (("feature_cache", "evictions"), "phi3v_feature_cache_evictions", "counter", "Features evicted from the cache"),
    (("feature_cache", "bytes"), "phi3v_feature_cache_bytes", "gauge", "Bytes of features the cache holds"),
    (("feature_cache", "max_bytes"), "phi3v_feature_cache_max_bytes", "gauge", "The feature cache's size limit"),
    (("feature_cache", "entries"), "phi3v_feature_cache_entries", "gauge", "Images whose features the cache holds"),
)


def missing() -> OptionalDependencyError:
    return OptionalDependencyError("prometheus-client", "serve", "The /metrics endpoint", alone=True)


def metrics_or_none(info: Callable[[], Mapping[str, Any] | None]) -> Metrics | None:
    """A :class:`Metrics` reading the engine through ``info``, or None (and a warning) without the library:
    the server then serves everything but ``/metrics``, which says what to install."""
    try:
        return Metrics(info)
    except OptionalDependencyError as exc:
        logger.warning("GET /metrics is off: %s", exc)
        return None


def surface_of(path: str) -> str:
    if path == "/mcp" or path.startswith("/mcp/"):
        return "mcp"
    if path.startswith("/v1/"):
        return "openai"
    return "other"


class Metrics:
    """One server's metrics in one registry; ``info`` gives the engine's numbers (None: not loaded yet)."""

    def __init__(self, info: Callable[[], Mapping[str, Any] | None]) -> None:
        try:
            import prometheus_client as prom
        except ImportError:
            raise missing() from None
        self.registry = prom.CollectorRegistry()
        prom.ProcessCollector(registry=self.registry)
        prom.PlatformCollector(registry=self.registry)
        counter = functools.partial(prom.Counter, registry=self.registry)
        histogram = functools.partial(prom.Histogram, registry=self.registry)
        self.http_requests = counter(
            "phi3v_http_requests",
            "HTTP requests answered, by surface and status code",
            ["surface", "code"],
        )
        self.success = counter(
            "phi3v_request_success",
            "Chat completions answered, by finish reason and streaming",
            ["finish_reason", "stream"],
        )
        self.failure = counter(
            "phi3v_request_failure",
            "Chat completions that failed, by OpenAI error type",
            ["type"],
        )
        self.latency = histogram(
            "phi3v_e2e_request_latency_seconds",
            "Chat completion latency, request in to answer out",
            buckets=LATENCY_BUCKETS,
        )
        self.first_token = histogram(
            "phi3v_time_to_first_token_seconds",
            "Submitted to the engine -> first new token",
            buckets=FIRST_TOKEN_BUCKETS,
        )
        self.queue_time = histogram(
            "phi3v_request_queue_time_seconds",
            "Submitted to the engine -> admitted to the running batch",
            buckets=FIRST_TOKEN_BUCKETS,
        )
        self.prompt_tokens = counter("phi3v_prompt_tokens", "Prompt tokens of answered chat completions")
        self.generation_tokens = counter("phi3v_generation_tokens", "Completion tokens of answered chat completions")
        self.cached_images = counter(
            "phi3v_cached_images", "Images whose features came from the engine's feature cache"
        )
        self.registry.register(_EngineCollector(info))

    def answered(self, result: GenerationResult, *, stream: bool, seconds: float) -> None:
        self.success.labels(result.finish_reason, "true" if stream else "false").inc()
        self.latency.observe(seconds)
        timings = result.timings
        if timings.first_token_s > 0:
            self.first_token.observe(timings.first_token_s)
        self.queue_time.observe(timings.queue_s)
        self.prompt_tokens.inc(result.prompt_tokens)
        self.generation_tokens.inc(result.completion_tokens)
        self.cached_images.inc(result.cached_images)

    def failed(self, kind: str) -> None:
        self.failure.labels(kind).inc()

    def responded(self, path: str, status: int) -> None:
        self.http_requests.labels(surface_of(path), str(status)).inc()

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The scrape's body and content type (OpenMetrics when the scraper asks for it)."""
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class CountResponses:
    """Counts every HTTP response by surface and status code (outermost, so refusals by the guards count)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.responded(scope.get("path", ""), int(message["status"]))
            await send(message)

        await self.app(scope, receive, counting)


class _EngineCollector:
    """The engine's numbers at scrape time, from ``info()``: the engine counts in plain integers on its own
    thread, and only a scrape turns them into metrics."""

    def __init__(self, info: Callable[[], Mapping[str, Any] | None]) -> None:
        self._info = info

    def describe(self) -> list[Metric]:
        return []  # names are not known before the engine loads; nothing to check for clashes

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        try:
            info = self._info()
        except Exception:  # a scrape must not fail because the engine is closing
            logger.debug("reading the engine's numbers for /metrics failed", exc_info=True)
            return
        if not info:
            return
        for where, name, kind, text in ENGINE_NUMBERS:
            number: Any = info
            for key in where:
                number = number.get(key) if isinstance(number, Mapping) else None
            if isinstance(number, int | float):
                family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                yield family(name, text, value=number)
        sizes = info.get("decode_batch_sizes")
        if isinstance(sizes, Mapping):
            yield _batch_histogram(HistogramMetricFamily, {int(rows): int(n) for rows, n in sizes.items()})


def _batch_histogram(family: Any, steps: Mapping[int, int]) -> Metric:
    """Decode steps by rows decoded, as a histogram with power-of-two buckets up to the largest size seen."""
    largest = max(steps, default=1)
    bounds, bound = [], 1
    while bound < largest:
        bounds.append(bound)
        bound *= 2
    bounds.append(bound)
    buckets = [(str(float(b)), sum(n for rows, n in steps.items() if rows <= b)) for b in bounds]
    buckets.append(("+Inf", sum(steps.values())))
    total = sum(rows * n for rows, n in steps.items())
    text = "Decode steps by the number of rows they decoded"
    metric: Metric = family("phi3v_batch_size", text, buckets=buckets, sum_value=total)
    return metric
