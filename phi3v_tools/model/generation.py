"""Generation for Phi-3-vision: prefill with image features, then decode with a KV cache.

Differences from transformers' ``generate`` that matter here:

- images: the prompt is embedded once (image features written in); decode steps embed single tokens;
- batches: rows are left-padded; every row keeps its own positions and stops on its own;
- stop tokens: ``<|end|>`` and ``<|endoftext|>`` (and config's ``</s>``) unless ``eos_token_id`` is given;
- LongRoPE: rotary factors switch from short to long once a sequence exceeds 4096 positions. Keys cached
  with short factors would then meet long-factor queries, so at that step the whole sequence (prompt
  embeddings included, kept from the prefill) is recomputed with long factors and decoding goes on from
  there: the result equals recomputing everything with long factors, as the fixed Phi-3.5 code does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import torch
from transformers.cache_utils import DynamicCache

from phi3v_tools.errors import GenerationError
from phi3v_tools.model.config import STOP_TOKEN_IDS
from phi3v_tools.model.modeling import Phi3VForCausalLM, positions_from_mask

DEFAULT_MAX_NEW_TOKENS = 512
_IGNORED = {"use_cache", "num_beams", "num_return_sequences", "output_scores", "return_dict_in_generate"}


class Streamer(Protocol):
    """transformers' streamer protocol (``TextStreamer``, ``TextIteratorStreamer``)."""

    def put(self, value: torch.Tensor) -> None: ...

    def end(self) -> None: ...


def stop_ids(eos_token_id: int | Iterable[int] | None) -> list[int]:
    if eos_token_id is None:
        return list(STOP_TOKEN_IDS)
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    if isinstance(eos_token_id, torch.Tensor):
        return [int(i) for i in eos_token_id.flatten().tolist()]
    return [int(i) for i in eos_token_id]


def next_tokens(
    logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None, top_p: float | None
) -> torch.Tensor:
    """Greedy, or sampled with temperature / top-k / top-p. logits: [batch, vocab] -> [batch]."""
    if not do_sample or temperature == 0.0:
        return logits.argmax(dim=-1)
    scores = logits.float() / max(temperature, 1e-5)
    if top_k is not None and top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1])).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_scores.softmax(dim=-1) > top_p  # keep the smallest set reaching top_p
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
    return torch.multinomial(scores.softmax(dim=-1), num_samples=1).squeeze(-1)


class BatchDecoder:
    """Step-by-step decoding of a left-padded batch with a KV cache; rows can be dropped between steps.

    ``logits`` holds the next-token logits of every row ([rows, vocab]); :meth:`step` feeds one token per row,
    :meth:`keep` drops rows (finished or cancelled ones) without changing the others' results.
    """

    def __init__(self, model: Phi3VForCausalLM, prompt_embeds: torch.Tensor, attention_mask: torch.Tensor) -> None:
        # prompt_embeds: [rows, prompt_len, hidden]; attention_mask: [rows, prompt_len], 0 on left padding
        self.model = model
        self.switch_at = model.config.original_max_position_embeddings  # short -> long rotary factors beyond
        self.prompt_embeds = prompt_embeds
        self.mask = attention_mask.to(prompt_embeds.device).long()
        self.generated = torch.empty(len(prompt_embeds), 0, dtype=torch.long, device=prompt_embeds.device)
        self.steps = 0  # forward passes after the prefill
        positions = positions_from_mask(self.mask, self.mask.shape[1], 0, self.mask.device)
        self.long_factors = bool(positions.max() + 1 > self.switch_at)
        self.last_position = positions[:, -1:]
        self.cache = DynamicCache(config=model.config.text_config)
        self.logits = self._forward(prompt_embeds, positions, logits_to_keep=1)

    def _forward(self, embeds: torch.Tensor, positions: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
        out = self.model(
            inputs_embeds=embeds,
            attention_mask=self.mask,
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=logits_to_keep,
        )
        return out.logits[:, -1]

    def step(self, tokens: torch.Tensor) -> None:
        """Append ``tokens`` ([rows]) and compute the next logits."""
        self.steps += 1
        tokens = tokens.to(self.mask.device)
        self.generated = torch.cat([self.generated, tokens[:, None]], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        self.last_position = self.last_position + 1
        if not self.long_factors and int(self.last_position.max()) + 1 > self.switch_at:
            # The sequence now crosses the LongRoPE switch: recompute everything with long factors.
            self.long_factors = True
            embeds = torch.cat([self.prompt_embeds, self.model.embed_tokens(self.generated)], dim=1)
            self.cache = DynamicCache(config=self.model.config.text_config)
            positions = positions_from_mask(self.mask, embeds.shape[1], 0, self.mask.device)
            self.logits = self._forward(embeds.to(self.prompt_embeds.dtype), positions, logits_to_keep=1)
            return
        self.logits = self._forward(self.model.embed_tokens(tokens[:, None]), self.last_position)

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (indices into the current rows), in that order."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.prompt_embeds = self.prompt_embeds[index]
        self.mask = self.mask[index]
        self.generated = self.generated[index]
        self.last_position = self.last_position[index]
        self.logits = self.logits[index]


def generate(
    model: Phi3VForCausalLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    image_sizes: torch.Tensor | None = None,
    *,
    image_features: list[torch.Tensor] | None = None,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Iterable[int] | None = None,
    pad_token_id: int | None = None,
    streamer: Streamer | None = None,
    generation_config: Any = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Prompt ids followed by generated ids, [batch, prompt_len + new]; finished rows are padded.

    Accepts the transformers keywords the Phi-3-vision examples use (``max_new_tokens``, ``temperature``,
    ``do_sample``, ``top_k``, ``top_p``, ``eos_token_id``, ``streamer``, ``generation_config``); unknown
    ones raise ``TypeError``.
    """

    def setting(name: str, value: Any, default: Any) -> Any:
        if value is not None:
            return value
        configured = getattr(generation_config, name, None) if generation_config is not None else None
        return configured if configured is not None else default

    max_new_tokens = setting("max_new_tokens", max_new_tokens, None)
    max_length = setting("max_length", max_length, None) if max_new_tokens is None else None
    do_sample = bool(setting("do_sample", do_sample, False))
    temperature = float(setting("temperature", temperature, 1.0))
    top_k = setting("top_k", top_k, None)
    top_p = setting("top_p", top_p, None)
    eos_token_id = setting("eos_token_id", eos_token_id, None)
    unknown = set(kwargs) - _IGNORED
    if unknown:
        raise TypeError(f"generate() got unsupported arguments: {', '.join(sorted(unknown))}")
    if kwargs.get("num_beams", 1) not in (1, None) or kwargs.get("num_return_sequences", 1) not in (1, None):
        raise TypeError("beam search and several sequences per prompt are not supported; use num_beams=1")

    device = model.device
    input_ids = input_ids.to(device)
    batch, prompt_len = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device).long()
    if max_new_tokens is None:
        max_new_tokens = max_length - prompt_len if max_length is not None else DEFAULT_MAX_NEW_TOKENS
    if max_new_tokens < 0:
        raise GenerationError(f"max_length {max_length} is shorter than the prompt ({prompt_len} tokens)")
    longest = int(mask.sum(dim=-1).max())
    if longest + max_new_tokens > model.config.max_position_embeddings:
        raise GenerationError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context of "
            f"{model.config.max_position_embeddings} positions"
        )
    stops = torch.tensor(stop_ids(eos_token_id), device=device)
    pad = int(pad_token_id if pad_token_id is not None else (model.config.text_config.pad_token_id or 0))

    decoder = BatchDecoder(model, model.embed(input_ids, pixel_values, image_sizes, image_features), mask)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    last = torch.empty(batch, 0, dtype=torch.long, device=device)  # the final token, never fed back
    for step in range(max_new_tokens):
        token = next_tokens(decoder.logits, do_sample, temperature, top_k, top_p)
        token = torch.where(finished, torch.full_like(token, pad), token)
        last = token[:, None]
        if streamer is not None:
            streamer.put(token.cpu())
        finished |= torch.isin(token, stops)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        decoder.step(token)
    if streamer is not None:
        streamer.end()
    return torch.cat([input_ids, decoder.generated, last], dim=1)
