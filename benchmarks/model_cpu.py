"""Model-level CPU benchmark on the tiny checkpoint: load time, peak memory, per-stage latency, batching.

    .venv/bin/python benchmarks/model_cpu.py [--out benchmarks/results/model_cpu.json]

The tiny model's absolute figures say little about the real one (see the GPU suite for that); they track
the cost of the Python around the model: image preprocessing, prompt building, the decode loop.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from phi3v_tools.demo import SEED_TASKS
from phi3v_tools.model import Phi3VForCausalLM, Phi3VProcessor, make_tiny_checkpoint


def best_of(n: int, fn: Any) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/model_cpu.json"))
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        make_tiny_checkpoint(tmp)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        model = Phi3VForCausalLM.from_pretrained(tmp)
        processor = Phi3VProcessor.from_pretrained(tmp)
        load_s = time.perf_counter() - t0

    results: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpu_threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "checkpoint": "tiny (make_tiny_checkpoint)",
        "tiny_checkpoint_build_s": round(build_s, 3),
        "load_s": round(load_s, 3),
        "tasks": {},
    }
    for task in SEED_TASKS:
        images = task.images()
        prompt = processor.apply_chat_template([{"role": "user", "content": task.user_content}])
        preprocess_s = best_of(3, lambda p=prompt, i=images: processor(p, i))
        inputs = processor(prompt, images)
        with torch.inference_mode():
            vision_s = best_of(3, lambda x=inputs: model.get_image_features(x["pixel_values"], x["image_sizes"]))
            prefill_s = best_of(3, lambda x=inputs: model(**x, logits_to_keep=1))
        total_s = best_of(3, lambda x=inputs: model.generate(**x, max_new_tokens=args.new_tokens, eos_token_id=[]))
        decode_tok_s = (args.new_tokens - 1) / max(total_s - prefill_s, 1e-9)
        results["tasks"][task.name] = {
            "prompt_tokens": int(inputs["input_ids"].shape[1]),
            "preprocess_ms": round(preprocess_s * 1e3, 1),
            "vision_ms": round(vision_s * 1e3, 1),
            "prefill_ms_incl_vision": round(prefill_s * 1e3, 1),
            "generate_ms": round(total_s * 1e3, 1),
            "decode_tokens_per_s": round(decode_tok_s, 1),
        }

    prompts = [processor.apply_chat_template([{"role": "user", "content": t.user_content}]) for t in SEED_TASKS]
    images = [t.images() for t in SEED_TASKS]
    batch = processor(prompts, images, padding=True)
    singles = [processor(p, i) for p, i in zip(prompts, images, strict=True)]
    n = args.new_tokens
    batched_s = best_of(2, lambda: model.generate(**batch, max_new_tokens=n, eos_token_id=[]))
    sequential_s = best_of(2, lambda: [model.generate(**s, max_new_tokens=n, eos_token_id=[]) for s in singles])
    results["batch_of_3_vs_sequential"] = {
        "batched_ms": round(batched_s * 1e3, 1),
        "sequential_ms": round(sequential_s * 1e3, 1),
        "speedup": round(sequential_s / batched_s, 2),
    }
    results["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    results["median_decode_tokens_per_s"] = statistics.median(
        t["decode_tokens_per_s"] for t in results["tasks"].values()
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
