"""Choosing each row's next token: greedy or seeded sampling (temperature, top-p) under its grammar mask.

The grammar masks of all constrained rows are filled in parallel by llguidance
(:class:`~phi3v_tools.grammar.GrammarCompiler`); a row whose grammar allows no token at all gets ``-1``
(the engine fails that row alone, with the grammar's reason); a row whose sampling fails gets ``-2`` and
fails alone too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from phi3v_tools.grammar import GrammarCompiler, JsonConstraint

GRAMMAR_BLOCKED = -1  # the row's grammar allows no token
SAMPLING_FAILED = -2  # sampling the row's token failed (its own numbers)
MIN_TEMPERATURE = 1e-5  # smaller temperatures divide logits to infinity: they sample as this (near-greedy)


class RowSampling:
    """One row's sampling options and its random generator (seeded once per attempt)."""

    def __init__(self, temperature: float, top_p: float | None, seed: int | None) -> None:
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.generator: torch.Generator | None = None
        self.restart()

    def restart(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed) if self.seed is not None else None


def choose(
    logits: torch.Tensor,
    rows: Sequence[RowSampling],
    constraints: Sequence[JsonConstraint | None],
    grammars: GrammarCompiler | None,
    bitmask: torch.Tensor | None,
) -> list[int]:
    """The next token of every row (``-1`` where the row's grammar allows none). logits: [rows, vocab]."""
    logits = logits.float()
    chosen = logits.argmax(dim=-1).tolist()
    blocked: set[int] = set()
    if grammars is not None and bitmask is not None and any(c is not None for c in constraints):
        grammars.fill(constraints, bitmask)
        # Masking all 32k logits costs more than the mask itself; when every greedy row's favourite token is
        # allowed anyway (the usual case for a trained model), the mask is not applied.
        bits = bitmask.numpy()
        sampled = any(r.temperature > 0 for r in rows)
        if sampled or not all(bits[i, t >> 5] >> (t & 31) & 1 for i, t in enumerate(chosen)):
            logits = logits.contiguous()
            grammars.apply(logits, bitmask)
            chosen = logits.argmax(dim=-1).tolist()
            blocked = set(torch.isneginf(logits.amax(dim=-1)).nonzero().flatten().tolist())
    for i, row in enumerate(rows):
        if i in blocked:
            chosen[i] = GRAMMAR_BLOCKED
        elif row.temperature > 0:
            try:
                chosen[i] = _sample(logits[i], row)
            except Exception:  # this row's own numbers: it fails alone, its companions go on
                chosen[i] = SAMPLING_FAILED
    return chosen


def _sample(logits: torch.Tensor, row: RowSampling) -> int:
    probs = torch.softmax(logits / max(row.temperature, MIN_TEMPERATURE), dim=-1)
    if row.top_p is not None and row.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        drop = sorted_probs.cumsum(0) - sorted_probs > row.top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    return int(torch.multinomial(probs.cpu(), 1, generator=row.generator).item())
