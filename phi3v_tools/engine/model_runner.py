"""The model side of the engine: loading, chunked prefill, the running batch's decode step, its KV memory.

KV layout: **left-padded rows merged into one running batch** (transformers' ``DynamicCache`` tensors,
``[rows, heads, length, head_dim]`` per layer, with a ``[rows, length]`` attention mask).

- A long prompt is prefilled on its own, in chunks of ``prefill_chunk_tokens`` cut at fixed multiples, into
  its own cache (:class:`Prefill`); short prompts admitted together (each within one chunk) are prefilled
  in one left-padded pass (:class:`PromptGroup`). A finished prompt joins the running batch: the shorter
  side is left-padded with zeros (masked out) and the rows are concatenated. Positions count only a row's
  own tokens, so its attention sees what it sees alone.
- A row that finishes or is cancelled is dropped (``keep``); leading columns that are padding for every
  remaining row are cut (``trim``), so the cache never stays longer than its longest live row.
- The decode step feeds one token per row; every attention implementation transformers has (sdpa,
  eager, flash-attention 2's padded path) takes this layout as it is.

Trade-offs, measured in benchmarks/README.md ("engine"): a join copies the running cache once
(``rows x length`` per layer); short rows beside a long one are padded to its length (memory, and
attention over masked columns); a chunked prefill costs more than one pass (on the tiny CPU model a
2,400-token prompt takes 1.85x as long in 512-token chunks, 1.4x in 2048-token ones). Preallocated
per-row slots or paged blocks avoid the copies and the padding and give the static shapes a CUDA-graph
decode step needs; they need their own attention kernel calls (transformers builds masks for one shared
cache position), which is the next step on a GPU. The admission bound in
:mod:`~phi3v_tools.engine.scheduler` counts the padding, so the cache never outgrows the budget; a join
briefly holds the old and the merged copy (twice the cache at worst), and a merge that runs out of memory
fails only the joining rows (the batch is changed only once the merged copy exists).

Rows whose prompt + answer crosses the LongRoPE switch (4096 positions) run alone through
:class:`~phi3v_tools.model.generation.BatchDecoder`, which recomputes the sequence with long factors at the
switch, as the fixed Phi-3.5 code does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

from phi3v_tools.engine.scheduler import KV_GPU_FRACTION, KV_HOST_BYTES
from phi3v_tools.model import memory
from phi3v_tools.model.generation import BatchDecoder
from phi3v_tools.model.modeling import Phi3VForCausalLM, positions_from_mask
from phi3v_tools.model.processing import Phi3VProcessor
from phi3v_tools.settings import ModelConfig, Settings


def kv_bytes_per_token(model: Phi3VForCausalLM) -> int:
    """Bytes one position of the KV cache takes: keys and values, every layer, in the model's dtype."""
    return memory.kv_bytes_per_token(model.config.text_config, torch.empty((), dtype=model.dtype).element_size())


def kv_memory_bytes(device: torch.device, reserved: int = 0) -> int:
    """The memory the KV cache may take on ``device``: a share of the GPU memory free now, less ``reserved``
    (memory promised to something that has not allocated it yet, e.g. the feature cache); on the CPU the same
    share of the host's available memory, at most a fixed amount (the host's memory is everyone's); on MPS,
    whose free memory cannot be known, the fixed amount."""
    free = memory.available_bytes(device)
    if free is None:
        return KV_HOST_BYTES
    share = int(max(free - reserved, 0) * KV_GPU_FRACTION)
    return share if device.type == "cuda" else min(KV_HOST_BYTES, share)


def load_pretrained(
    config: ModelConfig | Settings,
    *,
    num_crops: int | None = None,
    progress: bool = False,
    max_context: int | None = None,
) -> tuple[Phi3VForCausalLM, Phi3VProcessor]:
    """The model and processor that ``config`` names (model, device, dtype, attention, quantization); a load
    that cannot hold one ``max_context`` request beside the weights fails before it allocates."""
    if num_crops is None and isinstance(config, Settings):
        num_crops = config.num_crops
    if max_context is None:
        max_context = config.max_context if isinstance(config, Settings) else 4096
    processor = Phi3VProcessor.from_pretrained(config.model, num_crops=num_crops, cache_dir=config.cache_dir)
    model = Phi3VForCausalLM.from_pretrained(
        config.model,
        device_map=config.device,
        dtype=config.dtype,
        attn_implementation=config.attn_implementation,
        cache_dir=config.cache_dir,
        progress=progress,
        quantization=config.quantization,
        max_context=max_context,
        num_crops=processor.num_crops,
    )
    return model, processor


class Prefill:
    """One request's prompt, prefilled in chunks into its own cache."""

    def __init__(self, model: Phi3VForCausalLM, ids: list[int], features: list[torch.Tensor]) -> None:
        self.model = model
        with torch.inference_mode():
            self.embeds = model.embed(torch.tensor([ids]), image_features=features)  # [1, L, hidden]
        self.length = len(ids)
        self.done = 0
        self.cache = DynamicCache()
        self.logits: torch.Tensor | None = None  # [1, vocab] once the whole prompt is in

    @property
    def remaining(self) -> int:
        return self.length - self.done

    def run(self, tokens: int) -> None:
        """Prefill the next ``tokens`` prompt positions."""
        end = min(self.done + tokens, self.length)
        device = self.embeds.device
        with torch.inference_mode():
            out = self.model(
                inputs_embeds=self.embeds[:, self.done : end],
                attention_mask=torch.ones((1, end), dtype=torch.long, device=device),
                position_ids=torch.arange(self.done, end, device=device)[None],
                cache=self.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        self.done = end
        if self.done == self.length:
            self.logits = out.logits[:, -1]
            del self.embeds  # the cache holds what the decode needs


class PromptGroup:
    """Short prompts (each within one chunk) admitted together, prefilled in one left-padded forward pass.

    Many short requests arriving at once (agents' parallel tool calls) then cost one pass, not one each.
    """

    def __init__(self, model: Phi3VForCausalLM, prefills: Sequence[Prefill]) -> None:
        self.model = model
        self.prefills = list(prefills)

    def run(self) -> tuple[DynamicCache, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prefill every prompt; the group's cache, mask [k, length], last positions [k, 1] and logits [k, vocab]."""
        longest = max(p.length for p in self.prefills)
        device = self.prefills[0].embeds.device
        embeds = torch.cat([_left_pad_embeds(p.embeds, longest) for p in self.prefills])  # [k, longest, hidden]
        mask = torch.cat(
            [_left_pad(torch.ones((1, p.length), dtype=torch.long, device=device), longest) for p in self.prefills]
        )
        cache = DynamicCache()
        with torch.inference_mode():
            out = self.model(
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=positions_from_mask(mask, longest, 0, device),
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        last = torch.tensor([[p.length - 1] for p in self.prefills], device=device)
        for p in self.prefills:
            p.done = p.length
            del p.embeds
        return cache, mask, last, out.logits[:, -1]


class RunningBatch:
    """The rows being decoded: one left-padded cache, one token per row per :meth:`step`."""

    def __init__(self, model: Phi3VForCausalLM) -> None:
        self.model = model
        self.switch_at = model.config.original_max_position_embeddings
        self._clear()

    def _clear(self) -> None:
        model = self.model
        self.cache = DynamicCache()  # per layer: keys, values [rows, heads, length, head_dim]
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=model.device)  # [rows, length], 0 on padding
        self.last_position = torch.zeros((0, 1), dtype=torch.long, device=model.device)
        self.logits = torch.zeros((0, 0), device=model.device)  # [rows, vocab]: the next token's logits

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    def join(self, prefill: Prefill) -> None:
        """Append a fully prefilled request as the last row."""
        if prefill.logits is None:
            raise RuntimeError("join() takes a finished prefill")
        device = self.mask.device
        mask = torch.ones((1, prefill.length), dtype=torch.long, device=device)
        position = torch.tensor([[prefill.length - 1]], device=device)
        self.join_rows(prefill.cache, mask, position, prefill.logits)

    def join_rows(self, cache: DynamicCache, mask: torch.Tensor, last: torch.Tensor, logits: torch.Tensor) -> None:
        """Append prefilled rows: their cache, mask [k, length] (0 on left padding), last positions [k, 1], logits."""
        if self.rows == 0:
            self.cache, self.mask, self.last_position, self.logits = cache, mask, last, logits
            return
        length = max(self.length, int(mask.shape[1]))
        merged = []  # built in full before anything changes: a failure (out of memory) leaves the batch as it was
        for layer, new in zip(self.cache.layers, cache.layers, strict=True):
            (keys, values), (new_keys, new_values) = _kv(layer), _kv(new)
            merged.append(
                (
                    torch.cat([_left_pad(keys, length), _left_pad(new_keys, length)]),
                    torch.cat([_left_pad(values, length), _left_pad(new_values, length)]),
                )
            )
        joined_mask = torch.cat([_left_pad(self.mask, length), _left_pad(mask, length)])
        joined_last = torch.cat([self.last_position, last])
        joined_logits = torch.cat([self.logits, logits.to(self.logits.dtype)])
        for layer, (keys, values) in zip(self.cache.layers, merged, strict=True):
            _set_kv(layer, keys, values)
        self.mask, self.last_position, self.logits = joined_mask, joined_last, joined_logits

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (indices into the current rows), in that order; cut columns no row uses."""
        if not rows:
            self._clear()
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.mask = self.mask[index]
        self.last_position = self.last_position[index]
        self.logits = self.logits[index]
        start = int(self.mask.any(dim=0).nonzero()[0])  # every row has a token: never empty
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            keys, values = _kv(layer)
            _set_kv(layer, keys[index, :, start:], values[index, :, start:])

    def step(self, tokens: list[int]) -> None:
        """Feed one token per row and compute the next logits."""
        device = self.mask.device
        if int(self.last_position.max()) + 2 > self.switch_at:
            raise RuntimeError("a shared batch would cross the LongRoPE switch; such requests must run alone")
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        self.last_position = self.last_position + 1
        with torch.inference_mode():
            token_ids = torch.tensor(tokens, device=device)[:, None]
            out = self.model(
                inputs_embeds=self.model.embed_tokens(token_ids),
                attention_mask=self.mask,
                position_ids=self.last_position,
                cache=self.cache,
                use_cache=True,
            )
        self.logits = out.logits[:, -1]


class AloneBatch:
    """A request that crosses the LongRoPE switch: prefilled whole and decoded with no company."""

    def __init__(self, model: Phi3VForCausalLM, ids: list[int], features: list[torch.Tensor]) -> None:
        with torch.inference_mode():
            embeds = model.embed(torch.tensor([ids]), image_features=features)
            self.decoder = BatchDecoder(model, embeds, torch.ones((1, len(ids)), dtype=torch.long))

    @property
    def logits(self) -> torch.Tensor:
        return self.decoder.logits

    @property
    def rows(self) -> int:
        return int(self.decoder.mask.shape[0])

    def keep(self, rows: list[int]) -> None:
        if rows:
            self.decoder.keep(rows)

    def step(self, tokens: list[int]) -> None:
        with torch.inference_mode():
            self.decoder.step(torch.tensor(tokens, device=self.decoder.mask.device))


def _kv(layer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``DynamicLayer``'s keys and values, [rows, heads, length, head_dim] each."""
    return layer.keys, layer.values


def _set_kv(layer: Any, keys: torch.Tensor, values: torch.Tensor) -> None:
    layer.keys, layer.values = keys, values


def _left_pad_embeds(embeds: torch.Tensor, length: int) -> torch.Tensor:
    """[1, L, hidden] -> [1, length, hidden], zeros on the left."""
    missing = length - embeds.shape[1]
    return F.pad(embeds, (0, 0, missing, 0)) if missing > 0 else embeds


def _left_pad(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Pad dim -2 (keys/values) or dim -1 (a mask) on the left with zeros up to ``length``."""
    if tensor.dim() == 2:
        missing = length - tensor.shape[1]
        return F.pad(tensor, (missing, 0)) if missing > 0 else tensor
    missing = length - tensor.shape[2]
    return F.pad(tensor, (0, 0, missing, 0)) if missing > 0 else tensor
