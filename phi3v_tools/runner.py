"""The documented engine names, and one engine per model per process.

The engine itself lives in :mod:`phi3v_tools.engine` (types, scheduler, model runner, sampler, output,
core). This module keeps the public names the README and users' code rely on:
``GenerationRequest``, ``GenerationResult``, ``get_runner(settings)``, ``runner.generate`` /
``generate_sync`` / ``stream`` / ``submit`` and ``RequestHandle.cancel()``.

``get_runner`` keys engines by what loads the model (:class:`~phi3v_tools.settings.ModelConfig`: model,
device, dtype, attention, cache directory). Callers whose settings differ only in the image policy, the
server's fields or the engine's limits share one engine: **the first caller's engine limits win** (batch
size, queue, timeouts, KV and feature-cache sizes, default num_crops), and a later caller asking for
other limits gets a warning in the log naming them, never a second copy of the model.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import fields

from phi3v_tools.errors import require_local

require_local()  # a tools-only install (no torch): one line saying what to install, before the imports below fail

from phi3v_tools.engine.core import Engine, TextStream, load_pretrained  # noqa: E402
from phi3v_tools.engine.output import TextDeltas  # noqa: E402
from phi3v_tools.engine.types import (  # noqa: E402
    DEFAULT_MAX_NEW_TOKENS,
    WATCHDOG_GRACE_S,
    Backend,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    RequestHandle,
    Timings,
)
from phi3v_tools.settings import ModelConfig, Settings  # noqa: E402

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "WATCHDOG_GRACE_S",
    "Backend",
    "Engine",
    "FinishReason",
    "GenerationRequest",
    "GenerationResult",
    "RequestHandle",
    "Runner",
    "TextDeltas",
    "TextStream",
    "Timings",
    "close_runners",
    "get_runner",
    "load_pretrained",
]

logger = logging.getLogger(__name__)
Runner = Engine  # the name older code uses

_RUNNERS: dict[ModelConfig, Runner] = {}
_RUNNERS_LOCK = threading.Lock()  # guards the two dicts; never held while a model loads
_LOADING: dict[ModelConfig, threading.Lock] = {}  # one lock per model being loaded


def get_runner(settings: Settings, *, progress: bool = True) -> Runner:
    """The process's engine for the model ``settings`` name: loaded on first use, then shared by every caller.

    A model that is loading makes only the callers of that model wait: others, and ``close_runners``, go on.
    """
    key = settings.model_config()
    runner = _live(key)
    if runner is None:
        with _RUNNERS_LOCK:
            loading = _LOADING.setdefault(key, threading.Lock())
        with loading:
            runner = _live(key)  # another caller may have loaded it meanwhile
            if runner is None:
                runner = Runner.load(settings, progress=progress)
                with _RUNNERS_LOCK:
                    _RUNNERS[key] = runner
                return runner
    _warn_if_other_limits(runner, settings)
    return runner


def _live(key: ModelConfig) -> Runner | None:
    with _RUNNERS_LOCK:
        runner = _RUNNERS.get(key)
        if runner is not None and getattr(runner, "closed", False):  # closed by its owner: load a fresh one
            del _RUNNERS[key]
            return None
        return runner


def _warn_if_other_limits(runner: Runner, settings: Settings) -> None:
    theirs = getattr(runner, "limits", None)
    if theirs is None:
        return
    mine = settings.engine_limits()
    differ = [f.name for f in fields(mine) if getattr(mine, f.name) != getattr(theirs, f.name)]
    if differ:
        logger.warning(
            "the engine for %s is already running with other limits (%s); the first caller's limits are kept",
            settings.model,
            ", ".join(differ),
        )


def close_runners() -> None:
    with _RUNNERS_LOCK:
        runners = list(_RUNNERS.values())
        _RUNNERS.clear()
    for runner in runners:
        runner.close()
