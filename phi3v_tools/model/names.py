"""Model names and the cache directory: plain constants, no torch (settings and the CLI read them).

Re-exported by :mod:`phi3v_tools.model.checkpoint`, which uses them.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEFAULT_CACHE_DIR", "DEFAULT_MODEL_ID", "TINY_MODEL_ID"]

DEFAULT_MODEL_ID = "microsoft/Phi-3-vision-128k-instruct"
TINY_MODEL_ID = "tiny"  # the package's own tiny random checkpoint, built on first use (tests, offline demo)
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "phi3v-tools"
