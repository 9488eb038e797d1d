"""What the remote path costs over the in-process one: the same tool calls, in this process and through
``PHI3V_BACKEND=openai`` against ``phi3v-tools serve`` on the same machine, in one run.

    .venv/bin/python benchmarks/remote_overhead.py [--calls 8] [--out benchmarks/results/remote_overhead.json]

Both sides run the tiny checkpoint with the same settings; greedy decoding gives both the same answers (the
tests check it), so each call generates the same tokens on either path, and the difference is the remote
path's own work: the image sent as a PNG ``data:`` URI (encoded here, decoded and checked there), JSON over
HTTP on loopback, and the server's request handling. The two are measured one after the other, never at
once, because they share the machine's cores.

Per tool: median milliseconds per call on each path, the overhead in ms and as a ratio. Then a large photo,
twice: the same one at every call (as a chained call sends it again: its data: URI is kept, the server still
decodes it) and a new one at every call (encoded as PNG here each time, which grows with the pixels); and 8
concurrent calls (throughput on each path). With the real
model a call takes seconds on a GPU, so what matters is the overhead in milliseconds, not the ratio on a
model that answers in tens of milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
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

from PIL import Image, ImageDraw

from phi3v_tools.demo import book_cover, revenue_chart, scene
from phi3v_tools.images import ImagePolicy
from phi3v_tools.tools import Toolbox

REPO = Path(__file__).resolve().parent.parent

SCHEMA = {"type": "object", "properties": {"count": {"type": "integer"}}, "required": ["count"]}


def photo(width: int = 2400, height: int = 1800) -> Image.Image:
    """A large picture with texture everywhere (PNG cannot squeeze it, as with a real photo)."""
    image = Image.effect_noise((width, height), 64).convert("RGB")
    draw = ImageDraw.Draw(image)
    for i in range(0, width, 150):
        draw.rectangle((i, i // 2 % height, i + 120, i // 2 % height + 300), fill=(i % 255, 90, 200))
    return image


def start_server(model: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHI3V_")}
    env.update(PHI3V_MODEL=model, PHI3V_SERVED_MODEL_NAME="tiny")
    command = [sys.executable, "-m", "phi3v_tools.cli", "serve", "--port", str(port)]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"phi3v-tools serve exited: {log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                if answer.status == 200:
                    return process
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("phi3v-tools serve did not get healthy")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def median_ms(call: Callable[[], Any], calls: int) -> tuple[float, Any]:
    result = call()  # warm-up (and the result, for the token counts)
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return round(statistics.median(samples) * 1e3, 2), result


def concurrent_rate(toolbox: Toolbox, image: str, width: int, rounds: int) -> float:
    """Calls per second with ``width`` describe calls in flight at once, over ``rounds`` rounds."""

    async def burst() -> None:
        await asyncio.gather(*(toolbox.adescribe_image(image, f"Call {i}.", "brief") for i in range(width)))

    asyncio.run(burst())  # warm-up
    started = time.perf_counter()
    for _ in range(rounds):
        asyncio.run(burst())
    return round(width * rounds / (time.perf_counter() - started), 2)


def workloads(folder: Path, fresh: list[str]) -> dict[str, Callable[[Toolbox], Any]]:
    """The calls, by name. ``fresh``: distinct photos, one per call of the last workload (each side takes its own),
    so that neither the remote backend's data-URI cache nor the server's feature cache sees one twice."""
    chart, cover, a, b, big = (str(folder / f"{n}.png") for n in ("chart", "cover", "a", "b", "photo"))
    unseen = iter(fresh)
    return {
        "describe_image": lambda t: t.describe_image(chart, "What does it show?", "brief"),
        "read_text (2 fields)": lambda t: t.read_text(cover, ["title", "author"]),
        "compare_images (2)": lambda t: t.compare_images([a, b]),
        "ask_images (schema)": lambda t: t.ask_images(chart, "How many bars?", SCHEMA),
        "describe_image, 2400x1800 photo": lambda t: t.describe_image(big, None, "brief"),
        "describe_image, a new 2400x1800 photo each call": lambda t: t.describe_image(next(unseen), None, "brief"),
    }


def measure(calls: int) -> dict[str, Any]:
    from phi3v_tools.backends.openai import OpenAIBackend
    from phi3v_tools.model import make_tiny_checkpoint
    from phi3v_tools.runner import close_runners, get_runner
    from phi3v_tools.settings import Settings

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        revenue_chart().save(folder / "chart.png")
        book_cover().save(folder / "cover.png")
        scene(False).save(folder / "a.png")
        scene(True).save(folder / "b.png")
        photo().save(folder / "photo.png")
        fresh = []
        for i in range(2 * (calls + 1)):  # effect_noise differs at every call: no two alike
            photo().save(folder / f"photo-{i}.png")
            fresh.append(str(folder / f"photo-{i}.png"))
        model = str(make_tiny_checkpoint(folder / "tiny"))
        policy = ImagePolicy(allowed_dirs=(folder,))
        port = free_port()
        server = start_server(model, port, folder / "serve.log")
        try:
            local = Toolbox(get_runner(Settings(model=model)), policy)
            remote = Toolbox(OpenAIBackend(f"http://127.0.0.1:{port}/v1"), policy)
            rows = []
            for name, call in workloads(folder, fresh).items():
                local_ms, local_result = median_ms(lambda call=call: call(local), calls)
                remote_ms, remote_result = median_ms(lambda call=call: call(remote), calls)
                same = local_result.model_dump(exclude={"call"}) == remote_result.model_dump(exclude={"call"})
                if "new" in name:
                    same = None  # each side saw other photos
                rows.append(
                    {
                        "tool": name,
                        "completion_tokens": local_result.call.completion_tokens,
                        "same_answer": same,
                        "local_ms": local_ms,
                        "remote_ms": remote_ms,
                        "overhead_ms": round(remote_ms - local_ms, 2),
                        "ratio": round(remote_ms / local_ms, 3),
                    }
                )
                print(json.dumps(rows[-1]))
            chart = str(folder / "chart.png")
            rates = {
                "local_calls_per_s": concurrent_rate(local, chart, 8, 3),
                "remote_calls_per_s": concurrent_rate(remote, chart, 8, 3),
            }
            rates["ratio"] = round(rates["remote_calls_per_s"] / rates["local_calls_per_s"], 3)
            print(json.dumps({"8 concurrent describe_image": rates}))
        finally:
            server.terminate()
            server.wait(timeout=30)
            close_runners()
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} (no GPU)",
        "model": "the tiny random checkpoint, on both paths",
        "calls_per_median": calls,
        "date": time.strftime("%Y-%m-%d"),
        "per_call": rows,
        "concurrency_8": rates,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=8)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "remote_overhead.json")
    args = parser.parse_args()
    figures = measure(args.calls)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
