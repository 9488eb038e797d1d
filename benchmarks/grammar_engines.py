"""llguidance vs xgrammar on Phi-3's tokenizer: grammar compile time and per-token mask time.

    .venv/bin/pip install xgrammar   # optional: without it only llguidance is measured
    .venv/bin/python benchmarks/grammar_engines.py [--tokenizer DIR] [--out benchmarks/results/grammar_engines.json]

Each engine walks the same schemas with seeded random logits (masked, then argmax) until the JSON is
complete, timing mask computation + application per token. The first mask after building the tokenizer
tables is reported separately (llguidance builds its lexer lazily).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from phi3v_tools.model.checkpoint import resolve_checkpoint
from phi3v_tools.model.processing import load_tokenizer
from phi3v_tools.structured import bound_schema

VOCAB = 32064
SCHEMAS = {
    "describe": {
        "type": "object",
        "properties": {
            "description": {"type": "string"},
            "kind": {"type": "string", "enum": ["photo", "chart", "document", "screenshot", "diagram", "other"]},
            "objects": {"type": "array", "items": {"type": "string"}},
            "visible_text": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        },
        "required": ["description", "kind", "objects", "visible_text"],
    },
    "fields": {
        "type": "object",
        "properties": {
            "text": {"type": "string"},
            "fields": {
                "type": "object",
                "properties": {
                    "title": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                    "author": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                },
                "required": ["title", "author"],
            },
        },
        "required": ["text", "fields"],
    },
}


def summarize(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "p50_us": round(ordered[len(ordered) // 2] * 1e6, 1),
        "p90_us": round(ordered[int(len(ordered) * 0.9)] * 1e6, 1),
        "max_us": round(ordered[-1] * 1e6, 1),
        "mean_us": round(statistics.mean(ordered) * 1e6, 1),
        "tokens": len(ordered),
    }


def walk(fill_apply: Any, consume: Any, done: Any, seed: int, limit: int = 400) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    times = []
    for _ in range(limit):
        if done():
            break
        logits = torch.randn(1, VOCAB, generator=generator)
        started = time.perf_counter()
        fill_apply(logits)
        times.append(time.perf_counter() - started)
        consume(int(logits.argmax()))
    return times


def measure_llguidance(tokenizer: Any) -> dict[str, Any]:
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt

    started = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=VOCAB, eos_token=[32007, 32000])
    out: dict[str, Any] = {"tokenizer_s": round(time.perf_counter() - started, 3), "schemas": {}}
    bitmask = lt.allocate_token_bitmask(1, VOCAB)
    first = True
    for name, schema in SCHEMAS.items():
        text = json.dumps(bound_schema(schema))
        started = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(text, defaults={"whitespace_flexible": False})
        matcher = llguidance.LLMatcher(lltok, grammar)
        compile_ms = (time.perf_counter() - started) * 1e3
        if first:  # the lazily built lexer tables
            started = time.perf_counter()
            lt.fill_next_token_bitmask(matcher, bitmask, 0)
            out["first_mask_s"] = round(time.perf_counter() - started, 3)
            first = False
        times: list[float] = []
        for seed in range(5):
            matcher = llguidance.LLMatcher(lltok, grammar)

            def fill_apply(logits: torch.Tensor, m: Any = matcher) -> None:
                lt.fill_next_token_bitmask(m, bitmask, 0)
                lt.apply_token_bitmask_inplace(logits, bitmask)

            times += walk(fill_apply, matcher.consume_token, matcher.is_stopped, seed)
        out["schemas"][name] = {"compile_ms": round(compile_ms, 2), **summarize(times)}
    return out


def measure_xgrammar(tokenizer: Any) -> dict[str, Any]:
    try:
        import xgrammar as xgr
    except ImportError:
        return {"skipped": "xgrammar is not installed (pip install xgrammar)"}
    started = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=VOCAB, stop_token_ids=[32007, 32000])
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    out: dict[str, Any] = {"tokenizer_s": round(time.perf_counter() - started, 3), "schemas": {}}
    bitmask = xgr.allocate_token_bitmask(1, VOCAB)
    for name, schema in SCHEMAS.items():
        started = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(bound_schema(schema)), any_whitespace=False)
        compile_ms = (time.perf_counter() - started) * 1e3
        times: list[float] = []
        for seed in range(5):
            matcher = xgr.GrammarMatcher(compiled)

            def fill_apply(logits: torch.Tensor, m: Any = matcher) -> None:
                m.fill_next_token_bitmask(bitmask, 0)
                xgr.apply_token_bitmask_inplace(logits, bitmask)

            times += walk(fill_apply, matcher.accept_token, matcher.is_terminated, seed)
        out["schemas"][name] = {"compile_ms": round(compile_ms, 2), **summarize(times)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokenizer", default="tiny", help="checkpoint dir whose tokenizer to use (default: tiny)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/grammar_engines.json"))
    args = parser.parse_args()
    tokenizer = load_tokenizer(resolve_checkpoint(args.tokenizer, weights=False))
    results = {
        "tokenizer": args.tokenizer,
        "llguidance": measure_llguidance(tokenizer),
        "xgrammar": measure_xgrammar(tokenizer),
    }
    print(json.dumps(results, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
