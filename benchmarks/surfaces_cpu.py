"""What each surface adds over a direct Toolbox call: Python API, LangChain tool, MCP in memory, stdio, HTTP.

    .venv/bin/python benchmarks/surfaces_cpu.py [--calls 50] [--out benchmarks/results/surfaces_cpu.json]

Every surface calls the same describe_image on the same small PNG over an instant fake backend, so the
figures are the adapters' own cost (argument validation, image loading is common to all, JSON-RPC,
transport, serialisation), not the model's. Median milliseconds per call, and the overhead over the direct
call. The stdio and HTTP servers are real: a subprocess speaking JSON-RPC over pipes, and uvicorn on
127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests.fakes: the instant fake backend

from phi3v_tools.demo import revenue_chart  # noqa: E402
from phi3v_tools.images import ImagePolicy  # noqa: E402
from phi3v_tools.settings import Settings  # noqa: E402
from phi3v_tools.tools import Toolbox  # noqa: E402
from tests.fakes import FakeBackend  # noqa: E402


def fake_toolbox(folder: Path) -> Toolbox:
    return Toolbox(FakeBackend(), ImagePolicy(allowed_dirs=(folder,)))


def serve_fake_stdio(folder: Path) -> None:
    """The MCP server over stdio with the fake backend (run in a subprocess by the benchmark)."""
    from phi3v_mcp.server import configure_logging, create_server

    configure_logging()  # as `phi3v-tools mcp` does
    create_server(Settings(model="fake", allowed_dirs=(folder,)), fake_toolbox(folder)).run("stdio")


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e3, 3)


def time_sync(call: Callable[[], Any], calls: int) -> float:
    call()  # warm-up
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return median_ms(samples)


async def time_async(call: Callable[[], Awaitable[Any]], calls: int) -> float:
    await call()
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return median_ms(samples)


async def mcp_figures(folder: Path, image: str, calls: int) -> dict[str, float]:
    import uvicorn
    from mcp import Client, StdioServerParameters
    from phi3v_mcp.server import configure_logging, create_server, http_app, listening_socket

    configure_logging()  # as `phi3v-tools mcp` does; the in-process client's request logs are then not formatted
    args = {"image": image, "detail": "brief"}
    settings = Settings(model="fake", allowed_dirs=(folder,))
    out: dict[str, float] = {}
    async with Client(create_server(settings, fake_toolbox(folder))) as client:
        out["mcp_in_memory"] = await time_async(lambda: client.call_tool("describe_image", args), calls)

    params = StdioServerParameters(
        command=sys.executable,
        args=[str(Path(__file__).resolve()), "--serve-fake-stdio", str(folder)],
        env={"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "servers")]), "OMP_NUM_THREADS": "1"},
    )
    async with Client(params, read_timeout_seconds=60) as client:
        out["mcp_stdio"] = await time_async(lambda: client.call_tool("describe_image", args), calls)

    sock = listening_socket("127.0.0.1", 0)  # as `phi3v-tools mcp --transport http` binds it
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(http_app(create_server(settings, fake_toolbox(folder)), settings), log_level="warning")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        from mcp.client.streamable_http import streamable_http_client

        url = f"http://127.0.0.1:{port}/mcp"
        async with Client(streamable_http_client(url)) as client:
            out["mcp_http"] = await time_async(lambda: client.call_tool("describe_image", args), calls)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
    return out


def measure(calls: int) -> dict[str, Any]:
    import phi3v_tools.api as api
    from phi3v_tools.langchain import DescribeImageTool

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        image = str(folder / "chart.png")
        revenue_chart().save(image)
        toolbox = fake_toolbox(folder)
        ms: dict[str, float] = {
            "direct_toolbox": time_sync(lambda: toolbox.describe_image(image, detail="brief"), calls)
        }
        api._DEFAULT = toolbox  # the module-level functions use this toolbox
        ms["python_api"] = time_sync(lambda: api.describe_image(image, detail="brief"), calls)
        tool = DescribeImageTool(toolbox=toolbox)
        ms["langchain_tool"] = time_sync(lambda: tool.invoke({"image": image, "detail": "brief"}), calls)
        ms.update(asyncio.run(mcp_figures(folder, image, calls)))
    base = ms["direct_toolbox"]
    return {
        "calls": calls,
        "median_ms": ms,
        "overhead_ms": {name: round(value - base, 3) for name, value in ms.items() if name != "direct_toolbox"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/surfaces_cpu.json"))
    parser.add_argument("--serve-fake-stdio", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_fake_stdio:
        serve_fake_stdio(args.serve_fake_stdio)
        return
    results = measure(args.calls)
    print(json.dumps(results, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
