"""The vision stage of an engine step: the uncached images of admitted rows, encoded together.

Images of all rows being prefilled are encoded in one vision-tower batch per crop count, at most
``max_images`` a step (a step never stalls running rows for more than one bounded vision chunk). An
image encoded meanwhile for another request is taken from the feature cache, and an image shared by
several rows of the step is encoded once. When a batch fails, each request's images are encoded on their
own, so only the request a failure comes from fails.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from phi3v_tools.engine.row import Row
from phi3v_tools.feature_cache import CachedFeatures, FeatureCache
from phi3v_tools.model.image_processing import CROP_SIZE
from phi3v_tools.model.modeling import Phi3VForCausalLM

logger = logging.getLogger(__name__)


def encode_images(
    model: Phi3VForCausalLM, pixels: Sequence[torch.Tensor], sizes: Sequence[tuple[int, int]]
) -> list[torch.Tensor]:
    """Projected features of images processed with one ``num_crops`` (``pixels`` of one shape), in one batch."""
    with torch.inference_mode():
        return model.get_image_features(torch.stack(list(pixels)), torch.tensor(list(sizes)))


class VisionStage:
    def __init__(self, model: Phi3VForCausalLM, feature_cache: FeatureCache) -> None:
        self.model = model
        self.feature_cache = feature_cache

    def run(self, rows: Sequence[Row], max_images: int) -> list[tuple[Row, Exception]]:
        """Encode what ``rows`` (oldest first) still need, within ``max_images``; the rows that failed, with why."""
        todo: list[Row] = []
        images = 0
        for row in rows:
            for i in list(row.pixels):  # encoded meanwhile for another request: reuse it
                entry = self.feature_cache.get(row.keys[i])
                if entry is not None:
                    row.entries[i] = entry
                    del row.pixels[i]
            if not row.pixels:
                continue
            if todo and images + len(row.pixels) > max_images:
                break
            todo.append(row)
            images += len(row.pixels)
        failed: list[tuple[Row, Exception]] = []
        if not todo:
            return failed
        started = time.perf_counter()
        by_shape: dict[tuple[int, ...], list[tuple[Row, int]]] = {}
        for row in todo:
            for i, (crops, _size) in row.pixels.items():
                by_shape.setdefault(tuple(crops.shape), []).append((row, i))
        for items in by_shape.values():
            owners = list({id(r): r for r, _ in items}.values())
            try:
                self._encode(items)
            except Exception as exc:  # one request's images may be the cause: encode each request's on its own
                if len(owners) == 1:
                    failed.append((owners[0], exc))
                    continue
                logger.warning("a vision batch failed; encoding its requests one by one", exc_info=True)
                for row in owners:
                    try:
                        self._encode([(r, i) for r, i in items if r is row])
                    except Exception as row_exc:
                        failed.append((row, row_exc))
        elapsed = time.perf_counter() - started
        for row in todo:
            row.vision_s += elapsed
        return failed

    def _encode(self, items: list[tuple[Row, int]]) -> None:
        unique: dict[str, tuple[torch.Tensor, tuple[int, int]]] = {}
        for row, i in items:
            unique.setdefault(row.keys[i], row.pixels[i])
        keys = list(unique)
        features = encode_images(self.model, [unique[k][0] for k in keys], [unique[k][1] for k in keys])
        made = {}
        for key, feature in zip(keys, features, strict=True):
            hd_h, hd_w = unique[key][1]
            made[key] = CachedFeatures(feature, (hd_h // CROP_SIZE, hd_w // CROP_SIZE))
            self.feature_cache.put(key, made[key])
        for row, i in items:
            row.entries[i] = made[row.keys[i]]
            row.pixels.pop(i, None)
