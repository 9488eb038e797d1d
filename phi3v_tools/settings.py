"""Runtime settings: one object, filled at the edges (CLI flags, server start-up) from ``PHI3V_*`` variables.

Nothing below the edges reads ``os.environ``; it receives a :class:`Settings`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from phi3v_tools.model.checkpoint import DEFAULT_CACHE_DIR, DEFAULT_MODEL_ID

ENV_PREFIX = "PHI3V_"


@dataclass(frozen=True)
class Settings:
    """How to load and run the model. Field ``x`` is read from ``PHI3V_X`` by :meth:`from_env`."""

    model: str = DEFAULT_MODEL_ID  # checkpoint directory, hub id, or "tiny"
    device: str | None = None  # "cuda", "cuda:1", "cpu"; None: CUDA when available
    dtype: str | None = None  # "bfloat16", "float32", "auto"; None: bf16 on CUDA, fp32 on CPU
    attn_implementation: str | None = None  # "sdpa", "flash_attention_2", "eager"; None: best available
    num_crops: int | None = None  # None: the checkpoint's default (16 for Phi-3, 4 for Phi-3.5)
    cache_dir: Path = field(default=DEFAULT_CACHE_DIR)  # where the tiny checkpoint is written

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``PHI3V_*`` variables, then ``overrides`` (non-None values, e.g. CLI flags) on top."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            if f.name == "num_crops":
                try:
                    values[f.name] = int(raw)
                except ValueError:
                    raise ValueError(f"{ENV_PREFIX}NUM_CROPS must be an integer, got {raw!r}") from None
            elif f.name == "cache_dir":
                values[f.name] = Path(raw).expanduser()
            else:
                values[f.name] = raw
        settings = cls(**values)
        return replace(settings, **{k: v for k, v in overrides.items() if v is not None})
