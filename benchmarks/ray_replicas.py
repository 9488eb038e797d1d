"""Replicas on Ray Serve: throughput with 1 vs 2 replicas, routing repeats of an image by digest, and a replica
killed under load, in one run (``phi3v-tools serve --replicas N`` on the tiny model, the ``ray`` extra).

    .venv/bin/python benchmarks/ray_replicas.py [--model tiny] [--calls 64] [--concurrency 16]
        [--out benchmarks/results/ray_replicas.json]

1. **Throughput**: the same ``--calls`` describe_image calls (distinct pictures, so the same tokens in every
   scenario) at ``--concurrency``, through the remote backend, against 1 and then 2 replicas: calls/s, p50/p95.
   On a machine with fewer cores than replicas x threads the replicas only share the cores; on a box with one
   GPU per replica, throughput grows with the replicas (run it there with ``--model`` a real checkpoint).
2. **Routing by image**: 8 pictures, each asked about 6 times in a shuffled order, against 2 replicas with the
   default router (power of two choices) and with ``PHI3V_ROUTE_BY_IMAGE`` (the consistent-hash router over the
   digest the remote backend sends in ``x-session-id``): how many images came from a replica's feature cache.
3. **A replica killed**: 64 concurrent calls whose only valid answer names their picture, against 2 replicas;
   one replica's process is killed (SIGKILL) after the first answers: calls answered, lost, mixed up, the
   client's retries, and the seconds until Serve has two replicas again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from phi3v_tools.backends.openai import OpenAIBackend
from phi3v_tools.digests import image_digest
from phi3v_tools.engine.types import GenerationRequest
from phi3v_tools.images import ImagePolicy
from phi3v_tools.tools import Toolbox

REPO = Path(__file__).resolve().parent.parent
REPLICA_TITLE = b"ray::ServeReplica:phi3v:Phi3VServer"


def pictures(count: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)) for _ in range(count)]


def data_uri(image: Image.Image) -> str:
    from phi3v_tools.backends.openai import png_data_uri

    return png_data_uri(image)


class Server:
    def __init__(self, model: str, replicas: int, log: Path, **env: str) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("PHI3V_", "RAY_"))}
        environ.update(PHI3V_BATCH_WINDOW_MS="20", PHI3V_HEALTH_CHECK_PERIOD_S="1", RAY_DEDUP_LOGS="0", **env)
        command = [sys.executable, "-m", "phi3v_tools.cli", "serve", "--model", model, "--port", str(self.port)]
        self.log = log
        with open(log, "w") as out:
            self.process = subprocess.Popen(command + ["--replicas", str(replicas)], env=environ, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        started = time.monotonic()
        while not ("replica" in log.read_text() and "serving" in log.read_text() and self.health()):
            if self.process.poll() is not None or time.monotonic() - started > 600:
                raise RuntimeError(f"the server did not start: {log.read_text()[-3000:]}")
            time.sleep(0.5)
        self.startup_s = time.monotonic() - started

    def health(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as answer:
                return answer.status == 200
        except OSError:
            return False

    def replica_pids(self) -> list[int]:
        table = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    title = Path(f"/proc/{entry}/cmdline").read_bytes()
                    ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                except OSError:
                    continue
                table[int(entry)] = (ppid, title)
        found = []
        for pid, (ppid, title) in table.items():
            walk = ppid
            while walk not in (0, 1) and walk != self.process.pid:
                walk = table.get(walk, (0, b""))[0]
            if title.startswith(REPLICA_TITLE) and walk == self.process.pid:
                found.append(pid)
        return sorted(found)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def toolbox(server: Server) -> Toolbox:
    return Toolbox(OpenAIBackend(server.url + "/v1"), ImagePolicy(allowed_dirs=()))


async def throughput(server: Server, images: list[Image.Image], concurrency: int) -> dict[str, Any]:
    tools = toolbox(server)
    slots = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(image: Image.Image) -> None:
        async with slots:
            started = time.perf_counter()
            await tools.adescribe_image(data_uri(image))
            latencies.append(time.perf_counter() - started)

    await one(images[0])  # warm: connections, each side's first call
    latencies.clear()
    started = time.perf_counter()
    await asyncio.gather(*(one(image) for image in images))
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "calls": len(images),
        "concurrency": concurrency,
        "calls_per_s": round(len(images) / wall, 3),
        "p50_s": round(statistics.median(ordered), 3),
        "p95_s": round(ordered[int(0.95 * (len(ordered) - 1))], 3),
        "wall_s": round(wall, 2),
    }


async def routing(server: Server, seed: int) -> dict[str, Any]:
    backend = OpenAIBackend(server.url + "/v1")
    images = pictures(8, seed)
    order = [i for i in range(8) for _ in range(6)]
    random.Random(seed).shuffle(order)
    hits = 0
    slots = asyncio.Semaphore(4)

    async def one(i: int) -> int:
        async with slots:
            request = GenerationRequest.from_text(
                "What is this?", [images[i]], max_new_tokens=4, image_digests=[image_digest(images[i])]
            )
            return (await backend.generate(request)).cached_images

    for i in range(8):  # each picture once, before the repeats (a first sight is a miss wherever it goes)
        await one(i)
    repeats = order[8:]
    hits = sum(await asyncio.gather(*(one(i) for i in repeats)))
    return {"repeats": len(repeats), "cache_hits": hits, "hit_rate": round(hits / len(repeats), 3)}


async def kill_one(server: Server, seed: int) -> dict[str, Any]:
    seen: list[int | str] = []
    send = httpx.AsyncClient.send

    async def recording(client: httpx.AsyncClient, request: httpx.Request, **options: Any) -> httpx.Response:
        try:
            response = await send(client, request, **options)
        except Exception as exc:
            seen.append(type(exc).__name__)
            raise
        seen.append(response.status_code)
        return response

    httpx.AsyncClient.send = recording  # type: ignore[method-assign]
    try:
        tools = toolbox(server)
        images = pictures(64, seed)
        before = server.replica_pids()

        async def one(image: Image.Image) -> bool:
            tag = "img-" + image_digest(image)[:12]
            schema = {"type": "object", "properties": {"image": {"const": tag}}, "required": ["image"]}
            answer = await tools.aask_images(data_uri(image), "Which picture is this?", schema)
            return bool(answer.answer == {"image": tag})

        started = time.perf_counter()
        calls = asyncio.ensure_future(asyncio.gather(*(one(image) for image in images), return_exceptions=True))
        while seen.count(200) < 4:
            await asyncio.sleep(0.05)
        os.kill(before[0], signal.SIGKILL)
        killed_at = time.perf_counter()
        results = await calls
        wall = time.perf_counter() - started
        while not (len(now := server.replica_pids()) >= 2 and before[0] not in now):
            await asyncio.sleep(0.25)
        back = time.perf_counter() - killed_at
    finally:
        httpx.AsyncClient.send = send  # type: ignore[method-assign]
    return {
        "calls": len(images),
        "answered_correctly": sum(1 for r in results if r is True),
        "lost": sum(1 for r in results if isinstance(r, BaseException)),
        "mixed_up": sum(1 for r in results if r is False),
        "retried_exchanges": len([s for s in seen if s != 200]),
        "failed_statuses": sorted({str(s) for s in seen if s != 200}),
        "wall_s": round(wall, 2),
        "replaced_after_s": round(back, 1),
    }


def machine() -> str:
    name = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core {platform.machine()} CPU ({name})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--calls", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ray_replicas.json")
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    images = pictures(args.calls, seed=7)
    result: dict[str, Any] = {
        "benchmark": "ray_replicas",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "model": args.model,
    }
    throughputs: dict[str, Any] = {}
    for replicas in (1, 2):
        server = Server(args.model, replicas, logs / f"r{replicas}.log")
        try:
            throughputs[str(replicas)] = {"startup_s": round(server.startup_s, 1)}
            throughputs[str(replicas)].update(asyncio.run(throughput(server, images, args.concurrency)))
            print(replicas, "replica(s):", throughputs[str(replicas)], flush=True)
            if replicas == 2:
                result["routing"] = {"default_router": asyncio.run(routing(server, seed=11))}
                result["replica_killed"] = asyncio.run(kill_one(server, seed=13))
                print("killed:", result["replica_killed"], flush=True)
        finally:
            server.stop()
    result["throughput"] = throughputs
    result["throughput"]["ratio_2_over_1"] = round(throughputs["2"]["calls_per_s"] / throughputs["1"]["calls_per_s"], 2)
    server = Server(args.model, 2, logs / "routed.log", PHI3V_ROUTE_BY_IMAGE="1")
    try:
        result["routing"]["by_image_digest"] = asyncio.run(routing(server, seed=11))
    finally:
        server.stop()
    print("routing:", result["routing"], flush=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
