"""The full-size model on this CPU, in each mode: fp32, bf16, int8, int4 (``PHI3V_QUANTIZATION``).

    .venv/bin/python benchmarks/quantization_cpu.py [--modes float32,bfloat16,int8,int4] [--new-tokens 8]

No download: a full-size checkpoint with random weights is written once, in bf16 safetensors under the official
names, from the official Phi-3-vision-128k config and tokenizer in the shared reference data (random weights are
drawn as benchmarks/gpu_suite.py draws them: N(0, 0.02), norms at 1). Each mode then runs in a fresh process,
one after the other, loading that checkpoint as a user's would be loaded, and records:

- load time (reading the safetensors, converting or quantizing each tensor); peak RSS (the process's
  high-water mark, after loading and at the end, which counts the memory-mapped shard being read) and the
  anonymous resident memory (``RssAnon``: what the model and its work hold, without file pages);
- decode tokens/s at batch 1 and 8 (a text prompt, ``--new-tokens`` greedy tokens with no stop, less the
  prefill, as the GPU suite measures it);
- time to first token for one image at 4 crops (the processor's preprocessing, then prefill and one token);
- for the quantized modes, every tool once through the engine (1 crop, 16 new tokens): that each runs.

Then, on the tiny checkpoint, how far each quantized mode strays from the dense model: the logits' relative
error and greedy-token agreement over a 160-token prompt. **Random weights say nothing about quality with real
weights**: those figures check the arithmetic, not the model (see the README for published int8 / int4
figures). Results: ``results/quantization_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO.parent / "shared" / "phi3v-reference"
OFFICIAL = REFERENCE / "phi-3-vision-128k-instruct"
SHARD_BYTES = 2 * 2**30  # written a shard at a time: the writer never holds the whole model


def rss_gb() -> float:
    """The process's peak resident set (``ru_maxrss``), which counts the checkpoint's memory-mapped pages too."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2)  # ru_maxrss: KiB on Linux


def anon_gb() -> float | None:
    """The process's anonymous resident memory now (``RssAnon``): the model and its work, no file pages."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return round(int(line.split()[1]) * 1024 / 1e9, 2)
    except OSError:
        pass
    return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def write_checkpoint(out: Path) -> float:
    """The full-size random checkpoint, in bf16, in shards; returns the seconds it took."""
    import torch
    from safetensors.torch import save_file

    from phi3v_tools.model.config import Phi3VConfig
    from phi3v_tools.model.tiny import official_weight_names

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(OFFICIAL / name, out / name)
    if (OFFICIAL / "special_tokens_map.json").is_file():
        shutil.copy(OFFICIAL / "special_tokens_map.json", out / "special_tokens_map.json")
    names = official_weight_names(Phi3VConfig.from_json_file(OFFICIAL / "config.json"))
    generator = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    size, index = 0, 0
    weight_map: dict[str, str] = {}

    def flush() -> None:
        nonlocal shard, size, index
        if shard:
            file = f"model-{index:05d}.safetensors"
            save_file(shard, os.fspath(out / file), {"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
            shard, size, index = {}, 0, index + 1

    for name, shape in sorted(names.items()):
        if name.endswith(("norm.weight", "layer_norm1.weight", "layer_norm2.weight", "layrnorm.weight")):
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        elif name.endswith(".bias"):
            tensor = torch.zeros(shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        shard[name] = tensor
        size += tensor.numel() * 2
        if size >= SHARD_BYTES:
            flush()
    flush()
    total = sum(2 * math.prod(shape) for shape in names.values())
    index_file = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=1), encoding="utf-8")
    return round(time.perf_counter() - started, 1)


def worker(mode: str, checkpoint: Path, new_tokens: int) -> dict[str, Any]:
    """One mode, in this (fresh) process."""
    import torch

    from phi3v_tools.demo import revenue_chart
    from phi3v_tools.model import Phi3VForCausalLM, Phi3VProcessor

    torch.set_num_threads(os.cpu_count() or 1)
    dtype, quantization = (mode, None) if mode in ("float32", "bfloat16") else ("float32", mode)
    started = time.perf_counter()
    model = Phi3VForCausalLM.from_pretrained(checkpoint, device="cpu", dtype=dtype, quantization=quantization)
    result: dict[str, Any] = {"mode": mode, "dtype": dtype, "quantization": quantization}
    result["load_s"] = round(time.perf_counter() - started, 1)
    result["peak_rss_after_load_gb"] = rss_gb()
    result["anon_rss_after_load_gb"] = anon_gb()
    processor = Phi3VProcessor.from_pretrained(checkpoint, num_crops=4)

    def generate(inputs: Any, tokens: int) -> float:
        begun = time.perf_counter()
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=tokens, eos_token_id=[], do_sample=False)
        return time.perf_counter() - begun

    text = processor.apply_chat_template([{"role": "user", "content": "Tell me a long story about a lighthouse."}])
    for batch in (1, 8):
        inputs = processor([text] * batch) if batch > 1 else processor(text)
        prefill = generate(inputs, 1)
        total = generate(inputs, new_tokens)
        per_step = (total - prefill) / (new_tokens - 1)
        result[f"decode_batch_{batch}"] = {
            "prompt_tokens": int(inputs["input_ids"].shape[1]),
            "new_tokens": new_tokens,
            "ms_per_step": round(per_step * 1e3, 1),
            "tokens_per_s": round(batch / per_step, 2),
        }
    image = revenue_chart()
    prompt = processor.apply_chat_template([{"role": "user", "content": "<|image_1|>\nWhat does this chart show?"}])
    begun = time.perf_counter()
    inputs = processor(prompt, [image])
    preprocess = time.perf_counter() - begun
    first = generate(inputs, 1)
    result["first_token_4_crops"] = {
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "preprocess_s": round(preprocess, 2),
        "prefill_and_first_token_s": round(first, 1),
        "time_to_first_token_s": round(preprocess + first, 1),
    }
    if quantization is not None:
        result["tools"] = every_tool(model, processor, checkpoint)
    result["peak_rss_gb"] = rss_gb()
    result["anon_rss_at_end_gb"] = anon_gb()
    return result


def every_tool(model: Any, processor: Any, checkpoint: Path) -> dict[str, Any]:
    """Every tool once on this model through the engine, at 1 crop and 16 new tokens (a CPU prefill of the
    full model takes a minute at 4 crops): each call's outcome and seconds."""
    from phi3v_tools.demo import book_cover, revenue_chart, sales_table, scene
    from phi3v_tools.images import ImagePolicy
    from phi3v_tools.runner import Runner
    from phi3v_tools.settings import Settings
    from phi3v_tools.tools import Toolbox

    outcomes: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pictures = {"chart": revenue_chart(), "cover": book_cover(), "a": scene(False), "b": scene(True)}
        pictures["table"] = sales_table()
        for name, picture in pictures.items():
            picture.save(folder / f"{name}.png")
        path = {name: str(folder / f"{name}.png") for name in pictures}
        settings = Settings(model=str(checkpoint), num_crops=1, max_new_tokens=16, batch_window_ms=0)
        runner = Runner(model, processor, settings)
        tools = Toolbox(runner, ImagePolicy(allowed_dirs=(folder,)))
        schema = {"type": "object", "properties": {"count": {"type": "integer"}}, "required": ["count"]}
        calls = {
            "describe_image": lambda: tools.describe_image(path["chart"], detail="brief"),
            "read_text": lambda: tools.read_text(path["cover"], fields=["title", "author"]),
            "compare_images": lambda: tools.compare_images([path["a"], path["b"]]),
            "ask_images": lambda: tools.ask_images(path["chart"], "How many bars?", schema),
            "read_table": lambda: tools.read_table(path["table"]),
        }
        try:
            for name, call in calls.items():
                begun = time.perf_counter()
                try:
                    answer = call()
                    outcome: dict[str, Any] = {"ok": True, "completion_tokens": answer.call.completion_tokens}
                except Exception as exc:  # a recorded outcome, not a crash (random weights write garbage)
                    outcome = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
                outcome["seconds"] = round(time.perf_counter() - begun, 1)
                outcomes[name] = outcome
                print(json.dumps({name: outcome}), file=sys.stderr, flush=True)
        finally:
            runner.close()
    return outcomes


def tiny_agreement() -> dict[str, Any]:
    """Each quantized mode against the dense tiny model: logit error and greedy agreement, at prefill and decode."""
    import torch

    from phi3v_tools.model import Phi3VForCausalLM
    from phi3v_tools.model.quantize import PACKED_ROWS
    from phi3v_tools.model.tiny import make_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        folder = make_tiny_checkpoint(Path(tmp) / "tiny")
        dense = Phi3VForCausalLM.from_pretrained(folder)
        torch.manual_seed(1)
        ids = torch.randint(100, 30000, (1, PACKED_ROWS + 32))
        out: dict[str, Any] = {}
        with torch.inference_mode():
            reference = dense(input_ids=ids).logits
            for mode in ("int8", "int4"):
                logits = Phi3VForCausalLM.from_pretrained(folder, quantization=mode)(input_ids=ids).logits
                error = float((logits - reference).norm() / reference.norm())
                agree = float((logits.argmax(-1) == reference.argmax(-1)).float().mean())
                out[mode] = {"logits_relative_error": round(error, 4), "greedy_token_agreement": round(agree, 3)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="float32,bfloat16,int8,int4")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--timeout-s", type=float, default=900, help="per mode")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "quantization_cpu.json")
    parser.add_argument("--checkpoint", type=Path, help="a full-size checkpoint already written (kept)")
    parser.add_argument("--keep", type=Path, help="write the full-size checkpoint here and keep it")
    parser.add_argument("--update", action="store_true", help="replace only these modes in an existing --out")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.checkpoint, args.new_tokens)))
        return
    results: dict[str, Any] = {
        "machine": f"{cpu_name()} ({platform.machine()}), {os.cpu_count()} CPUs, {platform.system()}",
        "date": time.strftime("%Y-%m-%d"),
        "model": "Phi-3-vision-128k-instruct's official config, random bf16 weights (N(0, 0.02)), written once",
        "modes": {},
    }
    if args.update and args.out.is_file():
        earlier = json.loads(args.out.read_text(encoding="utf-8"))
        results["modes"] = earlier.get("modes", {})
        results["dates"] = sorted({earlier.get("date", ""), results["date"]} - {""})
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
        flags = next((line for line in info if line.startswith("flags")), "").split()
    results["cpu_flags"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = args.keep or Path(tmp) / "full"
            results["write_checkpoint_s"] = write_checkpoint(checkpoint)
            print(f"wrote the full-size checkpoint in {results['write_checkpoint_s']} s", flush=True)
        for mode in args.modes.split(","):
            command = [sys.executable, __file__, "--worker", mode, "--checkpoint", str(checkpoint)]
            command += ["--new-tokens", str(args.new_tokens)]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout_s, check=False)
            except subprocess.TimeoutExpired:
                results["modes"][mode] = {"skipped": f"over {args.timeout_s:.0f} s on this CPU"}
                print(json.dumps({mode: results["modes"][mode]}), flush=True)
                continue
            if done.returncode != 0:
                results["modes"][mode] = {"failed": done.stderr.strip().splitlines()[-1:]}
            else:
                results["modes"][mode] = json.loads(done.stdout.strip().splitlines()[-1])
            print(json.dumps({mode: results["modes"][mode]}), flush=True)
    results["tiny_agreement"] = tiny_agreement()
    print(json.dumps({"tiny_agreement": results["tiny_agreement"]}))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
