"""Model names and the cache directory: plain constants, no torch (settings and the CLI read them).

Re-exported by :mod:`phi3v_tools.model.checkpoint`, which uses them.
"""

from __future__ import annotations

import difflib
from pathlib import Path

__all__ = ["DEFAULT_CACHE_DIR", "DEFAULT_MODEL_ID", "KNOWN_MODEL_IDS", "TINY_MODEL_ID", "did_you_mean"]

DEFAULT_MODEL_ID = "microsoft/Phi-3-vision-128k-instruct"
TINY_MODEL_ID = "tiny"  # the package's own tiny random checkpoint, built on first use (tests, offline demo)
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "phi3v-tools"
PHI35_MODEL_ID = "microsoft/Phi-3.5-vision-instruct"
KNOWN_MODEL_IDS = (TINY_MODEL_ID, DEFAULT_MODEL_ID, PHI35_MODEL_ID)


def did_you_mean(name: str) -> str:
    """`` Did you mean 'tiny'?`` when ``name`` looks like a misspelt known model id (case aside), else ``""``."""
    by_lower = {known.lower(): known for known in KNOWN_MODEL_IDS}
    close = difflib.get_close_matches(name.strip().lower(), list(by_lower), n=1, cutoff=0.6)
    if not close or by_lower[close[0]] == name:
        return ""
    return f" Did you mean {by_lower[close[0]]!r}?"
