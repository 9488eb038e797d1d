"""Runner benchmark on the tiny checkpoint (CPU): batching, the image-feature cache, constrained decoding.

    .venv/bin/python benchmarks/runner_cpu.py [--out benchmarks/results/runner_cpu.json]

Every comparison is a ratio measured in the same run:
- throughput of N concurrent requests vs the same requests one after another (N = 8, 32);
- a repeated image with the cache vs the same call with the cache cleared;
- per-token decode time with a JSON schema vs free text;
- what batching gains through the engine vs what it gains in the model's own batched ``generate``:
  8 concurrent describe-like calls (a cached 16-crop image, JSON-constrained) vs the same calls one
  after another, beside ``model.generate`` at batch 8 vs batch 1 on the same prompt.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from phi3v_tools.demo import revenue_chart, scene
from phi3v_tools.runner import GenerationRequest, Runner
from phi3v_tools.settings import Settings
from phi3v_tools.structured import prepare_schema

SCHEMA = {
    "type": "object",
    "properties": {
        "description": {"type": "string", "description": "What the image shows."},
        "kind": {"type": "string", "enum": ["photo", "chart", "document", "screenshot", "diagram", "other"]},
        "objects": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["description", "kind", "objects"],
}


def concurrent_vs_sequential(runner: Runner, n: int, new_tokens: int) -> dict[str, float]:
    def make() -> list[GenerationRequest]:
        return [
            GenerationRequest.from_text(f"Question {i}: what do you see?", max_new_tokens=new_tokens) for i in range(n)
        ]

    async def together() -> list[Any]:
        return list(await asyncio.gather(*(runner.generate(r) for r in make())))

    asyncio.run(together())  # untimed: the first batch of this size builds the CPU kernels for its shapes
    started = time.perf_counter()
    sequential = [runner.generate_sync(r) for r in make()]
    sequential_s = time.perf_counter() - started

    started = time.perf_counter()
    concurrent = asyncio.run(together())
    concurrent_s = time.perf_counter() - started
    assert [r.text for r in concurrent] == [r.text for r in sequential], "batching changed a greedy answer"
    tokens = sum(r.completion_tokens for r in concurrent)
    return {
        "requests": n,
        "tokens": tokens,
        "sequential_s": round(sequential_s, 3),
        "concurrent_s": round(concurrent_s, 3),
        "sequential_tokens_per_s": round(tokens / sequential_s, 1),
        "concurrent_tokens_per_s": round(tokens / concurrent_s, 1),
        "throughput_ratio": round(sequential_s / concurrent_s, 2),
    }


def repeated_image(runner: Runner, repeats: int = 9) -> dict[str, float]:
    image = scene(True)
    request = GenerationRequest.from_text("Describe.", [image], max_new_tokens=8, num_crops=16)
    cold, warm = [], []
    for _ in range(repeats):
        runner.feature_cache.clear()
        cold.append(runner.generate_sync(request).timings.total_s)
        result = runner.generate_sync(request)
        assert result.cached_images == 1
        warm.append(result.timings.total_s)
    return {
        "image_tokens": result.image_tokens,
        "new_tokens": 8,
        "without_cache_ms": round(statistics.median(cold) * 1e3, 1),
        "with_cache_ms": round(statistics.median(warm) * 1e3, 1),
        "speedup": round(statistics.median(cold) / statistics.median(warm), 2),
    }


def constrained_vs_free(runner: Runner, new_tokens: int, repeats: int = 9) -> dict[str, float]:
    image = revenue_chart()
    runner.grammars.warm_up()
    free, constrained = [], []
    grammar_tokens = []
    for i in range(repeats):
        a = runner.generate_sync(GenerationRequest.from_text(f"Describe {i}.", [image], max_new_tokens=new_tokens))
        b = runner.generate_sync(
            GenerationRequest.from_text(f"Describe {i}.", [image], max_new_tokens=new_tokens, json_schema=SCHEMA)
        )
        free.append(a.timings.decode_s / max(a.completion_tokens - 1, 1))
        constrained.append(b.timings.decode_s / max(b.completion_tokens - 1, 1))
        grammar_tokens.append(b.completion_tokens)
    started = time.perf_counter()
    runner.grammars.grammar({**SCHEMA, "title": "fresh"})  # a schema not compiled before
    compile_ms = (time.perf_counter() - started) * 1e3
    return {
        "free_ms_per_token": round(statistics.median(free) * 1e3, 3),
        "constrained_ms_per_token": round(statistics.median(constrained) * 1e3, 3),
        "overhead_ratio": round(statistics.median(constrained) / statistics.median(free), 3),
        "constrained_tokens": int(statistics.median(grammar_tokens)),
        "grammar_compile_ms": round(compile_ms, 2),
    }


def engine_vs_model_batching(runner: Runner, n: int = 8, new_tokens: int = 24, repeats: int = 3) -> dict[str, Any]:
    """The engine's batching gain as a share of the bare model's, at the same prompt length and answer length."""
    image = scene(True)

    def request(i: int) -> GenerationRequest:
        return GenerationRequest.from_text(
            "Describe this image.", [image], max_new_tokens=new_tokens, num_crops=16, json_schema=SCHEMA
        )

    runner.grammars.warm_up()
    first = runner.generate_sync(request(0))  # fills the feature cache: every later call is cached
    engine_gains = []
    for _ in range(repeats):
        started = time.perf_counter()
        sequential = [runner.generate_sync(request(i)) for i in range(n)]
        sequential_s = time.perf_counter() - started

        async def together() -> list[Any]:
            return list(await asyncio.gather(*(runner.generate(request(i)) for i in range(n))))

        started = time.perf_counter()
        concurrent = asyncio.run(together())
        concurrent_s = time.perf_counter() - started
        assert [r.text for r in concurrent] == [r.text for r in sequential], "batching changed a greedy answer"
        engine_gains.append(sequential_s / concurrent_s)
    tokens = first.completion_tokens
    # The bare model on the same prompt, answering the same number of tokens (free text, no engine around it).
    processor, model = runner.processor, runner.model
    schema_prompt = prepare_schema(SCHEMA, runner.schema_limits).prompt  # the engine's prompt has it too
    prompt = f"<|user|>\n<|image_1|>\nDescribe this image.\n\n{schema_prompt}<|end|>\n<|assistant|>\n"
    inputs = processor(prompt, [image], return_tensors="pt", num_crops=16)
    model_gains = []
    with torch.inference_mode():
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(n):
                model.generate(**inputs, max_new_tokens=tokens, eos_token_id=[])
            one_by_one = time.perf_counter() - started
            batch = {k: torch.cat([v] * n) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            started = time.perf_counter()
            model.generate(**batch, max_new_tokens=tokens, eos_token_id=[])
            model_gains.append(one_by_one / (time.perf_counter() - started))
    engine_gain, model_gain = statistics.median(engine_gains), statistics.median(model_gains)
    return {
        "requests": n,
        "prompt_tokens": first.prompt_tokens,
        "model_prompt_tokens": int(inputs["input_ids"].shape[1]),
        "new_tokens": tokens,
        "engine_gain": round(engine_gain, 2),
        "model_generate_gain": round(model_gain, 2),
        "engine_share_of_model_gain": round(engine_gain / model_gain, 2),
        "engine_gains": [round(g, 2) for g in engine_gains],
        "model_gains": [round(g, 2) for g in model_gains],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/runner_cpu.json"))
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()

    runner = Runner.load(Settings(model=args.model, max_batch_size=32, max_queue=128), progress=False)
    if runner._warm_up is not None:
        runner._warm_up.join()  # the grammar warm-up compiles kernels on the CPU: not while measuring
    runner.generate_sync(GenerationRequest.from_text("warm up", max_new_tokens=2))
    results: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpu_threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "model": args.model,
        "runner": runner.info(),
    }
    for n in (8, 32):
        results[f"concurrent_{n}"] = concurrent_vs_sequential(runner, n, args.new_tokens)
        print(n, results[f"concurrent_{n}"], flush=True)
    results["repeated_image"] = repeated_image(runner)
    print(results["repeated_image"], flush=True)
    results["constrained_decoding"] = constrained_vs_free(runner, 64)
    print(results["constrained_decoding"], flush=True)
    results["engine_vs_model_batching"] = engine_vs_model_batching(runner)
    print(results["engine_vs_model_batching"], flush=True)
    results["runner"] = runner.info()
    runner.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
