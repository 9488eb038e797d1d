"""vLLM against phi3v-tools serve, on one GPU, through the remote backend: does every tool work against vLLM's
Phi-3-vision, and how do the two servers compare in throughput and latency, measured in the same run.

    python benchmarks/vllm_check.py --vllm-python /opt/vllm/bin/python          # on a CUDA machine, ~8 minutes
    python benchmarks/vllm_check.py --vllm-python ... --remote-code-dir DIR      # DIR: the hub's *_phi3_v.py files
    python benchmarks/vllm_check.py --dry-run --out /tmp/vllm_check_dry.json     # CPU smoke test, phi3v-tools half

vLLM and phi3v-tools cannot share a virtualenv (vLLM pins transformers below 5.21, phi3v-tools needs 5.24 or
later; see servers/vllm/README.md), so vLLM is started with ``--vllm-python``, the interpreter of its own
environment (default: this one). This process needs only phi3v-tools with the ``remote`` extra; the phi3v-tools
server runs from this environment. No download, no checkpoint file:

1. **vLLM** (``python -m vllm.entrypoints.openai.api_server``) with ``--load-format dummy`` (random weights) on
   the official config and tokenizer of the chosen checkpoint (copied from the shared reference data into a
   temporary model directory), with the flags servers/vllm/README.md recommends. ``--trust-remote-code`` needs
   the hub's configuration and processor code (``configuration_phi3_v.py``, ``processing_phi3_v.py``, and
   ``image_processing_phi3_v.py`` for Phi-3-vision-128k), which the reference data does not hold: give them with
   ``--remote-code-dir`` (or have them in the local Hugging Face cache); without them the vLLM half is recorded as
   skipped, with the reason. vLLM not installed for ``--vllm-python``: recorded as ``"vllm": "not installed"``.
2. **phi3v-tools serve** on the same card, with the same full-size random-weight model: built on the card by
   benchmarks/gpu_suite.py's ``build_model`` (imported), with the checkpoint's official tokenizer and
   preprocessor config, served by the same app as ``phi3v-tools serve`` in a subprocess.

The servers run one after the other, never at once. Against each: every tool once through
``PHI3V_BACKEND=openai``'s backend (``OpenAIBackend`` + ``Toolbox``), with its outcome (random weights write
garbage, so an answer our schema validation rejects is a recorded outcome, not a crash) and latency; then
``describe_image`` (brief: at most 160 new tokens) at each ``--concurrency`` level, every call with an image of
its own (no cache hits on either server): calls/s, p50/p95 latency, completion tokens/s, and vLLM's figures over
phi3v-tools' in this run. ``--budget-s`` bounds the whole run: phases that no longer fit are skipped and listed
in ``skipped``; servers are killed on the way out whatever happens.

Results: benchmarks/results/vllm_check_<card>.json (``--out`` to choose). ``--dry-run``: the phi3v-tools half
only (``phi3v-tools serve`` itself, on CPU, on the shared tiny random checkpoint, small numbers); the vLLM half
is prepared (model directory, remote-code check, command) but not started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import ImageDraw

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
REFERENCE = Path(os.environ.get("PHI3V_REFERENCE_DIR", REPO.parent / "shared" / "phi3v-reference"))
CHECKPOINTS = {
    "phi-3-vision-128k-instruct": "microsoft/Phi-3-vision-128k-instruct",
    "phi-3.5-vision-instruct": "microsoft/Phi-3.5-vision-instruct",
}
# Files of a checkpoint that vLLM reads besides the weights (no weights: --load-format dummy).
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
)
SCHEMA = {"type": "object", "properties": {"count": {"type": "integer"}}, "required": ["count"]}
SERVED_NAME = "phi3v"  # the model id both servers list
MAX_IMAGES = 4  # --limit-mm-per-prompt, and phi3v-tools' default PHI3V_MAX_COMPARE
MAX_MODEL_LEN = 4096  # --max-model-len, and phi3v-tools' default PHI3V_MAX_CONTEXT


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Budget:
    """The run's deadline, and the phases skipped because they no longer fit."""

    def __init__(self, seconds: float) -> None:
        self.started = time.monotonic()
        self.deadline = self.started + seconds
        self.skipped: list[dict[str, str]] = []

    def left(self, until: float | None = None) -> float:
        return max(0.0, min(self.deadline, until or self.deadline) - time.monotonic())

    def skip(self, phase: str, reason: str) -> None:
        log(f"skipped {phase}: {reason}")
        self.skipped.append({"phase": phase, "reason": reason})


# -- the card and the versions ---------------------------------------------------------------------------------------


def card_name(dry_run: bool) -> str:
    if not dry_run:
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            )
            if out.stdout.strip():
                return out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError):
            pass
        try:
            import torch

            if torch.cuda.is_available():
                return str(torch.cuda.get_device_name(0))
        except ImportError:
            pass
    return f"{platform.processor() or platform.machine()} (CPU, {os.cpu_count()} cores)"


def local_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("phi3v-tools", "torch", "transformers", "openai"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def vllm_versions(python: str) -> dict[str, Any]:
    """vLLM's and transformers' versions in ``python``'s environment (metadata only: nothing is imported)."""
    probe = (
        "import importlib.metadata as m, json, sys\n"
        "def v(n):\n"
        "    try:\n"
        "        return m.version(n)\n"
        "    except m.PackageNotFoundError:\n"
        "        return None\n"
        "print(json.dumps({'vllm': v('vllm'), 'transformers': v('transformers'), 'torch': v('torch'),"
        " 'python': sys.version.split()[0]}))\n"
    )
    try:
        out = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
        found: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        return {"vllm": None, "error": f"{python} could not be asked ({type(exc).__name__}: {exc})"[:500]}
    return found


# -- the vLLM model directory ----------------------------------------------------------------------------------------


def remote_code_modules(model_dir: Path) -> list[str]:
    """The modules ``--trust-remote-code`` imports for vLLM: the config's AutoConfig and the processor's entries
    (``auto_map`` of config.json, preprocessor_config.json and processor_config.json). vLLM runs its own model, so
    the hub's modeling code is not needed."""
    needed: set[str] = set()
    for name in ("config.json", "preprocessor_config.json", "processor_config.json"):
        path = model_dir / name
        if not path.is_file():
            continue
        auto_map = json.loads(path.read_text()).get("auto_map", {})
        for key, target in auto_map.items():
            if name == "config.json" and key != "AutoConfig":
                continue
            needed.add(str(target).split(".")[0])
    return sorted(needed)


def hub_cache_snapshots(repo_id: str) -> list[Path]:
    """Snapshot folders of ``repo_id`` already in the local Hugging Face cache (looked up, never downloaded)."""
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    root = Path(os.environ.get("HF_HUB_CACHE", home / "hub")) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return sorted(root.glob("*"), reverse=True) if root.is_dir() else []


def prepare_vllm_model(checkpoint: str, target: Path, code_dir: Path | None) -> dict[str, Any]:
    """A model directory for ``--load-format dummy``: the official config and tokenizer, plus the hub's remote
    code when it can be found. Returns what was done, with ``missing`` naming the remote-code files not found."""
    source = REFERENCE / checkpoint
    if not (source / "config.json").is_file():
        return {"ok": False, "reason": f"no official config at {source} (set PHI3V_REFERENCE_DIR)"}
    target.mkdir(parents=True, exist_ok=True)
    copied = [name for name in MODEL_FILES if (source / name).is_file()]
    for name in copied:
        shutil.copyfile(source / name, target / name)
    needed = remote_code_modules(target)
    places = [code_dir] if code_dir is not None else hub_cache_snapshots(CHECKPOINTS[checkpoint])
    found_in = None
    for place in places:
        if all((place / f"{module}.py").is_file() for module in needed):
            found_in = place
            break
    info: dict[str, Any] = {
        "source": str(source),
        "files": copied,
        "remote_code_needed": [f"{m}.py" for m in needed],
        "remote_code_searched": [str(p) for p in places] or ["(the local Hugging Face cache has no snapshot)"],
    }
    if found_in is None:
        have = {p.name for place in places for p in place.glob("*.py")}
        info["missing"] = [f"{m}.py" for m in needed if f"{m}.py" not in have] or info["remote_code_needed"]
        info["ok"] = False
        info["reason"] = (
            f"--trust-remote-code needs the hub's {', '.join(info['remote_code_needed'])} beside config.json; the "
            f"reference data at {source} has configs and tokenizer only. Give the files with --remote-code-dir DIR "
            f"(e.g. from `hf download {CHECKPOINTS[checkpoint]} --include '*.py' --local-dir DIR`)"
        )
        return info
    for path in sorted(found_in.glob("*.py")):  # every module: a processor may import a sibling
        shutil.copyfile(path, target / path.name)
    info["remote_code_from"] = str(found_in)
    info["ok"] = True
    return info


def vllm_command(python: str, model_dir: Path, port: int, key: str, num_crops: int, extra: list[str]) -> list[str]:
    """The server of servers/vllm/README.md, on loopback, with random weights."""
    return [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        SERVED_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--api-key",
        key,
        "--dtype",
        "bfloat16",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--limit-mm-per-prompt",
        json.dumps({"image": MAX_IMAGES}),
        "--mm-processor-kwargs",
        json.dumps({"num_crops": num_crops}),
        "--trust-remote-code",
        "--allowed-media-domains",
        "media.invalid",  # any http(s) image URL is refused; file:// is refused without --allowed-local-media-path
        "--load-format",
        "dummy",
        *extra,
    ]


# -- servers ---------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_healthy(process: subprocess.Popen[bytes], port: int, key: str, seconds: float) -> str | None:
    """None once ``/health`` answers 200, else why not (exited, or not healthy within ``seconds``)."""
    deadline = time.monotonic() + seconds
    request = urllib.request.Request(f"http://127.0.0.1:{port}/health", headers={"Authorization": f"Bearer {key}"})
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return f"exited with status {process.returncode} during start-up"
        try:
            with urllib.request.urlopen(request, timeout=2) as answer:
                if answer.status == 200:
                    return None
        except OSError:
            pass
        time.sleep(0.5)
    return f"not healthy within {seconds:.0f} s"


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group (vLLM's engine runs in a child process), SIGKILL if it lingers."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):  # whatever of the group is left (children outliving the leader)
        os.killpg(process.pid, signal.SIGKILL)
    if process.poll() is None:
        process.wait(timeout=10)


def log_tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


# -- workloads -------------------------------------------------------------------------------------------------------


def write_images(folder: Path) -> dict[str, str]:
    from phi3v_tools.demo import book_cover, revenue_chart, sales_table, scene

    pictures = {
        "chart": revenue_chart(),
        "cover": book_cover(),
        "table": sales_table(),
        "scene_a": scene(False),
        "scene_b": scene(True),
    }
    paths = {}
    for name, image in pictures.items():
        paths[name] = str(folder / f"{name}.png")
        image.save(paths[name])
    return paths


def distinct_images(folder: Path, prefix: str, count: int) -> list[str]:
    """``count`` different pictures (a scene with a numbered patch), so that no server finds one in a cache."""
    from phi3v_tools.demo import scene

    base = scene(True)
    paths = []
    for i in range(count):
        image = base.copy()
        draw = ImageDraw.Draw(image)
        x, y = 20 + (i * 37) % (image.width - 140), 20 + (i * 53) % (image.height - 80)
        draw.rectangle((x, y, x + 120, y + 60), fill=((i * 71) % 256, (i * 113) % 256, (i * 29) % 256))
        draw.text((x + 10, y + 20), f"{prefix} {i}", fill=(255, 255, 255))
        path = folder / f"{prefix}_{i}.png"
        image.save(path)
        paths.append(str(path))
    return paths


def tool_calls(images: dict[str, str]) -> dict[str, Callable[[Any], Any]]:
    return {
        "describe_image": lambda t: t.describe_image(images["chart"], "What does it show?", "brief"),
        "read_text (fields)": lambda t: t.read_text(images["cover"], ["title", "author"]),
        "read_table": lambda t: t.read_table(images["table"]),
        "compare_images (2)": lambda t: t.compare_images([images["scene_a"], images["scene_b"]]),
        "ask_images (schema)": lambda t: t.ask_images(images["chart"], "How many bars?", SCHEMA),
    }


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:400]


def run_tools(toolbox: Any, images: dict[str, str], budget: Budget, until: float, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, call in tool_calls(images).items():
        if budget.left(until) < 5:
            budget.skip(f"{where}: {name}", "budget")
            continue
        started = time.perf_counter()
        try:
            result = call(toolbox)
        except Exception as exc:  # an error is an outcome here: random weights, a server's refusal, a timeout
            out[name] = {"ok": False, "seconds": round(time.perf_counter() - started, 3), "error": error_text(exc)}
        else:
            out[name] = {
                "ok": True,
                "seconds": round(time.perf_counter() - started, 3),
                "prompt_tokens": result.call.prompt_tokens,
                "completion_tokens": result.call.completion_tokens,
                "cached_images": result.call.cached_images,
                "truncated": result.call.truncated,
            }
        log(f"  {where} {name}: {json.dumps(out[name])}")
    return out


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    low = math.floor(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


async def burst(toolbox: Any, paths: list[str], concurrency: int, seconds: float) -> dict[str, Any]:
    """``describe_image`` on every path, ``concurrency`` calls in flight at once, stopped after ``seconds``."""
    slots = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []

    async def one(path: str) -> None:
        async with slots:
            started = time.perf_counter()
            try:
                result = await toolbox.adescribe_image(path, None, "brief")
            except Exception as exc:
                errors.append(error_text(exc))
            else:
                latencies.append(time.perf_counter() - started)
                tokens.append(result.call.completion_tokens)

    started = time.perf_counter()
    timed_out = False
    try:
        await asyncio.wait_for(asyncio.gather(*(one(p) for p in paths)), timeout=seconds)
    except asyncio.TimeoutError:
        timed_out = True
    wall = time.perf_counter() - started
    p50, p95 = percentile(latencies, 0.5), percentile(latencies, 0.95)
    return {
        "concurrency": concurrency,
        "calls": len(paths),
        "completed": len(latencies),
        "errors": len(errors),
        "first_errors": errors[:3],
        "stopped_by_budget": timed_out,
        "seconds": round(wall, 3),
        "calls_per_s": round(len(latencies) / wall, 3) if wall > 0 else None,
        "completion_tokens_per_s": round(sum(tokens) / wall, 1) if wall > 0 else None,
        "mean_completion_tokens": round(statistics.mean(tokens), 1) if tokens else None,
        "p50_s": round(p50, 3) if p50 is not None else None,
        "p95_s": round(p95, 3) if p95 is not None else None,
    }


def run_throughput(
    toolbox: Any, folder: Path, levels: list[int], calls_per: Callable[[int], int], single_s: float | None, **kw: Any
) -> dict[str, Any]:
    budget: Budget = kw["budget"]
    until: float = kw["until"]
    where: str = kw["where"]
    out: dict[str, Any] = {}
    if budget.left(until) < 10:
        for level in levels:
            budget.skip(f"{where}: concurrency {level}", f"budget ({budget.left(until):.0f} s left)")
        return out
    warm = distinct_images(folder, f"{where}-warm", 1)
    try:  # the first call of a client pays its connection and the server's first-request costs
        asyncio.run(burst(toolbox, warm, 1, max(budget.left(until) - 1, 1)))
    except Exception as exc:
        log(f"  {where} warm-up failed: {error_text(exc)}")
    for level in levels:
        calls = calls_per(level)
        estimate = (single_s or 5.0) * math.ceil(calls / level) * 1.5 + 5
        left = budget.left(until)
        if left < estimate:
            budget.skip(f"{where}: concurrency {level}", f"budget ({left:.0f} s left, about {estimate:.0f} s needed)")
            continue
        paths = distinct_images(folder, f"{where}-c{level}", calls)
        out[f"concurrency_{level}"] = figures = asyncio.run(burst(toolbox, paths, level, left - 2))
        log(f"  {where} concurrency {level}: {json.dumps(figures)}")
    return out


def measure(name: str, port: int, key: str, folder: Path, args: argparse.Namespace, **kw: Any) -> dict[str, Any]:
    """Every tool, then the throughput levels, against the server at ``port``, through the remote backend."""
    from phi3v_tools.backends.openai import OpenAIBackend
    from phi3v_tools.images import ImagePolicy
    from phi3v_tools.tools import Toolbox

    budget: Budget = kw["budget"]
    until: float = kw["until"]
    backend = OpenAIBackend(
        f"http://127.0.0.1:{port}/v1", api_key=key, model=SERVED_NAME, timeout_s=args.call_timeout_s
    )
    toolbox = Toolbox(backend, ImagePolicy(allowed_dirs=(folder,), allow_urls=False))
    images = write_images(folder)
    out: dict[str, Any] = {"tools": run_tools(toolbox, images, budget, until, name)}
    describe = out["tools"].get("describe_image", {})
    single_s = describe.get("seconds") if describe.get("ok") else None

    def calls_per(level: int) -> int:
        return max(args.min_calls, args.calls_per_slot * level)

    out["throughput"] = run_throughput(
        toolbox, folder, args.concurrency, calls_per, single_s, budget=budget, until=until, where=name
    )
    backend.close()
    return out


# -- the two halves --------------------------------------------------------------------------------------------------


def vllm_half(args: argparse.Namespace, tmp: Path, budget: Budget, until: float, results: dict[str, Any]) -> None:
    model_dir = tmp / "vllm-model"
    prepared = prepare_vllm_model(args.checkpoint, model_dir, args.remote_code_dir)
    key = secrets.token_hex(16)
    port = free_port()
    command = vllm_command(args.vllm_python, model_dir, port, "KEY", args.num_crops, args.vllm_arg)
    server: dict[str, Any] = {"model_dir": prepared, "command": command}
    results["servers"]["vllm"] = server
    versions = vllm_versions(args.vllm_python)
    if not versions.get("vllm"):
        results["vllm"] = "not installed"
        results["vllm_detail"] = {
            "interpreter": args.vllm_python,
            **versions,
            "hint": "install vLLM in a virtualenv of its own and pass its interpreter with --vllm-python",
        }
        server["skipped"] = f"vLLM is not installed for {args.vllm_python}"
        log(f"vLLM: not installed for {args.vllm_python}")
        return
    results["vllm"] = {"interpreter": args.vllm_python, **versions}
    log(f"vLLM {versions['vllm']} (transformers {versions.get('transformers')}) at {args.vllm_python}")
    if not prepared.get("ok"):
        server["skipped"] = prepared["reason"]
        log(f"vLLM: skipped: {prepared['reason']}")
        return
    if args.dry_run:
        server["skipped"] = "dry run: the vLLM server is prepared, not started"
        return
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHI3V_")}
    env.update(HF_HUB_OFFLINE="1", VLLM_MEDIA_URL_ALLOW_REDIRECTS="0", VLLM_NO_USAGE_STATS="1")
    command = [key if part == "KEY" else part for part in command]  # the key: in the process, not in the JSON
    run_server("vllm", "vLLM", command, env, port, key, tmp, args, budget, until, server)


def run_server(
    name: str,
    label: str,
    command: list[str],
    env: dict[str, str],
    port: int,
    key: str,
    tmp: Path,
    args: argparse.Namespace,
    budget: Budget,
    until: float,
    server: dict[str, Any],
) -> None:
    """Start a server, wait until it is healthy, measure it into ``server``, and stop it whatever happens."""
    log_path = tmp / f"{name}.log"
    started = time.monotonic()
    process = start(command, env, log_path)
    try:
        problem = wait_healthy(process, port, key, min(args.startup_timeout_s, budget.left(until)))
        server["startup_s"] = round(time.monotonic() - started, 1)
        if problem is not None:
            server["failed"] = f"{label} {problem}"
            server["log_tail"] = log_tail(log_path)
            log(f"{label}: {problem}; log tail:\n{server['log_tail'][-1500:]}")
            return
        log(f"{label} healthy after {server['startup_s']} s")
        folder = tmp / f"{name}-images"
        folder.mkdir()
        server.update(measure(name, port, key, folder, args, budget=budget, until=until))
    finally:
        stop(process)
        server["log_tail"] = server.get("log_tail") or log_tail(log_path, 1500)


def phi3v_half(args: argparse.Namespace, tmp: Path, budget: Budget, results: dict[str, Any]) -> None:
    key = secrets.token_hex(16)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHI3V_")}
    env.update(PHI3V_API_KEY=key, PHI3V_SERVED_MODEL_NAME=SERVED_NAME, PHI3V_MAX_QUEUE="256")
    server: dict[str, Any] = {}
    results["servers"]["phi3v-tools"] = server
    if args.phi3v_model in ("random-full", "random-tiny"):
        size = args.phi3v_model.removeprefix("random-")
        spec = {
            "size": size,
            "device": args.device,
            "port": port,
            "num_crops": args.num_crops,
            "processor_dir": str(REFERENCE / args.checkpoint) if size == "full" else None,
        }
        command = [sys.executable, str(Path(__file__).resolve()), "--serve-worker", json.dumps(spec)]
        server["model"] = f"random {size}-size weights (benchmarks/gpu_suite.py build_model), on {args.device}"
    else:
        env.update(PHI3V_MODEL=args.phi3v_model, PHI3V_DEVICE=args.device, PHI3V_NUM_CROPS=str(args.num_crops))
        command = [sys.executable, "-m", "phi3v_tools.cli", "serve", "--port", str(port)]
        server["model"] = f"{args.phi3v_model}, on {args.device}"
    server["command"] = command
    run_server("phi3v-tools", "phi3v-tools serve", command, env, port, key, tmp, args, budget, budget.deadline, server)


def serve_worker(spec: dict[str, Any]) -> None:
    """``phi3v-tools serve`` over a random-weight model built here (no checkpoint file): the same app, guards and
    uvicorn set-up as phi3v_tools.serving.server.serve, over a runner made from gpu_suite's model."""
    import torch
    import uvicorn
    from phi3v_mcp.server import configure_logging, listening_socket, uvicorn_config

    from phi3v_tools.model import Phi3VProcessor
    from phi3v_tools.runner import Runner
    from phi3v_tools.serving.server import http_settings, serving_app
    from phi3v_tools.settings import Settings

    sys.path.insert(0, str(HERE))
    from gpu_suite import build_model

    configure_logging()
    device = torch.device(spec["device"])
    with tempfile.TemporaryDirectory() as tmp:
        model, processor = build_model(spec["size"], device, Path(tmp))
        if spec.get("processor_dir") and (Path(spec["processor_dir"]) / "tokenizer.json").is_file():
            processor = Phi3VProcessor.from_pretrained(spec["processor_dir"])  # the official tokenizer and crops
        settings = Settings(
            model=f"random-{spec['size']}",
            served_model_name=SERVED_NAME,
            api_key=os.environ["PHI3V_API_KEY"],
            serve_port=int(spec["port"]),
            num_crops=int(spec["num_crops"]),
            max_queue=256,
            device=spec["device"],
        )
        runner = Runner(model, processor, settings)
        runner.grammars.warm_up()
        app = serving_app(settings, runner)
        sock = listening_socket(settings.serve_host, settings.serve_port)
        try:
            uvicorn.Server(uvicorn_config(app, http_settings(settings))).run(sockets=[sock])
        finally:
            sock.close()
            runner.close()


def ratios(servers: dict[str, Any]) -> dict[str, Any]:
    """vLLM's figures over phi3v-tools' at each concurrency level both servers completed in this run."""
    a = servers.get("vllm", {}).get("throughput", {})
    b = servers.get("phi3v-tools", {}).get("throughput", {})
    out: dict[str, Any] = {}
    for level in sorted(set(a) & set(b)):
        row = {}
        for field in ("calls_per_s", "completion_tokens_per_s", "p50_s", "p95_s"):
            x, y = a[level].get(field), b[level].get(field)
            row[f"{field}_vllm_over_phi3v_tools"] = round(x / y, 3) if x and y else None
        out[level] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="phi3v-tools half only, on CPU, tiny checkpoint")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default: benchmarks/results/...)")
    parser.add_argument(
        "--budget-s", type=float, default=480.0, help="the whole run, later phases skipped (at most 300 with --dry-run)"
    )
    parser.add_argument("--checkpoint", choices=tuple(CHECKPOINTS), default="phi-3-vision-128k-instruct")
    parser.add_argument("--vllm-python", default=sys.executable, help="the interpreter of vLLM's environment")
    parser.add_argument("--remote-code-dir", type=Path, default=None, help="the hub's *_phi3_v.py files")
    parser.add_argument("--vllm-arg", action="append", default=[], help="one more vllm flag (repeatable)")
    parser.add_argument(
        "--phi3v-model", default=None, help="random-full (default), random-tiny, or a checkpoint directory"
    )
    parser.add_argument("--device", default=None, help="phi3v-tools' device (default: cuda; cpu with --dry-run)")
    parser.add_argument("--num-crops", type=int, default=None, help="single-image crops on both (default 16)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=None, help="levels (default: 1 16)")
    parser.add_argument("--calls-per-slot", type=int, default=2, help="calls per level: this x the concurrency")
    parser.add_argument("--min-calls", type=int, default=None, help="at least this many calls per level (8)")
    parser.add_argument("--startup-timeout-s", type=float, default=300.0)
    parser.add_argument("--call-timeout-s", type=float, default=None, help="one call's limit (default 120)")
    parser.add_argument("--serve-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_worker is not None:
        serve_worker(json.loads(args.serve_worker))
        return
    dry = args.dry_run
    if args.phi3v_model is None:
        tiny = REFERENCE / "tiny-random"  # as tests/conftest.py finds it; else the package's own tiny checkpoint
        args.phi3v_model = "random-full" if not dry else str(tiny) if (tiny / "model.safetensors").is_file() else "tiny"
    args.device = args.device or ("cpu" if dry else "cuda")
    args.num_crops = args.num_crops or (4 if dry else 16)
    args.concurrency = args.concurrency or ([1, 4] if dry else [1, 16])
    args.min_calls = args.min_calls or (2 if dry else 8)
    args.call_timeout_s = args.call_timeout_s or (60.0 if dry else 120.0)
    if dry:
        args.budget_s = min(args.budget_s, 300.0)

    budget = Budget(args.budget_s)
    card = card_name(dry)
    results: dict[str, Any] = {
        "script": "benchmarks/vllm_check.py",
        "mode": "dry-run (CPU, phi3v-tools half only)" if dry else "gpu",
        "date": time.strftime("%Y-%m-%d"),
        "card": card,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "checkpoint": CHECKPOINTS[args.checkpoint],
        "settings": {
            "budget_s": args.budget_s,
            "num_crops_single_image": args.num_crops,
            "num_crops_multi_image": 4,
            "max_model_len": MAX_MODEL_LEN,
            "limit_images": MAX_IMAGES,
            "concurrency": args.concurrency,
            "calls_per_level": {str(c): max(args.min_calls, args.calls_per_slot * c) for c in args.concurrency},
            "tool_for_throughput": "describe_image, detail brief (at most 160 new tokens), a new image per call",
        },
        "versions": local_versions(),
        "servers": {},
    }
    log(f"card: {card}; budget {args.budget_s:.0f} s")
    with tempfile.TemporaryDirectory(prefix="vllm-check-") as name:
        tmp = Path(name)
        try:
            # vLLM gets half the budget when it runs, phi3v-tools the rest (the servers never run at once)
            vllm_half(args, tmp, budget, budget.started + args.budget_s / 2, results)
            phi3v_half(args, tmp, budget, results)
        finally:
            results["ratios"] = ratios(results["servers"])
            results["skipped"] = budget.skipped
            results["elapsed_s"] = round(time.monotonic() - budget.started, 1)
            default = (
                Path(tempfile.gettempdir()) / "vllm_check_dry.json"
                if dry
                else (HERE / "results" / f"vllm_check_{card.replace(' ', '_').replace('/', '_')}.json")
            )
            out = args.out or default
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2) + "\n")
            log(f"wrote {out}")


if __name__ == "__main__":
    main()
