"""Load on the MCP streamable-HTTP server: many clients at once, and a burst beyond the queue.

    .venv/bin/python benchmarks/load_http.py [--clients 32] [--per-client 4] [--burst 96] [--queue 32]
                                             [--out benchmarks/results/load_http.json]

The server is the real one (``python -m phi3v_mcp --transport http``) in a subprocess on a free loopback
port, over the tiny checkpoint with answers capped at ``--max-new-tokens`` tokens. Two phases:

1. **load**: ``--clients`` MCP sessions at once, each sending ``--per-client`` describe_image calls one
   after another, every call with an image of its own (a data: URI of distinct noise). Each answer must
   carry the handle of *that* image (sha256 of its pixels, computed here): a mixed-up answer is counted.
2. **burst**: ``--burst`` sessions opened first, then one call each released at the same instant, against
   a queue of ``--queue``. Calls beyond what the runner can hold must get the "busy" error at once (no
   timeouts); every call gets exactly one answer, success or error.

Reported: requests/s, latency p50/p90/p99/max, outcome counts, and for the burst the latency of the busy
answers. The reliability tests (tests/reliability/test_load.py) run the same functions at a smaller size.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 120.0  # per call, client side: a call that takes longer is a failure of the server


# ---------------------------------------------------------------------------------------------------------------------
# The server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def mcp_http_server(model: str, log: Path, **env: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``python -m phi3v_mcp --transport http`` on a free loopback port; yields (process, /mcp URL)."""
    port = free_port()
    variables = {
        **os.environ,
        "PHI3V_MODEL": model,
        "PHI3V_MCP_PORT": str(port),
        "PHI3V_ALLOW_URLS": "0",
        "PHI3V_ALLOWED_DIRS": str(log.parent),
        "HF_HUB_OFFLINE": "1",
        **env,
    }
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "phi3v_mcp", "--transport", "http"], env=variables, stdout=out, stderr=out
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not listen within 120 s:\n{log.read_text()[-3000:]}") from None
                time.sleep(0.1)
        yield process, f"http://127.0.0.1:{port}/mcp"
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# ---------------------------------------------------------------------------------------------------------------------
# Clients


def distinct_image(index: int) -> tuple[str, str]:
    """(data: URI, expected handle) of a 64x48 noise picture unique to ``index``."""
    from phi3v_tools.feature_cache import image_digest
    from phi3v_tools.images import HANDLE_PREFIX

    pixels = np.random.default_rng(index).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return uri, HANDLE_PREFIX + image_digest(image)


@dataclass
class Call:
    client: int
    index: int
    seconds: float
    outcome: str  # "ok", "busy", "wrong-handle", "error: <message>", "timeout", "exception: <type>"


async def _one_call(session: Any, client: int, index: int, image: tuple[str, str]) -> Call:
    uri, handle = image
    started = time.perf_counter()
    try:
        with anyio.fail_after(TIMEOUT_S):
            result = await session.call_tool("describe_image", {"image": uri, "detail": "brief"})
    except TimeoutError:
        return Call(client, index, time.perf_counter() - started, "timeout")
    except Exception as exc:  # a transport failure: counted, never hidden
        return Call(client, index, time.perf_counter() - started, f"exception: {type(exc).__name__}: {exc}")
    seconds = time.perf_counter() - started
    if result.is_error:
        text = " ".join(getattr(block, "text", "") for block in result.content)
        return Call(client, index, seconds, "busy" if "busy" in text else f"error: {text[:200]}")
    got = [info["handle"] for info in (result.structured_content or {}).get("images", [])]
    return Call(client, index, seconds, "ok" if got == [handle] else "wrong-handle")


def _first_leaf(exc: BaseException) -> str:
    """The first real exception inside (nested) exception groups, as 'Type: message'."""
    while getattr(exc, "exceptions", None):  # BaseExceptionGroup (a builtin from Python 3.11)
        exc = exc.exceptions[0]  # type: ignore[attr-defined]
    return f"{type(exc).__name__}: {exc}"[:200]


def _session(url: str) -> Any:
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    http = httpx2.AsyncClient(timeout=httpx2.Timeout(30, read=TIMEOUT_S))
    return http, Client(streamable_http_client(url, http_client=http), read_timeout_seconds=TIMEOUT_S)


@dataclass
class Report:
    calls: int
    seconds: float
    requests_per_s: float
    outcomes: dict[str, int]
    latency_ms: dict[str, float]
    busy_latency_ms: dict[str, float] = field(default_factory=dict)
    answered_once: bool = True  # every call got exactly one answer


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(v * 1000 for v in values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

    return {"p50": round(statistics.median(ordered), 1), "p90": at(0.9), "p99": at(0.99), "max": round(ordered[-1], 1)}


def _report(calls: list[Call], expected: int, seconds: float) -> Report:
    outcomes: dict[str, int] = {}
    for call in calls:
        key = call.outcome if call.outcome in ("ok", "busy", "wrong-handle", "timeout") else call.outcome[:120]
        outcomes[key] = outcomes.get(key, 0) + 1
    keys = [(c.client, c.index) for c in calls]
    return Report(
        calls=len(calls),
        seconds=round(seconds, 3),
        requests_per_s=round(sum(c.outcome == "ok" for c in calls) / seconds, 2) if seconds else 0.0,
        outcomes=outcomes,
        latency_ms=_percentiles([c.seconds for c in calls if c.outcome == "ok"]),
        busy_latency_ms=_percentiles([c.seconds for c in calls if c.outcome == "busy"]),
        answered_once=len(calls) == expected and len(set(keys)) == expected,
    )


async def load(url: str, clients: int, per_client: int, calls: list[Call] | None = None) -> Report:
    """``clients`` sessions at once, each making ``per_client`` calls in turn with images of its own.

    ``calls``, when given, receives each finished call as it ends (to watch progress from outside).
    """
    calls = [] if calls is None else calls

    async def client(number: int) -> None:
        mine: list[Call] = []
        started = time.perf_counter()
        http, session = _session(url)
        try:
            async with http, session:
                for i in range(per_client):
                    mine.append(await _one_call(session, number, i, distinct_image(number * 1000 + i)))
                    calls.append(mine[-1])
        except Exception as exc:  # the session itself failed (e.g. the server went away): the rest is unanswered
            reason = f"session failed: {_first_leaf(exc)}"
            rest = [Call(number, i, time.perf_counter() - started, reason) for i in range(len(mine), per_client)]
            calls.extend(rest)

    started = time.perf_counter()
    async with anyio.create_task_group() as group:
        for number in range(clients):
            group.start_soon(client, number)
    return _report(calls, clients * per_client, time.perf_counter() - started)


async def burst(url: str, size: int, seed: int = 10**6) -> Report:
    """``size`` sessions opened first, then one call each, all released at the same instant."""
    calls: list[Call] = []
    ready = 0
    go = anyio.Event()

    async def client(number: int) -> None:
        nonlocal ready
        image = distinct_image(seed + number)
        http, session = _session(url)
        started = time.perf_counter()
        try:
            async with http, session:
                ready += 1
                if ready == size:
                    go.set()
                await go.wait()
                call = await _one_call(session, number, 0, image)
        except Exception as exc:
            call = Call(number, 0, time.perf_counter() - started, f"session failed: {_first_leaf(exc)}")
        calls.append(call)

    started = time.perf_counter()
    async with anyio.create_task_group() as group:
        for number in range(size):
            group.start_soon(client, number)
    return _report(calls, size, time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--per-client", type=int, default=4)
    parser.add_argument("--burst", type=int, default=96)
    parser.add_argument("--queue", type=int, default=32, help="the server's PHI3V_MAX_QUEUE (room for --clients)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--model", default=None, help="checkpoint directory (default: a tiny one, built here)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "load_http.json")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from phi3v_tools.model import make_tiny_checkpoint

            model = str(make_tiny_checkpoint(Path(tmp) / "tiny"))
        env = {"PHI3V_MAX_QUEUE": str(args.queue), "PHI3V_MAX_NEW_TOKENS": str(args.max_new_tokens)}
        with mcp_http_server(model, Path(tmp) / "server.log", **env) as (_process, url):
            anyio.run(load, url, 1, 1)  # warm-up: the first constrained call builds the grammar tables
            print(f"server at {url}; load: {args.clients} clients x {args.per_client} calls", flush=True)
            steady = anyio.run(load, url, args.clients, args.per_client)
            print(json.dumps(asdict(steady)), flush=True)
            print(f"burst: {args.burst} calls at once against a queue of {args.queue}", flush=True)
            peak = anyio.run(burst, url, args.burst)
            print(json.dumps(asdict(peak)), flush=True)

    import torch

    results = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "settings": {
            "clients": args.clients,
            "per_client": args.per_client,
            "burst": args.burst,
            "max_queue": args.queue,
            "max_new_tokens": args.max_new_tokens,
            "model": "tiny checkpoint" if args.model is None else args.model,
        },
        "load": asdict(steady),
        "burst": asdict(peak),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    bad = steady.outcomes.get("ok", 0) != steady.calls or not (steady.answered_once and peak.answered_once)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
