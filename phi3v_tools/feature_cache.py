"""Projected image features cached by content, so chained calls on the same picture skip the vision tower.

Keys are the sha256 of the decoded RGB pixels (with the size), plus ``num_crops`` and the model identity:
the same picture sent as PNG, as JPEG-decoded-identically, or by handle hits; a different crop count or
model never does. The cache is an LRU bounded in bytes of the stored feature tensors.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from phi3v_tools.digests import image_digest as image_digest  # re-exported: it lives in phi3v_tools.digests


@dataclass(frozen=True)
class CachedFeatures:
    features: torch.Tensor  # [image tokens, hidden], on the model's device
    grid: tuple[int, int]  # crop grid (rows, columns)

    @property
    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size()


class FeatureCache:
    """A thread-safe LRU of :class:`CachedFeatures`, bounded by ``max_bytes`` (0 disables it)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, CachedFeatures] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @staticmethod
    def key(digest: str, num_crops: int, model_id: str) -> str:
        return f"{model_id}|crops={num_crops}|{digest}"

    def get(self, key: str) -> CachedFeatures | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: str, entry: CachedFeatures) -> None:
        if entry.nbytes > self.max_bytes:
            return  # larger than the whole cache: not worth evicting everything for
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._entries[key] = entry
            self._bytes += entry.nbytes
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
                self.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "entries": len(self._entries),
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
            }
