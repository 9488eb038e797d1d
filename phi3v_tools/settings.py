"""Runtime settings: one object, filled at the edges (CLI flags, server start-up) from ``PHI3V_*`` variables.

Nothing below the edges reads ``os.environ``; it receives a :class:`Settings`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from phi3v_tools.documents import DocumentPolicy
from phi3v_tools.images import ImagePolicy
from phi3v_tools.model.names import DEFAULT_CACHE_DIR, DEFAULT_MODEL_ID
from phi3v_tools.structured import SchemaLimits

ENV_PREFIX = "PHI3V_"
DEVICE = re.compile(r"^(cpu|mps|auto|cuda(:[0-9]+)?)$")
DTYPES = ("bfloat16", "float16", "float32", "auto")
ATTENTION = ("sdpa", "flash_attention_2", "eager")
BACKENDS = ("local", "openai")
QUANTIZATION = ("int8", "int4")  # phi3v_tools.model.quantize.MODES (that module imports torch; this one must not)


@dataclass(frozen=True)
class ModelConfig:
    """What loads the model: the key of the process's one engine per model (see ``runner.get_runner``)."""

    model: str
    device: str | None = None
    dtype: str | None = None
    attn_implementation: str | None = None
    cache_dir: Path = field(default=DEFAULT_CACHE_DIR)
    quantization: str | None = None

    def __post_init__(self) -> None:
        """The choices are checked here, at the edge, so that a typo fails at start and not at the first call."""
        if self.device is not None and not DEVICE.match(self.device):
            raise ValueError(f"PHI3V_DEVICE must be cpu, cuda, cuda:N, mps or auto, got {self.device!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"PHI3V_DTYPE must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.attn_implementation is not None and self.attn_implementation not in ATTENTION:
            raise ValueError(
                f"PHI3V_ATTN_IMPLEMENTATION must be one of {', '.join(ATTENTION)}, got {self.attn_implementation!r}"
            )
        if self.quantization is not None and self.quantization not in QUANTIZATION:
            raise ValueError(
                f"PHI3V_QUANTIZATION must be one of {', '.join(QUANTIZATION)} (or unset), got {self.quantization!r}"
            )


@dataclass(frozen=True)
class EngineLimits:
    """How the engine serves: batching, queue, budgets, timeouts, caches. Not part of what loads the model."""

    num_crops: int | None = None  # default crops per image; None: the checkpoint's (16 for Phi-3, 4 for Phi-3.5)
    batch_window_ms: float = 5.0
    max_batch_size: int = 32
    max_batch_tokens: int | None = None  # None: what memory holds (engine.scheduler.kv_budget_tokens)
    prefill_chunk_tokens: int = 2048
    max_step_images: int = 8
    max_queue: int = 64
    max_images: int = 8
    max_new_tokens: int = 1024
    max_context: int = 4096
    request_timeout_s: float = 300.0
    feature_cache_mb: int | None = None
    max_prompt_chars: int = 32768
    max_schema_bytes: int = 16384
    max_schema_string: int = 2000

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_batch_tokens", "prefill_chunk_tokens", "max_step_images", "max_queue"):
            value = getattr(self, name)
            if value is None and name == "max_batch_tokens":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PHI3V_{name.upper()} must be a whole number of at least 1, got {value!r}")

    def schema_limits(self) -> SchemaLimits:
        return SchemaLimits(max_bytes=self.max_schema_bytes, max_string=self.max_schema_string)


@dataclass(frozen=True)
class Settings:
    """How to load and run the model. Field ``x`` is read from ``PHI3V_X`` by :meth:`from_env`."""

    model: str = DEFAULT_MODEL_ID  # checkpoint directory, hub id, or "tiny"
    # Where the tools' model runs: "local" (this process's engine) or "openai" (an OpenAI-compatible server at
    # base_url: phi3v-tools serve, vLLM, ...; this process then imports no torch).
    backend: str = "local"
    base_url: str | None = None  # e.g. http://gpu-box:8000/v1
    api_key: str | None = field(default=None, repr=False)  # sent as "Authorization: Bearer <key>" to base_url
    remote_model: str | None = None  # None: the first id that base_url's /v1/models lists
    remote_timeout_s: float = 330.0  # the longest wait for the server's next bytes (it may take request_timeout_s)
    remote_max_in_flight: int = 64  # calls sent to base_url at once; more wait for a connection
    device: str | None = None  # "cuda", "cuda:1", "cpu"; None: CUDA when available
    dtype: str | None = None  # "bfloat16", "float32", "auto"; None: bf16 on CUDA, fp16 on MPS, fp32 on CPU
    attn_implementation: str | None = None  # "sdpa", "flash_attention_2", "eager"; None: best available
    quantization: str | None = None  # "int8", "int4": the language model's decoder linears; None: all in dtype
    cpu_threads: int | None = None  # torch's intra-op threads (process-wide: a CPU model's matmuls); None: torch's
    num_crops: int | None = None  # None: the checkpoint's default (16 for Phi-3, 4 for Phi-3.5)
    cache_dir: Path = field(default=DEFAULT_CACHE_DIR)  # where the tiny checkpoint is written
    # The runner (phi3v_tools.runner): batching, limits, the image-feature cache.
    batch_window_ms: float = 5.0  # an idle engine waits this long for company before it starts a batch
    max_batch_size: int = 32  # requests decoded together (rows of the running batch); the KV budget bounds memory
    # KV cache bound in tokens: rows x the longest row's prompt + max_new_tokens (padded). None: what memory
    # holds, 40 % of the memory free after loading (at most 4 GiB on CPU/MPS), at most max_batch_size full contexts
    max_batch_tokens: int | None = None
    prefill_chunk_tokens: int = 2048  # prompt tokens prefilled per engine step; running rows wait at most this
    max_step_images: int = 8  # images the vision tower encodes per engine step
    max_queue: int = 64  # waiting requests; beyond that a request is refused at once with BusyError
    max_images: int = 8  # images per request
    max_new_tokens: int = 1024  # upper bound a request may ask for
    max_context: int = 4096  # prompt + new tokens; above 4096 LongRoPE switches factors (see the README)
    request_timeout_s: float = 300.0  # waiting + running
    feature_cache_mb: int | None = None  # None: 2048 on CUDA (at most a quarter of what is free), 512 on CPU
    max_prompt_chars: int = 32768  # characters in all messages of a request, checked before tokenizing
    max_schema_bytes: int = 16384  # a caller's output schema as compact JSON
    max_schema_string: int = 2000  # characters in any one key or string of a caller's output schema
    # Image references (phi3v_tools.images): what the tools may read.
    allowed_dirs: tuple[Path, ...] = ()  # local paths allowed under these; () = the working directory
    allow_urls: bool = True  # fetch http(s) URLs (public addresses only)
    max_image_mb: float = 20.0
    max_image_pixels: int = 40_000_000
    url_timeout_s: float = 15.0
    max_compare: int = 4  # images per compare_images / ask_images call
    image_store_mb: float = 512.0  # decoded pixels kept for image://sha256/ handles (RGB, 3 bytes a pixel)
    # Handles on disk as well (content-addressed PNGs, LRU, 0600): they then outlive the process and are shared by
    # every process using the directory. None: in memory only (servers); the CLI uses <cache_dir>/images.
    image_store_dir: Path | None = None
    image_store_disk_mb: float = 1024.0  # MiB of PNG files kept in image_store_dir; 0: none (handles in memory only)
    # PDF documents (phi3v_tools.documents, the ``pdf`` extra): each is rendered in a worker process under these.
    pdf_max_pages: int = 10  # pages one call reads; the default selection is the first this many
    pdf_max_mb: float = 50.0  # the file
    pdf_max_page_pixels: int = 16 * 336 * 336  # a drawn page (what the HD transform takes at 16 crops)
    pdf_max_dpi: float = 300.0  # a small page is drawn at most this sharp
    pdf_timeout_s: float = 30.0  # one document, wall clock; the worker is killed after it
    pdf_memory_mb: int = 1024  # the worker's address space
    pdf_text_layer: bool = True  # use a page's real (painted) text layer as it is, instead of OCR
    pdf_workers: int = 2  # documents rendered at once
    # phi3v-tools serve (phi3v_tools.serving): the OpenAI-compatible API and /mcp in one HTTP server. Its
    # connection limits, body limit, grace period and token are the MCP HTTP server's (mcp_* below).
    serve_host: str = "127.0.0.1"
    serve_port: int = 8000
    served_model_name: str | None = None  # the id /v1/models lists and answers carry; None: ``model`` as given
    # Replicas on Ray Serve (phi3v_tools.serving.ray, the ``ray`` extra; ReplicaPolicy below), one engine each.
    replicas: int | None = None  # None: serve from this process, no Ray; N: N replicas (the start when autoscaling)
    min_replicas: int | None = None  # with max_replicas: autoscale between the two; None: 1
    max_replicas: int | None = None  # None: a fixed number of replicas (``replicas``)
    target_ongoing_requests: float | None = None  # autoscaling's aim per replica; None: half of max_batch_size
    upscale_delay_s: float = 30.0  # load above the target this long adds replicas
    downscale_delay_s: float = 600.0  # load below it this long removes them
    replica_cpus: float = 1.0  # Ray CPUs a replica takes (Ray sets its OMP_NUM_THREADS to match)
    replica_gpus: float | None = None  # None: one GPU a replica when Ray sees GPUs, none otherwise
    health_check_period_s: float = 10.0  # each replica checks that its engine generates this often
    health_check_timeout_s: float = 30.0  # a check that takes longer fails (three failures: the replica is replaced)
    # Send repeats of an image to one replica (Ray Serve's experimental consistent-hash router, keyed by the digest
    # the remote backend sends in x-session-id), so they find its feature cache; off: the least-loaded of two.
    route_by_image: bool = False
    ray_address: str | None = None  # None: start a local Ray (phi3v-tools serve); "auto" or host:port: a cluster's
    # The MCP server (servers/phi3v_mcp).
    mcp_host: str = "127.0.0.1"  # streamable HTTP binds here; anything else is a deliberate choice
    mcp_port: int = 8765
    # Host names HTTP requests may name besides loopback and this machine's (DNS-rebinding protection); "*": any.
    mcp_allowed_hosts: tuple[str, ...] = ()
    # When set, HTTP clients must send "Authorization: Bearer <token>".
    mcp_token: str | None = field(default=None, repr=False)
    mcp_max_body_mb: float = 40.0  # largest HTTP request body (base64 images are ~4/3 of their file size)
    mcp_shutdown_grace_s: float = 10.0  # on SIGTERM/Ctrl-C, in-flight HTTP calls get this long to finish
    mcp_max_sessions: int = 100  # open MCP sessions (pre-2026 handshake); beyond that the longest-idle one goes
    mcp_session_idle_s: float = 600.0  # a session with no request for this long is closed
    mcp_max_connections: int = 200  # open HTTP connections; beyond that new ones are refused at once
    mcp_header_timeout_s: float = 10.0  # a request's headers must arrive within this, from connect or last answer
    mcp_body_timeout_s: float = 60.0  # a request's body must arrive within this, from its headers
    mcp_keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    # No MCP sessions: every HTTP request stands alone (what several replicas behind one address need, since a
    # session lives in one process). Progress still streams within a request.
    mcp_stateless: bool = False

    def __post_init__(self) -> None:
        """Every choice and number is checked here, when the settings are made: a bad value stops a command or a
        server at start with one line naming its variable, never at the first call."""
        self.model_config()
        if self.backend not in BACKENDS:
            raise ValueError(f"PHI3V_BACKEND must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.backend == "openai" and not (self.base_url or "").lower().startswith(("http://", "https://")):
            raise ValueError(
                f"PHI3V_BACKEND=openai needs PHI3V_BASE_URL, the server's http(s) URL (e.g. http://gpu-box:8000/v1), "
                f"got {self.base_url!r}"
            )
        for name, bound in RANGES.items():
            bound.check(name, getattr(self, name))
        if self.max_new_tokens >= self.max_context:
            raise ValueError(
                f"PHI3V_MAX_NEW_TOKENS ({self.max_new_tokens}) must be less than PHI3V_MAX_CONTEXT "
                f"({self.max_context}): the prompt needs room too"
            )
        if self.max_replicas is not None:
            low, start = self.min_replicas or 1, self.replicas or self.min_replicas or 1
            if not low <= start <= self.max_replicas:
                raise ValueError(
                    f"PHI3V_MIN_REPLICAS ({low}) <= PHI3V_REPLICAS ({start}) <= PHI3V_MAX_REPLICAS "
                    f"({self.max_replicas}) must hold"
                )
        elif self.min_replicas is not None:
            raise ValueError("PHI3V_MIN_REPLICAS needs PHI3V_MAX_REPLICAS (autoscaling runs between the two)")
        if self.max_compare > self.max_images:
            raise ValueError(
                f"PHI3V_MAX_COMPARE ({self.max_compare}) must be at most PHI3V_MAX_IMAGES ({self.max_images}), "
                "the images one request may carry"
            )

    def schema_limits(self) -> SchemaLimits:
        return SchemaLimits(max_bytes=self.max_schema_bytes, max_string=self.max_schema_string)

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            self.model, self.device, self.dtype, self.attn_implementation, self.cache_dir, self.quantization
        )

    def engine_limits(self) -> EngineLimits:
        return EngineLimits(**{f.name: getattr(self, f.name) for f in fields(EngineLimits)})

    def replica_policy(self) -> ReplicaPolicy:
        autoscale = self.max_replicas is not None
        return ReplicaPolicy(
            replicas=self.replicas or self.min_replicas or 1,
            min_replicas=(self.min_replicas or 1) if autoscale else None,
            max_replicas=self.max_replicas,
            target_ongoing_requests=self.target_ongoing_requests or max(self.max_batch_size / 2, 1.0),
            upscale_delay_s=self.upscale_delay_s,
            downscale_delay_s=self.downscale_delay_s,
            cpus=self.replica_cpus,
            gpus=self.replica_gpus,
            health_check_period_s=self.health_check_period_s,
            health_check_timeout_s=self.health_check_timeout_s,
            route_by_image=self.route_by_image,
            ray_address=self.ray_address,
        )

    def image_policy(self) -> ImagePolicy:
        return ImagePolicy(
            allowed_dirs=self.allowed_dirs or (Path.cwd(),),
            allow_urls=self.allow_urls,
            max_bytes=int(self.max_image_mb * 2**20),
            max_pixels=self.max_image_pixels,
            url_timeout_s=self.url_timeout_s,
        )

    def document_policy(self) -> DocumentPolicy:
        return DocumentPolicy(
            max_pages=self.pdf_max_pages,
            max_bytes=int(self.pdf_max_mb * 2**20),
            max_page_pixels=self.pdf_max_page_pixels,
            max_dpi=self.pdf_max_dpi,
            timeout_s=self.pdf_timeout_s,
            memory_mb=self.pdf_memory_mb,
            text_layer=self.pdf_text_layer,
            workers=self.pdf_workers,
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``PHI3V_*`` variables, then ``overrides`` (non-None values, e.g. CLI flags) on top."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            kind = _NUMBERS.get(str(f.type))
            if kind is not None:
                try:
                    values[f.name] = kind(raw)
                except ValueError:
                    raise ValueError(
                        f"{ENV_PREFIX}{f.name.upper()} must be {RANGES[f.name].describe()}, got {raw!r}"
                    ) from None
            elif f.name in ("cache_dir", "image_store_dir"):
                values[f.name] = Path(raw).expanduser()
            elif f.name == "allowed_dirs":
                values[f.name] = tuple(Path(p).expanduser() for p in raw.split(os.pathsep) if p)
            elif f.name == "mcp_allowed_hosts":
                values[f.name] = tuple(h.strip() for h in raw.split(",") if h.strip())
            elif f.name == "quantization":
                values[f.name] = raw.lower()
            elif str(f.type) == "bool":
                if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(f"{ENV_PREFIX}{f.name.upper()} must be true or false, got {raw!r}")
                values[f.name] = raw.lower() in ("1", "true", "yes", "on")
            else:
                values[f.name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        if isinstance(values.get("quantization"), str):  # "none" (a flag overriding the variable): dense
            values["quantization"] = values["quantization"].lower()
            if values["quantization"] == "none":
                values["quantization"] = None
        # Defaults that would clash with a limit the caller lowered follow it, rather than refuse what was not set.
        context = values.get("max_context")
        if "max_new_tokens" not in values and isinstance(context, int) and context <= cls.max_new_tokens:
            values["max_new_tokens"] = max(context // 2, 1)
        images = values.get("max_images")
        if "max_compare" not in values and isinstance(images, int) and images < cls.max_compare:
            values["max_compare"] = images
        return cls(**values)


@dataclass(frozen=True)
class ReplicaPolicy:
    """How many engines run on Ray Serve, where, and how they scale (phi3v_tools.serving.ray)."""

    replicas: int  # the number at the start (and always, unless max_replicas is set)
    min_replicas: int | None  # None: no autoscaling
    max_replicas: int | None
    target_ongoing_requests: float  # per replica: requests running there plus those waiting for it
    upscale_delay_s: float
    downscale_delay_s: float
    cpus: float
    gpus: float | None  # None: decided where the cluster is known
    health_check_period_s: float
    health_check_timeout_s: float
    route_by_image: bool
    ray_address: str | None

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None

    @property
    def most(self) -> int:
        """The most replicas there can be."""
        return self.max_replicas if self.max_replicas is not None else self.replicas


@dataclass(frozen=True)
class Bound:
    """The values a number may take: ``low`` to ``high``, the low end left out when ``above`` (a time, a size)."""

    low: float
    high: float
    whole: bool = True
    above: bool = False  # low itself is not allowed

    def check(self, name: str, value: object) -> None:
        if value is None:  # unset: the documented default applies
            return
        kind_ok = isinstance(value, int) if self.whole else isinstance(value, int | float)
        if kind_ok and not isinstance(value, bool):
            number = float(value)  # type: ignore[arg-type]
            if (number > self.low if self.above else number >= self.low) and number <= self.high:
                return
        raise ValueError(f"{ENV_PREFIX}{name.upper()} must be {self.describe()}, got {value!r}")

    def describe(self) -> str:
        kind = "a whole number" if self.whole else "a number"
        low, high = (str(int(v)) if float(v).is_integer() else str(v) for v in (self.low, self.high))
        return f"{kind} above {low} and at most {high}" if self.above else f"{kind} from {low} to {high}"


_SECONDS = Bound(0, 86_400, whole=False, above=True)  # a time limit: more than nothing, at most a day
RANGES: dict[str, Bound] = {
    "num_crops": Bound(1, 16),
    "cpu_threads": Bound(1, 4096),
    "batch_window_ms": Bound(0, 1000, whole=False),
    "max_batch_size": Bound(1, 4096),
    "max_batch_tokens": Bound(1, 2**31 - 1),
    "prefill_chunk_tokens": Bound(1, 131_072),
    "max_step_images": Bound(1, 1024),
    "max_queue": Bound(1, 1_000_000),  # 0 would refuse everything; there is no "unbounded"
    "max_images": Bound(2, 64),  # compare_images takes two
    "max_new_tokens": Bound(1, 131_072),
    "max_context": Bound(64, 131_072),  # the checkpoints' 128k window
    "request_timeout_s": _SECONDS,
    "feature_cache_mb": Bound(0, 2**20),  # 0: no feature cache
    "max_prompt_chars": Bound(1, 10_000_000),
    "max_schema_bytes": Bound(2, 10_000_000),
    "max_schema_string": Bound(1, 1_000_000),
    "max_image_mb": Bound(0, 4096, whole=False, above=True),
    "max_image_pixels": Bound(1, 2**32),
    "url_timeout_s": _SECONDS,
    "max_compare": Bound(2, 64),
    "image_store_mb": Bound(0, 2**20, whole=False),  # 0: no handles kept
    "image_store_disk_mb": Bound(0, 2**24, whole=False),  # 0: no disk store, also for the CLI
    "remote_timeout_s": _SECONDS,
    "pdf_max_pages": Bound(1, 10_000),
    "pdf_max_mb": Bound(0, 4096, whole=False, above=True),
    "pdf_max_page_pixels": Bound(256, 2**28),
    "pdf_max_dpi": Bound(1, 2400, whole=False),
    "pdf_timeout_s": _SECONDS,
    "pdf_memory_mb": Bound(64, 2**20),
    "pdf_workers": Bound(1, 1024),
    "remote_max_in_flight": Bound(1, 10_000),
    "serve_port": Bound(0, 65535),
    "replicas": Bound(1, 4096),
    "min_replicas": Bound(0, 4096),  # 0: none while idle (the first request then waits for one to load)
    "max_replicas": Bound(1, 4096),
    "target_ongoing_requests": Bound(0, 1_000_000, whole=False, above=True),
    "upscale_delay_s": Bound(0, 86_400, whole=False),
    "downscale_delay_s": Bound(0, 86_400, whole=False),
    "replica_cpus": Bound(0, 4096, whole=False),
    "replica_gpus": Bound(0, 64, whole=False),
    "health_check_period_s": _SECONDS,
    "health_check_timeout_s": _SECONDS,
    "mcp_port": Bound(0, 65535),  # 0: a free port, chosen by the system
    "mcp_max_body_mb": Bound(0, 4096, whole=False, above=True),
    "mcp_shutdown_grace_s": Bound(0, 86_400, whole=False),
    "mcp_max_sessions": Bound(1, 1_000_000),
    "mcp_session_idle_s": _SECONDS,
    "mcp_max_connections": Bound(1, 1_000_000),
    "mcp_header_timeout_s": _SECONDS,
    "mcp_body_timeout_s": _SECONDS,
    "mcp_keep_alive_s": _SECONDS,
}

# Numeric fields are parsed by their annotation (a string under `from __future__ import annotations`).
_NUMBERS: dict[str, type[int] | type[float]] = {"int": int, "int | None": int, "float": float, "float | None": float}
