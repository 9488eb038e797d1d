"""Grammar-constrained decoding with llguidance: one compiler per tokenizer, one matcher per constrained row.

llguidance was chosen over xgrammar by measurement on Phi-3's tokenizer (benchmarks/README.md): compile
~1-7 ms vs ~1-2 s, mask p50 ~150 us vs ~0.4-8 ms per token. The schemas it compiles are already checked
and bounded (:func:`phi3v_tools.structured.prepare_schema`); compiled grammars are cached per schema, in
a bounded LRU (a caller can send a new schema with every request).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from phi3v_tools.errors import GenerationError, PromptError

logger = logging.getLogger(__name__)

MAX_CACHED_GRAMMARS = 256


def _llguidance() -> Any:
    import llguidance  # imported on first use: its token tables are only needed for constrained requests
    import llguidance.hf
    import llguidance.torch

    return llguidance


class GrammarCompiler:
    """Compiles bounded JSON schemas for one tokenizer; compiled grammars are cached per schema."""

    def __init__(
        self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int], max_cached: int = MAX_CACHED_GRAMMARS
    ) -> None:
        llg = _llguidance()
        self.vocab_size = vocab_size
        self.tokenizer = llg.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=list(stop_token_ids))
        self.max_cached = max_cached
        self._grammars: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()
        self.executor = llg.LLExecutor()
        self._compiled_apply = True
        self._apply_lock = threading.Lock()

    def grammar(self, schema: dict[str, Any]) -> str:
        """The compiled grammar of a bounded schema; PromptError naming the problem if it cannot be used."""
        key = json.dumps(schema, separators=(",", ":"))  # property order matters: the grammar follows it
        with self._lock:
            cached = self._grammars.get(key)
            if cached is not None:
                self._grammars.move_to_end(key)
                return cached
        llg = _llguidance()
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(key, defaults={"whitespace_flexible": False})
        except (ValueError, RuntimeError) as exc:  # e.g. "number out of range"
            raise PromptError(f"the JSON schema cannot be used for constrained generation: {str(exc)[:300]}") from None
        matcher = llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            problem = matcher.get_error().split("\n")[0]
            problem = problem if len(problem) <= 300 else problem[:297] + "..."
            raise PromptError(f"the JSON schema cannot be used for constrained generation: {problem}")
        with self._lock:
            self._grammars[key] = grammar
            while len(self._grammars) > self.max_cached:
                self._grammars.popitem(last=False)
        return grammar

    def matcher(self, schema: dict[str, Any]) -> JsonConstraint:
        return JsonConstraint(_llguidance().LLMatcher(self.tokenizer, self.grammar(schema), log_level=0))

    def warm_up(self) -> None:
        """Build llguidance's lazily made tables now: the first mask inside a string otherwise takes ~2 s."""
        constraint = self.matcher({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]})
        mask = self.allocate(1)
        for token in self.tokenizer.tokenize_str('{"a":"x'):
            self.fill([constraint], mask)
            constraint.consume(token)
        self.fill([constraint], mask)
        for rows in (1, 2):  # the mask kernel compiles once for one row and once for several
            self.apply(torch.zeros(rows, self.vocab_size), self.allocate(rows))

    def allocate(self, rows: int) -> torch.Tensor:
        return _llguidance().torch.allocate_token_bitmask(rows, self.vocab_size)

    def fill(self, constraints: Sequence[JsonConstraint | None], bitmask: torch.Tensor) -> None:
        """Fill ``bitmask`` rows of the constrained rows (in parallel); unconstrained rows allow everything.

        A matcher in its error state fills an empty row (nothing allowed): the runner fails that row alone.
        """
        pairs = [(c.matcher, row) for row, c in enumerate(constraints) if c is not None]
        if len(pairs) < len(constraints):
            bitmask.fill_(-1)
        if len(pairs) == 1:  # no thread pool round trip for a single row
            _llguidance().torch.fill_next_token_bitmask(pairs[0][0], bitmask, pairs[0][1])
        elif pairs:
            _llguidance().torch.fill_next_token_bitmask_par(self.executor, pairs, bitmask)

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        """Set the logits of disallowed tokens to -inf, in place (logits: [rows, vocab], float32).

        llguidance's kernel is a ``torch.compile`` function: compiled once for one row and once for several
        (:meth:`warm_up` does both, so no request pays for it: about 2 s on the CPU), then ~0.1 ms a step. Where
        it cannot compile (no C++ toolchain on a CPU machine), plain tensor operations do the same (tested equal).
        """
        mask = bitmask.to(logits.device, non_blocking=True)
        if self._compiled_apply:
            try:
                with self._apply_lock:  # torch.compile is not thread-safe: warm-up and a step may meet here
                    _llguidance().torch.apply_token_bitmask_inplace(logits, mask)
                return
            except Exception:  # the compiler is missing or failed: the plain version from now on
                logger.warning("llguidance's compiled mask kernel failed; using plain tensor operations", exc_info=True)
                self._compiled_apply = False
        apply_bitmask(logits, mask)


def apply_bitmask(logits: torch.Tensor, mask: torch.Tensor) -> None:
    """-inf for the tokens whose bit is 0 in ``mask`` ([rows, ceil(vocab / 32)] int32), and beyond its end."""
    bits = torch.arange(32, device=logits.device, dtype=torch.int32)
    allowed = ((mask.unsqueeze(-1) >> bits) & 1).reshape(mask.shape[0], -1).bool()  # [rows, 32 * words]
    vocab = min(logits.shape[1], allowed.shape[1])
    logits[:, :vocab].masked_fill_(~allowed[:, :vocab], float("-inf"))
    if logits.shape[1] > vocab:
        logits[:, vocab:] = float("-inf")


class JsonConstraint:
    """One row's grammar state."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise GenerationError(f"the grammar rejected token {token}: {self.matcher.get_error()[:200]}")

    @property
    def error(self) -> str | None:
        """Why the matcher stopped working (a resource limit hit by this row's grammar), or None."""
        return str(self.matcher.get_error())[:300] if self.matcher.is_error() else None

    @property
    def finished(self) -> bool:
        return bool(self.matcher.is_stopped())
