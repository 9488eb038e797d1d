"""Engine benchmark on the tiny checkpoint (CPU): continuous vs static batching under Poisson arrivals.

    .venv/bin/python benchmarks/engine_cpu.py [--out benchmarks/results/engine_cpu.json]   # ~5 minutes on 2 cores
    .venv/bin/python benchmarks/engine_cpu.py --quick      # smoke run, under a minute
    .venv/bin/python benchmarks/engine_cpu.py --requests 40 --rates 1,3,6,12 --seed 0 --threads 1

What it measures, every comparison in the same process on the same engine:

1. calibration: the tiny model's single-request speed (ms per token alone; the whole workload served one
   request after another, which gives the mix's sequential capacity; a full batch of long answers at once),
   so each rate can be read as an offered load;
2. Poisson arrivals of a seeded mix of requests (short or long answers, 0 to 2 images at num_crops 1 or 4
   from a pool of five demo images, a JSON schema or free text) at each rate, submitted from one driver
   thread at their arrival times, once with ``engine.static_batching = True`` (the previous engine: a batch
   is formed only when nothing runs, and decoded to its end) and once with continuous batching. Both modes
   get the same request sequence; the gaps are one seeded sequence of unit exponentials divided by the rate,
   so every rate also sees the same mix. Reported: p50/p99 time to first token and latency (with 60
   requests the p99 lies between the two slowest), completion tokens/s over the run's wall time (first
   submission to last answer: at light load it is set by the arrivals), the continuous/static ratios, and the
   engine's occupancy sampled every 20 ms (rows running, requests waiting);
3. head of line: two 900-token answers decoding, then an 8-token request; its latency vs the same request
   alone, in both modes.

The engine runs with the default Settings (32 rows, the KV bound that memory holds, which for the tiny model is
32 full 4,096-token contexts, 2048-token prefill chunks, 5 ms batch window) but a queue long enough that nothing
is refused. One engine serves every run (``static_batching``
toggled between runs, the feature cache cleared before each, the engine idle in between); the modes alternate
which goes first from rate to rate. The tiny random model rarely emits a stop token, so ``max_new_tokens``
decides a free-text answer's length (a JSON answer ends where its grammar closes). ``--threads`` defaults to 1:
the tiny model's matrices are too small for intra-op threads to help, and on a machine shared with another
process two OpenMP threads spin against it (decode steps then vary tenfold from run to run).

``benchmarks/gpu_suite.py`` runs the same scenario on the full-size model (it imports the functions below).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import random
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from PIL import Image

from phi3v_tools.demo import book_cover, revenue_chart, scene, text_page
from phi3v_tools.errors import BusyError, CancelledError
from phi3v_tools.runner import GenerationRequest, GenerationResult, RequestHandle, Runner
from phi3v_tools.settings import Settings

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "caption": {"type": "string"},
        "kind": {"type": "string", "enum": ["photo", "chart", "document", "other"]},
        "objects": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["caption", "kind", "objects"],
}
DEFAULT_RATES = (1.0, 3.0, 6.0, 12.0)  # requests/s; see the calibration in the JSON for what they mean here


@dataclass(frozen=True)
class Mix:
    """How the requests of a Poisson run are drawn."""

    short_tokens: int = 8
    long_tokens: tuple[int, int] = (200, 400)  # uniform, inclusive
    p_long: float = 0.5
    max_images: int = 2  # 0..max_images images, uniform
    crops: tuple[int, ...] = (1, 4)
    p_schema: float = 0.3


@dataclass(frozen=True)
class Spec:
    """One request of a run: its unit-rate arrival gap and what it asks."""

    gap: float  # exponential with mean 1: the gap before it is gap / rate
    text: str
    images: tuple[int, ...]  # indices into the image pool
    num_crops: int
    max_new_tokens: int
    schema: bool

    def request(self, pool: Sequence[Image.Image], **options: Any) -> GenerationRequest:
        return GenerationRequest.from_text(
            self.text,
            [pool[i] for i in self.images],
            max_new_tokens=self.max_new_tokens,
            json_schema=SCHEMA if self.schema else None,
            num_crops=self.num_crops,
            **options,
        )


def image_pool() -> list[Image.Image]:
    """Five distinct demo pictures: requests pick from them, so the feature cache hits on repeats as in use."""
    return [revenue_chart(), book_cover(), scene(False), scene(True), text_page()]


def make_workload(n: int, seed: int, mix: Mix, pool_size: int) -> list[Spec]:
    rng = random.Random(seed)
    specs = []
    for i in range(n):
        gap = rng.expovariate(1.0)
        long = rng.random() < mix.p_long
        tokens = rng.randint(*mix.long_tokens) if long else mix.short_tokens
        images = tuple(rng.randrange(pool_size) for _ in range(rng.randint(0, mix.max_images)))
        crops = rng.choice(mix.crops)
        schema = rng.random() < mix.p_schema
        verb = "Describe the image" if images else "Write about the weather"
        specs.append(Spec(gap, f"Request {i}: {verb}, in detail.", images, crops, tokens, schema))
    return specs


def quantile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 1)


def load_note() -> dict[str, Any]:
    one, five, fifteen = os.getloadavg()
    return {"loadavg_1_5_15": [round(one, 2), round(five, 2), round(fifteen, 2)], "cpu_count": os.cpu_count()}


def wait_idle(engine: Runner, timeout: float = 60.0) -> None:
    """Until the engine runs, prefills and queues nothing (the previous run's rows have all left)."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        info = engine.info()
        if not (info["running"] or info["prefilling"] or info["queue"]):
            return
        time.sleep(0.01)
    raise RuntimeError(f"the engine did not become idle within {timeout} s: {engine.info()}")


def warm_up(engine: Runner, pool: Sequence[Image.Image], mix: Mix) -> None:
    """Grammar engine and this schema compiled, every num_crops through the vision tower once, then no cache."""
    engine.grammars.warm_up()
    engine.generate_sync(GenerationRequest.from_text("warm up", max_new_tokens=4, json_schema=SCHEMA))
    for crops in mix.crops:
        engine.generate_sync(GenerationRequest.from_text("warm up", [pool[0]], max_new_tokens=2, num_crops=crops))
    engine.feature_cache.clear()


def calibrate(
    engine: Runner, specs: Sequence[Spec], pool: Sequence[Image.Image], mix: Mix, sample: int | None = None
) -> dict[str, Any]:
    """Single-request speed: ms/token alone; the workload served one request at a time (all of it, or ``sample``
    requests spread evenly over it); a full batch of long answers at once."""
    engine.static_batching = False
    wait_idle(engine)
    long_tokens = mix.long_tokens[1]
    alone = engine.generate_sync(GenerationRequest.from_text("Tell me a story.", max_new_tokens=long_tokens))
    ms_per_token = alone.timings.decode_s / max(alone.completion_tokens - 1, 1)
    engine.feature_cache.clear()
    chosen = list(specs) if sample is None or sample >= len(specs) else list(specs[:: len(specs) // sample][:sample])
    started = time.perf_counter()
    served = [engine.generate_sync(spec.request(pool)) for spec in chosen]
    sequential_s = time.perf_counter() - started
    service = statistics.mean(r.timings.total_s for r in served)
    tokens = statistics.mean(r.completion_tokens for r in served)
    rows = engine.limits.max_batch_size
    started = time.perf_counter()
    handles = [
        engine.submit(GenerationRequest.from_text(f"Story {i}.", max_new_tokens=long_tokens)) for i in range(rows)
    ]
    batch = [h.future.result() for h in handles]
    batch_s = time.perf_counter() - started
    batch_tokens_per_s = sum(r.completion_tokens for r in batch) / batch_s
    engine.feature_cache.clear()
    return {
        "alone_new_tokens": alone.completion_tokens,
        "alone_ms_per_token": round(ms_per_token * 1e3, 2),
        "alone_tokens_per_s": round(1 / ms_per_token, 1),
        "sample_requests": len(served),
        "sample_is_whole_workload": len(served) == len(specs),
        "sample_sequential_s": round(sequential_s, 2),
        "sample_completion_tokens": sum(r.completion_tokens for r in served),
        "sample_p99_ttft_ms": ms(quantile([r.timings.first_token_s for r in served], 0.99)),
        "sample_mean_completion_tokens": round(tokens, 1),
        "sample_mean_service_s": round(service, 3),
        "sequential_capacity_rps": round(1 / service, 2),  # the mix served one at a time
        "full_batch_rows": rows,
        "full_batch_tokens_per_s": round(batch_tokens_per_s, 1),
        # if every step decoded a full batch and prefill and vision were free: an upper bound
        "full_batch_capacity_rps": round(batch_tokens_per_s / tokens, 2),
    }


def rates_from(calibration: dict[str, Any], loads: Sequence[float]) -> list[float]:
    """Rates (requests/s) at the given multiples of the mix's sequential capacity."""
    return [round(load * calibration["sequential_capacity_rps"], 3) for load in loads]


class Occupancy:
    """Samples the engine's running, prefilling and queued counts every ``every`` seconds, on its own thread."""

    def __init__(self, engine: Runner, every: float = 0.02) -> None:
        self.engine = engine
        self.every = every
        self.samples: list[tuple[float, int, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="occupancy", daemon=True)

    def __enter__(self) -> Occupancy:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            info = self.engine.info()
            self.samples.append((time.perf_counter(), info["running"], info["prefilling"], info["queue"]))

    def summary(self, start: float, end: float, slots: int) -> dict[str, Any]:
        window = [s for s in self.samples if start <= s[0] <= end]
        if not window:
            return {}
        return {
            "samples": len(window),
            "running_mean": round(statistics.mean(s[1] for s in window), 2),
            "running_max": max(s[1] for s in window),
            "prefilling_mean": round(statistics.mean(s[2] for s in window), 2),
            "queued_mean": round(statistics.mean(s[3] for s in window), 2),
            "queued_max": max(s[3] for s in window),
            # every one of max_batch_size rows taken (running or being prefilled): arrivals must queue
            "slots_full_fraction": round(sum(s[1] + s[2] >= slots for s in window) / len(window), 3),
            # some request submitted and not admitted (being prepared, or held back by the row or KV bound)
            "waiting_fraction": round(sum(s[3] > 0 for s in window) / len(window), 3),
        }


def _mark_done(done_at: dict[int, float], i: int, _future: object) -> None:
    done_at[i] = time.perf_counter()


def run_poisson(
    engine: Runner, specs: Sequence[Spec], rate: float, pool: Sequence[Image.Image], *, static: bool
) -> dict[str, Any]:
    """Submit ``specs`` at their arrival times (gap / rate) from this thread; wait for every result."""
    wait_idle(engine)
    engine.static_batching = static
    engine.feature_cache.clear()
    before = engine.info()
    chunks_before = getattr(engine, "prefill_chunks", 0)
    load_before = os.getloadavg()[0]
    done_at: dict[int, float] = {}
    handles: dict[int, RequestHandle] = {}
    refused = 0
    lags = []
    with Occupancy(engine) as occupancy:
        started = time.perf_counter()
        due = started
        for i, spec in enumerate(specs):
            due += spec.gap / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            lags.append(max(time.perf_counter() - due, 0.0))
            try:
                handle = engine.submit(spec.request(pool))
            except BusyError:
                refused += 1
                continue
            handle.future.add_done_callback(functools.partial(_mark_done, done_at, i))
            handles[i] = handle
        submitted_s = time.perf_counter() - started
        results: list[GenerationResult] = []
        failures: dict[str, int] = {}
        for handle in handles.values():
            try:
                results.append(handle.future.result(timeout=600))
            except Exception as exc:
                failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
    first = min(h.submitted for h in handles.values())
    last = max(done_at.values(), default=time.perf_counter())
    wall = last - first
    after = engine.info()
    ttft = [r.timings.first_token_s for r in results]
    total = [r.timings.total_s for r in results]
    queue = [r.timings.queue_s for r in results]
    tokens = sum(r.completion_tokens for r in results)
    steps = after["decode_steps"] - before["decode_steps"]
    engine.static_batching = False
    return {
        "mode": "static" if static else "continuous",
        "requests": len(specs),
        "completed": len(results),
        "refused": refused,
        "failed": failures,
        "completion_tokens": tokens,
        "wall_s": round(wall, 3),
        "arrivals_s": round(submitted_s, 3),
        "throughput_tokens_per_s": round(tokens / wall, 1) if wall > 0 else 0.0,
        "ttft_p50_ms": ms(quantile(ttft, 0.5)),
        "ttft_p99_ms": ms(quantile(ttft, 0.99)),
        "latency_p50_ms": ms(quantile(total, 0.5)),
        "latency_p99_ms": ms(quantile(total, 0.99)),
        "queue_p50_ms": ms(quantile(queue, 0.5)),
        "queue_p99_ms": ms(quantile(queue, 0.99)),
        "driver_lag_max_ms": ms(max(lags, default=0.0)),  # how far behind schedule a submission went
        "decode_steps": steps,
        "rows_per_decode_step": round((tokens - len(results)) / steps, 2) if steps else 0.0,
        "batches_started": after["batches"] - before["batches"],
        "joins": after["joins"] - before["joins"],
        "prefill_chunks": getattr(engine, "prefill_chunks", 0) - chunks_before,
        "occupancy": occupancy.summary(first, last, engine.limits.max_batch_size),
        "cached_images": sum(r.cached_images for r in results),
        "images": sum(len(s.images) for s in specs),
        "loadavg_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def compare_modes(
    engine: Runner,
    specs: Sequence[Spec],
    rates: Sequence[float],
    pool: Sequence[Image.Image],
    calibration: dict[str, Any] | None = None,
    log: Any = print,
) -> list[dict[str, Any]]:
    """Static vs continuous batching at each rate, the same request sequence for both."""
    out = []
    for k, rate in enumerate(rates):
        order = (True, False) if k % 2 == 0 else (False, True)
        runs = {}
        for static in order:
            run = run_poisson(engine, specs, rate, pool, static=static)
            runs[run["mode"]] = run
            log(
                f"  rate {rate:g}/s {run['mode']:>10}: p99 ttft {run['ttft_p99_ms']:.0f} ms, p99 latency "
                f"{run['latency_p99_ms']:.0f} ms, {run['throughput_tokens_per_s']:.0f} tok/s, "
                f"{run['completed']}/{run['requests']} done in {run['wall_s']:.1f} s"
            )
        static_run, continuous = runs["static"], runs["continuous"]
        entry: dict[str, Any] = {"rate_rps": rate}
        if calibration is not None:
            entry["offered_load_vs_sequential"] = round(rate / calibration["sequential_capacity_rps"], 2)
            entry["offered_load_vs_full_batch"] = round(rate / calibration["full_batch_capacity_rps"], 2)
        entry["first_mode"] = "static" if order[0] else "continuous"
        entry["static"] = static_run
        entry["continuous"] = continuous
        entry["continuous_vs_static"] = {
            "p99_ttft": ratio(continuous["ttft_p99_ms"], static_run["ttft_p99_ms"]),
            "p50_ttft": ratio(continuous["ttft_p50_ms"], static_run["ttft_p50_ms"]),
            "p99_latency": ratio(continuous["latency_p99_ms"], static_run["latency_p99_ms"]),
            "throughput": ratio(continuous["throughput_tokens_per_s"], static_run["throughput_tokens_per_s"]),
        }
        # greedy answers do not depend on the company: both modes must produce the same tokens
        entry["same_completion_tokens"] = static_run["completion_tokens"] == continuous["completion_tokens"]
        out.append(entry)
    return out


def head_of_line(
    engine: Runner, *, static: bool, long_tokens: int = 900, short_tokens: int = 8, repeats: int = 3, streamed: int = 4
) -> dict[str, Any]:
    """A ``short_tokens`` request submitted while two ``long_tokens`` answers decode, vs the same request alone.

    The short request goes in once both long answers have streamed ``streamed`` pieces of text; the baseline is
    the median of three runs of it alone before each repeat. Continuous mode cancels the long answers once the
    short one is done (static mode has finished them by then)."""
    wait_idle(engine)
    engine.static_batching = static
    engine.feature_cache.clear()

    def short() -> GenerationRequest:
        return GenerationRequest.from_text("What is two plus two?", max_new_tokens=short_tokens)

    alone: list[GenerationResult] = []
    loaded: list[GenerationResult] = []
    streamed_before = []
    long_left = []
    for k in range(repeats):
        wait_idle(engine)
        alone += [engine.generate_sync(short()) for _ in range(3)]  # interleaved: the same machine load as below
        counts = [0, 0]
        ready = threading.Event()

        def listener(j: int, counts: list[int] = counts, ready: threading.Event = ready) -> Any:
            def on_text(_piece: str) -> None:
                counts[j] += 1
                if min(counts) >= streamed:
                    ready.set()

            return on_text

        longs = [
            engine.submit(
                GenerationRequest.from_text(f"Tell a long story ({k}, {j}).", max_new_tokens=long_tokens, on_text=fn)
            )
            for j, fn in enumerate((listener(0), listener(1)))
        ]
        if not ready.wait(timeout=120):
            raise RuntimeError(f"the two long answers did not both stream {streamed} pieces: {counts}")
        streamed_before.append(list(counts))
        result = engine.submit(short()).future.result(timeout=600)
        loaded.append(result)
        long_left.append(sum(not h.future.done() for h in longs))
        for handle in longs:
            handle.cancel()  # continuous: they leave before the next step (static: already finished)
        for handle in longs:
            with contextlib.suppress(CancelledError):
                handle.future.result(timeout=600)
    engine.static_batching = False
    alone_s = statistics.median(r.timings.total_s for r in alone)
    loaded_s = statistics.median(r.timings.total_s for r in loaded)
    return {
        "mode": "static" if static else "continuous",
        "long_tokens": long_tokens,
        "short_tokens": short_tokens,
        "repeats": repeats,
        "short_alone_ms": ms(alone_s),
        "short_alone_all_ms": [ms(r.timings.total_s) for r in alone],
        "short_alone_ttft_ms": ms(statistics.median(r.timings.first_token_s for r in alone)),
        "short_behind_longs_ms": ms(loaded_s),
        "short_behind_longs_ttft_ms": ms(statistics.median(r.timings.first_token_s for r in loaded)),
        "short_behind_longs_all_ms": [ms(r.timings.total_s) for r in loaded],
        "long_pieces_streamed_when_submitted": streamed_before,
        "longs_still_running_when_short_done": long_left,
        "ratio": round(loaded_s / alone_s, 2),
    }


def machine_info() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "cpu_threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/engine_cpu.json"))
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--requests", type=int, default=60, help="requests per rate and mode")
    parser.add_argument(
        "--rates", default=None, help=f"comma-separated requests/s (default {','.join(map(str, DEFAULT_RATES))})"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--max-batch-size", type=int, default=Settings.max_batch_size, help="the engine's rows")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 10 requests, two rates, short HOL")
    args = parser.parse_args()

    started = time.perf_counter()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    requests = 10 if args.quick and args.requests == parser.get_default("requests") else args.requests
    if args.rates:
        rates = [float(r) for r in args.rates.split(",")]
    else:
        rates = [2.0, DEFAULT_RATES[-1]] if args.quick else list(DEFAULT_RATES)
    mix = Mix()
    settings = Settings(model=args.model, max_batch_size=args.max_batch_size, max_queue=256)  # nothing refused
    runner = Runner.load(settings, progress=False, warm_up=False)
    results: dict[str, Any] = {
        "machine": machine_info(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "model": args.model,
        "quick": args.quick,
        "seed": args.seed,
        "load_at_start": load_note(),
    }
    try:
        pool = image_pool()
        warm_up(runner, pool, mix)
        specs = make_workload(requests, args.seed, mix, len(pool))
        results["engine"] = {
            "one_engine_toggled": True,
            "max_batch_size": runner.limits.max_batch_size,
            "max_batch_tokens": runner.limits.max_batch_tokens,  # None: from memory, kv_budget_tokens below
            "kv_budget_tokens": runner.admission.kv_tokens,
            "prefill_chunk_tokens": runner.limits.prefill_chunk_tokens,
            "max_step_images": runner.limits.max_step_images,
            "batch_window_ms": runner.limits.batch_window_ms,
            "max_queue": runner.limits.max_queue,
        }
        results["mix"] = {
            **asdict(mix),
            "schema": SCHEMA,
            "image_pool": "revenue_chart, book_cover, scene(False), scene(True), text_page",
            "long_requests": sum(s.max_new_tokens > mix.short_tokens for s in specs),
            "schema_requests": sum(s.schema for s in specs),
            "images": sum(len(s.images) for s in specs),
            "requested_new_tokens": sum(s.max_new_tokens for s in specs),
        }
        calibration = calibrate(runner, specs, pool, mix)  # the whole workload, one request at a time
        results["calibration"] = calibration
        print(f"calibration: {calibration}", flush=True)
        results["rates_rps"] = rates
        results["rates_chosen"] = (
            "defaults 1, 3, 6, 12 requests/s, picked from calibrations on the 2-core machine (the mix's sequential "
            "capacity measured 2.5-3.7 requests/s across runs, a full batch's decode-only upper bound 7-15): 1/s is "
            "light load (about a third of the sequential capacity), 3/s about the sequential capacity, 6/s at the "
            "batched engine's saturation (a run then outlasts its arrivals), 12/s over it; each run's "
            "offered_load_vs_* fields give the ratios measured in that run"
        )
        results["poisson"] = compare_modes(runner, specs, rates, pool, calibration)
        hol_repeats = 1 if args.quick else 3
        hol_tokens = 200 if args.quick else 900
        results["head_of_line"] = {
            mode: head_of_line(runner, static=mode == "static", long_tokens=hol_tokens, repeats=hol_repeats)
            for mode in ("static", "continuous")
        }
        for mode, hol in results["head_of_line"].items():
            print(
                f"head of line, {mode}: {hol['short_behind_longs_ms']:.0f} ms behind two {hol_tokens}-token answers "
                f"vs {hol['short_alone_ms']:.0f} ms alone: {hol['ratio']}x",
                flush=True,
            )
        results["engine"]["info"] = runner.info()
    finally:
        runner.close()
    results["load_at_end"] = load_note()
    results["runtime_s"] = round(time.perf_counter() - started, 1)
    loads = [results["load_at_start"]["loadavg_1_5_15"][0], results["load_at_end"]["loadavg_1_5_15"][0]]
    loads += [
        x for entry in results["poisson"] for m in ("static", "continuous") for x in entry[m]["loadavg_1m_before_after"]
    ]
    results["max_loadavg_1m"] = max(loads)  # this benchmark itself accounts for about 1
    if max(loads) > 1.5:
        results["note"] = (
            f"the machine was shared: 1-minute load average up to {max(loads):.1f} on {os.cpu_count()} CPUs during "
            "the run (this benchmark accounts for about 1; the rest is other processes, e.g. a test suite): "
            "absolute times are inflated and noisy, ratios less so"
        )
    print("\nrate/s mode        TTFT p50/p99 ms  latency p50/p99 ms  tok/s  rows/step  slots full  waiting")
    for entry in results["poisson"]:
        for mode in ("static", "continuous"):
            run = entry[mode]
            ttft = f"{run['ttft_p50_ms']:.0f}/{run['ttft_p99_ms']:.0f}"
            latency = f"{run['latency_p50_ms']:.0f}/{run['latency_p99_ms']:.0f}"
            full = run["occupancy"].get("slots_full_fraction", float("nan"))
            waiting = run["occupancy"].get("waiting_fraction", float("nan"))
            print(
                f"{entry['rate_rps']:<6g} {mode:<11} {ttft:>15} {latency:>19} {run['throughput_tokens_per_s']:>6.0f} "
                f"{run['rows_per_decode_step']:>10.2f} {full:>11.0%} {waiting:>8.0%}"
            )
        ratios = entry["continuous_vs_static"]
        print(f"{'':<6} ratios      p99 TTFT x{ratios['p99_ttft']}, throughput x{ratios['throughput']}")
    print(f"runtime {results['runtime_s']} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
