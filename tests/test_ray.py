"""``phi3v-tools serve --replicas`` on a local Ray, started by the test (the ``ray`` extra; CI installs it).

One Ray cluster for the module: ``phi3v-tools serve --replicas 2 --min-replicas 2 --max-replicas 3`` on the tiny
model, in a subprocess, health checks every second and fast autoscaling. The claims:

- two replicas both answer 32 concurrent calls of the remote backend's tools (the replica is in a header), and
  MCP is served from the replicas too (stateless);
- killing a replica's process in the middle of 64 concurrent calls loses nothing: each call gets exactly one
  answer, and it is its own (a schema whose only valid answer names the call's image); Serve then brings the
  replica back under a new id;
- a burst scales the deployment up to its maximum and idleness back down to its minimum, never outside them;
- SIGTERM drains: calls in flight finish, and the server exits 143.

On the 2-core CI machine the module takes about 2 minutes and Ray's processes about 2.5 GB (measured and
printed by the module's last test).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve: pip install -e '.[ray]'")
pytest.importorskip("openai", reason="the remote backend's client: pip install -e '.[remote]'")

import httpx  # noqa: E402
from PIL import Image  # noqa: E402

from phi3v_tools.backends.openai import OpenAIBackend  # noqa: E402
from phi3v_tools.digests import image_digest  # noqa: E402
from phi3v_tools.images import ImagePolicy  # noqa: E402
from phi3v_tools.serving.ray import REPLICA_HEADER  # noqa: E402
from phi3v_tools.tools import Toolbox  # noqa: E402

REPLICA_TITLE = "ray::ServeReplica:phi3v:Phi3VServer"
MIN, MAX = 2, 3


class RayServer:
    """``phi3v-tools serve --replicas`` in a subprocess, and what the test sees of its Ray processes."""

    def __init__(self, tiny_dir: Path, log: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PHI3V_", "RAY_"))}
        env.update(
            PHI3V_BATCH_WINDOW_MS="20",
            PHI3V_SERVED_MODEL_NAME="tiny",
            PHI3V_HEALTH_CHECK_PERIOD_S="1",
            PHI3V_TARGET_ONGOING_REQUESTS="8",
            PHI3V_UPSCALE_DELAY_S="1",
            PHI3V_DOWNSCALE_DELAY_S="4",
            PHI3V_MCP_SHUTDOWN_GRACE_S="60",
            # Serve's autoscaling metrics every half second, not every ten (read when Ray starts).
            RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S="0.5",
            RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S="0.5",
            RAY_DEDUP_LOGS="0",
        )
        command = [sys.executable, "-m", "phi3v_tools.cli", "serve", "--model", str(tiny_dir), "--port"]
        command += [str(self.port), "--replicas", str(MIN), "--min-replicas", str(MIN), "--max-replicas", str(MAX)]
        self.log = log
        with open(log, "w") as out:
            # Its own session: Ray's reaper and shutdown signal whole process groups, which must not be the test's.
            self.process = subprocess.Popen(
                command, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        self.counts: list[int] = []  # replica processes, each time they were counted

    def wait_healthy(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not (self.serving() and len(self.replicas()) >= MIN):
            assert self.process.poll() is None, f"serve --replicas exited: {self.log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"serve --replicas did not get healthy: {self.log.read_text()[-4000:]}"
            time.sleep(0.5)

    def serving(self) -> bool:
        return "on 2 to 3 replicas (autoscaling)" in self.log.read_text() and self.health() == 200

    def health(self) -> int:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as answer:
                return int(answer.status)
        except OSError:
            return 0

    def replicas(self) -> dict[int, int]:
        """The live replica processes under this server: pid -> resident MiB."""
        table = _processes()
        under = self._under(table)
        found = {pid: rss for pid, _pp, title, rss in table if title.startswith(REPLICA_TITLE) and pid in under}
        self.counts.append(len(found))
        return found

    def _under(self, table: list[tuple[int, int, str, int]]) -> set[int]:
        """The pids in ``table`` that descend from the server's process."""
        parents = {pid: ppid for pid, ppid, _t, _r in table}
        under = set()
        for pid in parents:
            walk = parents[pid]
            while walk not in (0, 1) and walk != self.process.pid:
                walk = parents.get(walk, 0)
            if walk == self.process.pid:
                under.add(pid)
        return under

    def ray_memory_mib(self) -> int:
        """Resident memory of the server and every process under it."""
        table = _processes()
        under = self._under(table) | {self.process.pid}
        return sum(rss for pid, _pp, _t, rss in table if pid in under)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


def _processes() -> list[tuple[int, int, str, int]]:
    """(pid, ppid, command line, resident MiB) of this machine's processes."""
    rows = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            title = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            stat = Path(f"/proc/{entry}/stat").read_text()
            statm = Path(f"/proc/{entry}/statm").read_text().split()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        rows.append((int(entry), ppid, title, int(statm[1]) * os.sysconf("SC_PAGE_SIZE") // 2**20))
    return rows


@pytest.fixture(scope="module")
def ray_server(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayServer]:
    if not Path("/proc/self/stat").exists():
        pytest.skip("the test finds Ray's replica processes in /proc (Linux)")
    server = RayServer(tiny_dir, tmp_path_factory.mktemp("ray") / "serve.log")
    started = time.monotonic()
    try:
        server.wait_healthy()
        server.startup_s = time.monotonic() - started  # type: ignore[attr-defined]
        yield server
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):  # whatever Ray left in the server's session
            os.killpg(server.process.pid, signal.SIGKILL)


class Responses:
    """Every HTTP exchange the OpenAI client makes in this test: (status or the exception's name, replica)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.seen: list[tuple[int | str, str | None]] = []
        send = httpx.AsyncClient.send

        async def recording(client: httpx.AsyncClient, request: httpx.Request, **options: Any) -> httpx.Response:
            try:
                response = await send(client, request, **options)
            except Exception as exc:
                self.seen.append((type(exc).__name__, None))
                raise
            if request.url.path.endswith("/chat/completions"):
                self.seen.append((response.status_code, response.headers.get(REPLICA_HEADER)))
            return response

        monkeypatch.setattr(httpx.AsyncClient, "send", recording)

    def replicas(self) -> set[str]:
        return {replica for status, replica in self.seen if status == 200 and replica}

    def failures(self) -> list[int | str]:
        return [status for status, _replica in self.seen if status != 200]


def remote_toolbox(server: RayServer) -> Toolbox:
    return Toolbox(OpenAIBackend(server.url + "/v1"), ImagePolicy(allowed_dirs=()))


def pictures(count: int, seed: int = 0) -> list[Image.Image]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)) for _ in range(count)]


def png_uri(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def own_schema(tag: str) -> dict[str, Any]:
    """A schema whose only valid answer is ``{"image": tag}``: an answer with another call's tag is a mix-up."""
    return {"type": "object", "properties": {"image": {"const": tag}}, "required": ["image"]}


async def ask_each(toolbox: Toolbox, images: list[Image.Image]) -> list[Any]:
    """ask_images on each image at once, each with its own schema; returns (tag, answer) pairs or exceptions."""

    async def one(image: Image.Image) -> tuple[str, Any]:
        tag = "img-" + image_digest(image)[:12]
        answer = await toolbox.aask_images(png_uri(image), "Which picture is this?", own_schema(tag))
        return tag, answer.answer

    return await asyncio.gather(*(one(image) for image in images), return_exceptions=True)


def test_two_replicas_both_answer_32_concurrent_calls_of_the_remote_tools(
    ray_server: RayServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    responses = Responses(monkeypatch)
    toolbox = remote_toolbox(ray_server)
    images = pictures(32)
    results = asyncio.run(ask_each(toolbox, images))
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert all(answer == {"image": tag} for tag, answer in results)
    assert len(responses.replicas()) >= 2, responses.seen
    # The other tools, unchanged, through the remote backend against the replicas.
    picture = png_uri(images[0])
    described = toolbox.describe_image(picture)
    assert described.images[0].handle == "image://sha256/" + image_digest(images[0])
    assert set(toolbox.read_text(described.images[0].handle, fields=["title"]).fields or {}) == {"title"}
    assert isinstance(toolbox.compare_images([picture, png_uri(images[1])]).differences, list)


def test_mcp_is_served_from_the_replicas_without_sessions(ray_server: RayServer) -> None:
    from tests.mcp_http import http_client

    async def call() -> list[str]:
        texts = []
        for _ in range(4):  # each call may reach either replica: no session may be needed between them
            async with http_client(ray_server.url + "/mcp", None) as client:
                result = await client.call_tool("describe_image", {"image": png_uri(pictures(1, seed=5)[0])})
                assert not result.is_error, result
                texts.append(result.content[0].text)  # type: ignore[union-attr]
        return texts

    texts = asyncio.run(call())
    assert len(set(texts)) == 1 and texts[0]  # the same picture, the same answer, whichever replica gave it


def test_killing_a_replica_under_64_concurrent_calls_loses_none_and_mixes_none_up(
    ray_server: RayServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    responses = Responses(monkeypatch)
    toolbox = remote_toolbox(ray_server)
    images = pictures(64, seed=1)
    before = ray_server.replicas()
    victim = min(before)

    async def run() -> list[Any]:
        calls = asyncio.ensure_future(ask_each(toolbox, images))
        deadline = time.monotonic() + 60
        while sum(1 for s, _r in responses.seen if s == 200) < 4:  # under way on the replicas
            assert time.monotonic() < deadline and not calls.done()
            await asyncio.sleep(0.05)
        os.kill(victim, signal.SIGKILL)
        return await calls

    results = asyncio.run(run())
    lost = [r for r in results if isinstance(r, BaseException)]
    mixed = [(tag, answer) for tag, answer in (r for r in results if not isinstance(r, BaseException))
             if answer != {"image": tag}]  # fmt: skip
    assert (len(results), lost, mixed) == (64, [], [])
    assert responses.failures(), "the killed replica had calls in flight, which the client retried"
    # Serve replaces the replica: a new process, and the deployment back at two or more. Under this load the
    # autoscaler may have added a replica before the kill: then the deployment can be back at its minimum without
    # a new one (CI saw {a, b, c} become {b, c}).
    deadline = time.monotonic() + 180
    while not (
        victim not in (now := ray_server.replicas())
        and len(now) >= MIN
        and (set(now) - set(before) or len(before) > MIN)
    ):
        assert time.monotonic() < deadline, f"the replica was not replaced: {now} (was {before})"
        time.sleep(0.5)
    after = asyncio.run(ask_each(toolbox, pictures(8, seed=2)))
    assert all(not isinstance(r, BaseException) and r[1] == {"image": r[0]} for r in after)


def test_a_burst_scales_up_to_the_maximum_and_idleness_back_down_to_the_minimum(ray_server: RayServer) -> None:
    deadline = time.monotonic() + 120
    while len(ray_server.replicas()) != MIN:  # idle after the previous tests
        assert time.monotonic() < deadline, "the deployment did not settle at its minimum"
        time.sleep(0.5)
    toolbox = remote_toolbox(ray_server)
    peak = 0

    async def burst() -> None:
        nonlocal peak
        stop = asyncio.Event()

        async def caller(i: int) -> None:
            while not stop.is_set():
                await toolbox.adescribe_image(png_uri(pictures(1, seed=100 + i)[0]))

        callers = [asyncio.ensure_future(caller(i)) for i in range(48)]
        try:
            until = time.monotonic() + 180
            while peak < MAX:
                assert time.monotonic() < until, f"no scale-up under 48 callers: {ray_server.counts[-20:]}"
                await asyncio.sleep(0.5)
                peak = max(peak, len(await asyncio.to_thread(ray_server.replicas)))
        finally:
            stop.set()
            await asyncio.gather(*callers)

    asyncio.run(burst())
    assert peak == MAX
    deadline = time.monotonic() + 120
    while len(ray_server.replicas()) != MIN:
        assert time.monotonic() < deadline, f"no scale-down when idle: {ray_server.counts[-20:]}"
        time.sleep(0.5)
    assert max(ray_server.counts) <= MAX


def test_sigterm_drains_calls_in_flight_and_exits_143(ray_server: RayServer) -> None:
    toolbox = remote_toolbox(ray_server)
    memory = ray_server.ray_memory_mib()

    async def run() -> list[Any]:
        calls = asyncio.ensure_future(ask_each(toolbox, pictures(8, seed=3)))
        await asyncio.sleep(0.5)
        status = await asyncio.to_thread(ray_server.stop)
        assert status == 128 + signal.SIGTERM, ray_server.log.read_text()[-3000:]
        return await calls

    results = asyncio.run(run())
    assert all(not isinstance(r, BaseException) and r[1] == {"image": r[0]} for r in results), results
    assert "terminated" in ray_server.log.read_text()
    print(f"\nRay: started in {ray_server.startup_s:.1f} s; {memory} MiB resident (server + Ray + replicas)")  # type: ignore[attr-defined]
