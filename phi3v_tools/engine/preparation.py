"""Preparing an admitted request, off the thread that drives the model.

Image hashing, feature-cache look-ups, the HD transform of uncached images, the prompt's token ids and
the grammar matcher: one request's CPU work, done on a small thread pool before the request waits for
admission. What the step loop still does for it is the model's work (vision, prefill, decode).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from phi3v_tools.engine import prompts
from phi3v_tools.engine.row import Row
from phi3v_tools.engine.sampler import RowSampling
from phi3v_tools.engine.types import RequestHandle
from phi3v_tools.errors import PromptError
from phi3v_tools.feature_cache import CachedFeatures, FeatureCache, image_digest
from phi3v_tools.grammar import GrammarCompiler
from phi3v_tools.model.image_processing import CROP_SIZE, num_image_tokens_for_grid, preprocess_image
from phi3v_tools.model.processing import Phi3VProcessor


class Preparer:
    """Turns a submitted request into a :class:`~phi3v_tools.engine.row.Row` ready for admission."""

    def __init__(
        self,
        processor: Phi3VProcessor,
        feature_cache: FeatureCache,
        model_id: str,
        grammars: Callable[[], GrammarCompiler],
        alone_above: int,
    ) -> None:
        self.processor = processor
        self.feature_cache = feature_cache
        self.model_id = model_id
        self.grammars = grammars
        self.alone_above = alone_above  # prompt + answer above this crosses the LongRoPE switch

    def prepare(self, handle: RequestHandle, default_crops: int, max_context: int) -> Row:
        request = handle.request
        num_crops = request.num_crops or default_crops
        started = time.perf_counter()
        digests = list(request.image_digests or [image_digest(image) for image in request.images])
        keys = [FeatureCache.key(d, num_crops, self.model_id) for d in digests]
        entries: list[CachedFeatures | None] = [self.feature_cache.get(key) for key in keys]
        pixels: dict[int, tuple[torch.Tensor, tuple[int, int]]] = {}
        grids: list[tuple[int, int]] = []
        for i, entry in enumerate(entries):
            if entry is not None:
                grids.append(entry.grid)
                continue
            crops, hd_h, hd_w = preprocess_image(request.images[i], num_crops)
            pixels[i] = (crops, (hd_h, hd_w))
            grids.append((hd_h // CROP_SIZE, hd_w // CROP_SIZE))
        preprocess_s = time.perf_counter() - started
        tokens = [num_image_tokens_for_grid(*grid) for grid in grids]
        messages = prompts.prompt_messages(request, handle.schema)
        ids = self.processor.chat_ids(messages, tokens)  # contents are text: no caller writes control tokens
        if len(ids) + handle.max_new_tokens > max_context:
            raise PromptError(
                f"the prompt takes {len(ids)} tokens ({sum(tokens)} for images) and max_new_tokens is "
                f"{request.max_new_tokens}: more than the {max_context}-token limit; use fewer or "
                "smaller-num_crops images, or a shorter answer"
            )
        constraint = self.grammars().matcher(handle.schema.bounded) if handle.schema is not None else None
        return Row(
            handle=handle,
            ids=ids,
            keys=keys,
            entries=entries,
            pixels=pixels,
            image_tokens=sum(tokens),
            cached_images=len(entries) - len(pixels),
            preprocess_s=preprocess_s,
            constraint=constraint,
            sampling=RowSampling(request.temperature, request.top_p, handle.seed),
            alone_above=self.alone_above,
        )
