"""GPU suite: the full-size Phi-3-vision (random bf16 weights, built on the card) against the card's ceilings.

    python benchmarks/gpu_suite.py                      # on a CUDA machine, ~5 minutes, plus step 7's
    python benchmarks/gpu_suite.py --poisson-requests 0  # without step 7 (Poisson arrivals, several minutes)
    python benchmarks/gpu_suite.py --size tiny --device cpu   # smoke test of the script itself

Needs only PyTorch, transformers and this package's dependencies (llguidance, jsonschema, pillow, tqdm):
no download, no checkpoint file. Steps, each printed as it runs:

1. the card: device-to-device copy bandwidth and bf16 matmul TFLOP/s;
2. the model: Phi-3-vision-128k-instruct's shapes (4.15 B parameters) with random bf16 weights;
3. single-stream decode tokens/s vs the bandwidth ceiling (weights + KV cache read per token);
4. time to first token for one image at num_crops 1, 4, 16, split into CPU preprocessing, vision tower and
   prefill, vs the compute floor;
5. throughput through the runner at concurrency 1, 4, 8, 16 (same image, 64 new tokens each);
6. the image-feature cache and constrained decoding through the runner;
7. static vs continuous batching under Poisson arrivals of a mixed workload, at three rates relative to the
   measured sequential capacity, and a short request behind two long answers (benchmarks/engine_cpu.py's
   scenario, imported from it, with longer answers and more requests);
8. each PHI3V_QUANTIZATION mode (``--quantization int8,int4``) on a fresh model: the weights' memory on the
   card, decode tokens/s at batch 1 and the time to first token at 4 crops;
9. with ``--replicas N`` (a machine with N GPUs, the ``ray`` extra): ``phi3v-tools serve --replicas 1`` and then
   ``--replicas N`` on a full-size random checkpoint written to disk (benchmarks/quantization_cpu.py's writer,
   which needs the shared reference configs), one GPU a replica: describe_image calls/s and p50/p95 at
   concurrency 16 x N through the remote backend, and the ratio (benchmarks/ray_replicas.py's measurement).

Results: benchmarks/results/gpu_<card>.json. Random weights ramble, so every generation runs to its token
budget (stop tokens are disabled where it matters) and the figures measure the machinery, not answers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import transformers

from phi3v_tools.demo import revenue_chart, scene
from phi3v_tools.model import Phi3VForCausalLM, Phi3VProcessor
from phi3v_tools.model.config import Phi3VConfig
from phi3v_tools.model.generation import BatchDecoder
from phi3v_tools.model.image_processing import preprocess_image
from phi3v_tools.model.tiny import make_tiny_checkpoint, tiny_config
from phi3v_tools.runner import GenerationRequest, Runner
from phi3v_tools.settings import Settings

HERE = Path(__file__).resolve().parent
# Poisson arrival rates as multiples of the mix's sequential capacity (requests/s served one at a time): the
# runner decodes up to 32 rows at once (the default), so 3x is light for continuous batching and 16x is heavy.
POISSON_LOADS = (3.0, 8.0, 16.0)

# Phi-3-vision-128k-instruct's config.json shapes. The 48 LongRoPE factors are placeholders: they change the
# rotary angles, not the cost.
FULL_CONFIG: dict[str, Any] = {
    "model_type": "phi3_v",
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32064,
    "max_position_embeddings": 131072,
    "original_max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": {"type": "su", "short_factor": [1.0] * 48, "long_factor": [1.5] * 48},
    "sliding_window": 131072,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "embd_layer": {"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp"},
    "img_processor": {"image_dim_out": 1024, "num_img_tokens": 144},
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Any, device: torch.device, repeats: int = 3) -> float:
    """Best wall time of ``fn`` over ``repeats`` runs, synchronised."""
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - started)
    return best


def measure_card(device: torch.device, size: str) -> dict[str, float]:
    n = (1 << 28) if size == "full" else (1 << 22)  # 512 MiB of bf16 on GPU
    a = torch.empty(n, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    seconds = timed(lambda: b.copy_(a), device, repeats=10)
    bandwidth = 2 * a.numel() * a.element_size() / seconds  # read + write
    m = 8192 if size == "full" else 512
    x = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    y = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    seconds = timed(lambda: x @ y, device, repeats=10)
    flops = 2 * m**3 / seconds
    return {"copy_bandwidth_GBps": round(bandwidth / 1e9, 1), "bf16_matmul_TFLOPs": round(flops / 1e12, 3)}


def build_model(size: str, device: torch.device, checkpoint_dir: Path) -> tuple[Phi3VForCausalLM, Phi3VProcessor]:
    raw = FULL_CONFIG if size == "full" else tiny_config()
    config = Phi3VConfig.from_dict(raw, name_or_path=f"random-{size}").with_attn_implementation("sdpa")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Phi3VForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():  # scaled like trained weights, so activations stay finite
        for name, parameter in model.named_parameters():
            if parameter.ndim == 1 and "norm" in name and name.endswith("weight"):
                parameter.fill_(1.0)
            elif name.endswith("bias"):
                parameter.zero_()
            else:
                parameter.normal_(0.0, 0.02)
    make_tiny_checkpoint(checkpoint_dir)  # only for its tokenizer: the official special ids and template
    processor = Phi3VProcessor.from_pretrained(checkpoint_dir)
    return model.eval(), processor


def parameter_bytes(model: Phi3VForCausalLM) -> tuple[int, int]:
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    lm = sum(p.numel() * p.element_size() for p in model.language_model.parameters())
    return total, lm


def decode_speed(model: Phi3VForCausalLM, processor: Phi3VProcessor, new_tokens: int) -> dict[str, float]:
    device = model.device
    inputs = processor(processor.apply_chat_template([{"role": "user", "content": "Tell me a story."}]))
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=8, eos_token_id=[])  # warm-up
        seconds = timed(lambda: model.generate(**inputs, max_new_tokens=new_tokens, eos_token_id=[]), device, 2)
        prefill = timed(lambda: model(**inputs, logits_to_keep=1), device, 3)
    per_token = (seconds - prefill) / (new_tokens - 1)
    return {
        "new_tokens": new_tokens,
        "tokens_per_s": round(1 / per_token, 1),
        "ms_per_token": round(per_token * 1e3, 3),
    }


def first_token(model: Phi3VForCausalLM, processor: Phi3VProcessor, num_crops: int) -> dict[str, float]:
    device = model.device
    image = scene(True)  # 800 x 450
    prompt = processor.apply_chat_template([{"role": "user", "content": "<|image_1|>\nDescribe."}])
    cpu_s = timed(lambda: preprocess_image(image, num_crops), torch.device("cpu"), 3)
    inputs = processor(prompt, [image], num_crops=num_crops).to(device)
    with torch.inference_mode():
        vision_s = timed(lambda: model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]), device)
        features = model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])

        def prefill() -> None:
            embeds = model.embed(inputs["input_ids"], image_features=features)
            BatchDecoder(model, embeds, inputs["attention_mask"])

        prefill_s = timed(prefill, device)
    return {
        "num_crops": num_crops,
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "crops_encoded": int(sum(1 + (h // 336) * (w // 336) for h, w in inputs["image_sizes"].tolist())),
        "cpu_preprocess_ms": round(cpu_s * 1e3, 1),
        "vision_ms": round(vision_s * 1e3, 1),
        "prefill_ms": round(prefill_s * 1e3, 1),
        "ttft_ms": round((cpu_s + vision_s + prefill_s) * 1e3, 1),
    }


def prefill_flops(model: Phi3VForCausalLM, prompt_tokens: int, crops: int) -> float:
    """2 x parameters x tokens for the LM and for CLIP over its 577 tokens per crop (attention ignored)."""
    lm_params = sum(p.numel() for p in model.language_model.model.layers.parameters())
    clip_params = sum(p.numel() for p in model.vision_tower.parameters())
    return 2.0 * lm_params * prompt_tokens + 2.0 * clip_params * 577 * crops


def runner_figures(runner: Runner, new_tokens: int) -> dict[str, Any]:
    image = revenue_chart()
    out: dict[str, Any] = {}

    def request(i: int, **options: Any) -> GenerationRequest:
        return GenerationRequest.from_text(f"Describe {i}.", [image], **{"max_new_tokens": new_tokens, **options})

    runner.generate_sync(request(0))  # warm-up, fills the feature cache
    for concurrency in (1, 4, 8, 16):

        async def burst(n: int = concurrency) -> list[Any]:
            return list(await asyncio.gather(*(runner.generate(request(i)) for i in range(n))))

        started = time.perf_counter()
        results = asyncio.run(burst())
        seconds = time.perf_counter() - started
        tokens = sum(r.completion_tokens for r in results)
        out[f"concurrency_{concurrency}"] = {
            "tokens": tokens,
            "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1),
        }
        log(f"  concurrency {concurrency}: {tokens / seconds:.1f} tok/s")
    single = out["concurrency_1"]["tokens_per_s"]
    out["concurrency_16_vs_1"] = round(out["concurrency_16"]["tokens_per_s"] / single, 2)

    cold, warm = [], []
    for i in range(3):
        runner.feature_cache.clear()
        cold.append(runner.generate_sync(request(i, max_new_tokens=8, num_crops=16)).timings.total_s)
        warm.append(runner.generate_sync(request(i, max_new_tokens=8, num_crops=16)).timings.total_s)
    out["repeated_image_num_crops_16"] = {
        "without_cache_ms": round(statistics.median(cold) * 1e3, 1),
        "with_cache_ms": round(statistics.median(warm) * 1e3, 1),
        "speedup": round(statistics.median(cold) / statistics.median(warm), 2),
    }
    schema = {
        "type": "object",
        "properties": {"description": {"type": "string"}, "objects": {"type": "array", "items": {"type": "string"}}},
        "required": ["description", "objects"],
    }
    runner.grammars.warm_up()
    free, constrained = [], []
    for i in range(3):
        a = runner.generate_sync(request(i))
        b = runner.generate_sync(request(i, json_schema=schema))
        free.append(a.timings.decode_s / max(a.completion_tokens - 1, 1))
        constrained.append(b.timings.decode_s / max(b.completion_tokens - 1, 1))
    out["constrained_decoding"] = {
        "free_ms_per_token": round(statistics.median(free) * 1e3, 3),
        "constrained_ms_per_token": round(statistics.median(constrained) * 1e3, 3),
        "overhead_ratio": round(statistics.median(constrained) / statistics.median(free), 3),
    }
    return out


def poisson_figures(runner: Runner, requests: int, seed: int = 0) -> dict[str, Any]:
    """Static vs continuous batching under Poisson arrivals, and head of line (see benchmarks/engine_cpu.py)."""
    sys.path.insert(0, str(HERE))
    from engine_cpu import Mix, calibrate, compare_modes, head_of_line, image_pool, make_workload, rates_from, warm_up

    mix = Mix(short_tokens=16, long_tokens=(256, 512))  # 0-2 images at num_crops 1 or 4: prompts <= 1.6k tokens
    pool = image_pool()
    warm_up(runner, pool, mix)
    specs = make_workload(requests, seed, mix, len(pool))
    calibration = calibrate(runner, specs, pool, mix, sample=8)  # the whole workload one by one takes too long
    log(f"  calibration: {calibration}")
    rates = rates_from(calibration, POISSON_LOADS)
    out: dict[str, Any] = {
        "requests": requests,
        "seed": seed,
        "mix": {"short_tokens": mix.short_tokens, "long_tokens": mix.long_tokens, "crops": mix.crops},
        "calibration": calibration,
        "loads_vs_sequential": POISSON_LOADS,
        "rates_rps": rates,
        "runs": compare_modes(runner, specs, rates, pool, calibration, log=log),
    }
    out["head_of_line"] = {}
    for mode in ("static", "continuous"):
        hol = head_of_line(runner, static=mode == "static", long_tokens=900, short_tokens=16, repeats=2)
        out["head_of_line"][mode] = hol
        log(f"  head of line, {mode}: {hol['short_behind_longs_ms']} ms vs {hol['short_alone_ms']} ms alone")
    return out


def quantization_figures(args: argparse.Namespace, device: torch.device, tmp: Path) -> dict[str, Any]:
    """Each PHI3V_QUANTIZATION mode on a fresh random model: the memory its weights take on the card, decode
    tokens/s at batch 1 and the time to first token at 4 crops, beside the bf16 figures measured above."""
    from phi3v_tools.model.quantize import quantize_model

    figures: dict[str, Any] = {}
    for mode in [m for m in args.quantization.split(",") if m]:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated(device)
        model, processor = build_model(args.size, device, tmp / mode)
        started = time.perf_counter()
        layers = quantize_model(model, mode)
        entry: dict[str, Any] = {"layers": layers, "quantize_s": round(time.perf_counter() - started, 1)}
        if device.type == "cuda":
            torch.cuda.empty_cache()
            entry["weights_gb"] = round((torch.cuda.memory_allocated(device) - before) / 1e9, 2)
        entry["decode_batch_1"] = decode_speed(model, processor, min(args.new_tokens, 64))
        entry["time_to_first_token_4_crops"] = first_token(model, processor, 4)
        figures[mode] = entry
        log(f"{mode}: {json.dumps(entry)}")
        del model
    return figures


def replica_figures(replicas: int, tmp: Path, size: str, device: torch.device) -> dict[str, Any]:
    """Step 9: the same describe_image calls against 1 and ``replicas`` Ray Serve replicas of a full-size random
    checkpoint, one GPU each (each replica is its own process; this one's model was freed before)."""
    sys.path.insert(0, str(HERE))
    from quantization_cpu import write_checkpoint
    from ray_replicas import Server, pictures, throughput

    checkpoint = tmp / f"{size}-checkpoint"
    started = time.perf_counter()
    write_checkpoint(checkpoint) if size == "full" else make_tiny_checkpoint(checkpoint)
    figures: dict[str, Any] = {"write_checkpoint_s": round(time.perf_counter() - started, 1)}
    gpus = "1" if device.type == "cuda" else "0"  # --device cpu: the smoke test of this step
    images = pictures(64 * replicas, seed=7)
    for count in sorted({1, replicas}):
        server = Server(str(checkpoint), count, tmp / f"replicas-{count}.log", PHI3V_REPLICA_GPUS=gpus)
        try:
            entry = {"startup_s": round(server.startup_s, 1)}
            entry.update(asyncio.run(throughput(server, images, 16 * replicas)))
        finally:
            server.stop()
        figures[str(count)] = entry
        log(f"replicas {count}: {json.dumps(entry)}")
    if replicas > 1:
        figures["ratio"] = round(figures[str(replicas)]["calls_per_s"] / figures["1"]["calls_per_s"], 2)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("full", "tiny"), default="full")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--poisson-requests", type=int, default=48, help="requests per rate and mode (0: skip)")
    parser.add_argument("--quantization", default="int8,int4", help="modes measured after bf16 ('' to skip)")
    parser.add_argument("--replicas", type=int, default=0, help="step 9: 1 vs N Ray Serve replicas (0: skip)")
    args = parser.parse_args()
    device = torch.device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    results: dict[str, Any] = {
        "card": card,
        "size": args.size,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda},
        "date": time.strftime("%Y-%m-%d"),
    }
    log(f"card: {card}")
    results["card_ceilings"] = measure_card(device, args.size)
    log(f"card: {results['card_ceilings']}")

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        model, processor = build_model(args.size, device, Path(tmp))
        total_bytes, lm_bytes = parameter_bytes(model)
        results["model"] = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "bytes": total_bytes,
            "build_s": round(time.perf_counter() - started, 1),
        }
        log(f"model: {results['model']}")

        decode = decode_speed(model, processor, args.new_tokens)
        bandwidth = results["card_ceilings"]["copy_bandwidth_GBps"] * 1e9
        ceiling = bandwidth / lm_bytes  # tokens/s if each step reads the LM weights once (KV ignored: short prompt)
        decode["ceiling_tokens_per_s"] = round(ceiling, 1)
        decode["fraction_of_ceiling"] = round(decode["tokens_per_s"] / ceiling, 3)
        results["decode_batch_1"] = decode
        log(f"decode: {decode}")

        tflops = max(results["card_ceilings"]["bf16_matmul_TFLOPs"], 1e-3) * 1e12
        results["time_to_first_token"] = []
        for crops in (1, 4, 16):
            ttft = first_token(model, processor, crops)
            floor_ms = prefill_flops(model, ttft["prompt_tokens"], ttft["crops_encoded"]) / tflops * 1e3
            ttft["compute_floor_ms"] = round(floor_ms, 1)
            ttft["gpu_ms_vs_floor"] = round((ttft["vision_ms"] + ttft["prefill_ms"]) / floor_ms, 2)
            results["time_to_first_token"].append(ttft)
            log(f"ttft: {ttft}")

        settings = Settings(model=f"random-{args.size}", max_queue=64)  # the default rows and KV budget
        runner = Runner(model, processor, settings)
        try:
            results["runner"] = runner_figures(runner, min(args.new_tokens, 64))
        finally:
            runner.close()
        log(f"runner: {json.dumps(results['runner'])}")

        if args.poisson_requests > 0:
            # the default KV budget: what the card's memory holds once the model is loaded (info() records it)
            poisson_settings = replace(settings, max_queue=max(256, args.poisson_requests))
            runner = Runner(model, processor, poisson_settings)
            try:
                results["poisson_batching"] = poisson_figures(runner, args.poisson_requests)
            finally:
                runner.close()

        del model, runner
        results["quantization"] = quantization_figures(args, device, Path(tmp))
        if args.replicas > 0:
            torch.cuda.empty_cache()
            results["replicas"] = replica_figures(args.replicas, Path(tmp), args.size, device)

    out = args.out or Path("benchmarks/results") / f"gpu_{card.replace(' ', '_').replace('/', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
