"""``phi3v-tools serve`` as a real process on the tiny model: the OpenAI API and MCP on one port, behind one
token, the shared HTTP guards, and a clean SIGTERM; the tools elsewhere reach it with PHI3V_BACKEND=openai."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

openai = pytest.importorskip("openai", reason="the conformance client: pip install -e '.[remote]'")

REPO = Path(__file__).resolve().parent.parent
TOKEN = "s3cret-token"
START_TIMEOUT_S = 240.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Serve:
    def __init__(self, proc: subprocess.Popen[str], url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log

    def client(self, key: str = TOKEN) -> Any:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def serve(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHI3V_")}
    env.update(
        OMP_NUM_THREADS="1",
        PHI3V_MODEL=str(tiny_dir),
        PHI3V_API_KEY=TOKEN,
        PHI3V_MCP_MAX_BODY_MB="1",
        PHI3V_MCP_SHUTDOWN_GRACE_S="2",
        PHI3V_CACHE_DIR=str(log.parent / "cache"),
    )
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "phi3v_tools.cli", "serve", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=log.parent,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while "serving " not in log.read_text():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    running = Serve(proc, url, log)
    yield running
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_health_is_200_as_soon_as_it_serves(serve: Serve) -> None:
    # First in this module: before any completion (a readiness probe's view).
    ok = httpx.get(serve.url + "/health", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert ok.status_code == 200 and ok.json() == {"status": "ok"}


def test_openai_clients_with_the_key_are_served_and_others_refused(
    serve: Serve, sample_images: dict[str, Path], tiny_dir: Path
) -> None:
    client = serve.client()
    assert [m.id for m in client.models.list().data] == [str(tiny_dir)]
    image = "data:image/png;base64," + base64.b64encode(sample_images["cover"].read_bytes()).decode()
    answer = client.chat.completions.create(
        model=str(tiny_dir),
        messages=[
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "Title?"}],
            }
        ],  # type: ignore[list-item]
        response_format={"type": "json_object"},
        max_tokens=30,
        temperature=0,
    )
    assert isinstance(json.loads(answer.choices[0].message.content or ""), dict)
    with pytest.raises(openai.AuthenticationError):
        serve.client("wrong").models.list()
    assert httpx.get(serve.url + "/health", timeout=30).status_code == 401  # every path is behind the token
    ok = httpx.get(serve.url + "/health", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert ok.json() == {"status": "ok"}


def test_mcp_is_served_on_the_same_port_behind_the_same_token(serve: Serve) -> None:
    initialize = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}},
    }
    headers = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
    refused = httpx.post(serve.url + "/mcp", json=initialize, headers=headers, timeout=30)
    assert refused.status_code == 401
    headers["authorization"] = f"Bearer {TOKEN}"
    accepted = httpx.post(serve.url + "/mcp", json=initialize, headers=headers, timeout=30)
    assert accepted.status_code == 200 and "phi3v-tools" in accepted.text


def test_the_guards_apply_to_the_openai_paths(serve: Serve) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    big = {"messages": [{"role": "user", "content": "x" * (2 * 2**20)}]}  # over PHI3V_MCP_MAX_BODY_MB=1
    assert httpx.post(serve.url + "/v1/chat/completions", json=big, headers=auth, timeout=30).status_code == 413
    rebound = httpx.get(serve.url + "/v1/models", headers={**auth, "Host": "evil.example"}, timeout=30)
    assert rebound.status_code == 421  # DNS rebinding: a loopback server answers only to its own names
    page = httpx.get(serve.url + "/v1/models", headers={**auth, "Origin": "https://evil.example"}, timeout=30)
    assert page.status_code == 403  # a web page elsewhere
    local = httpx.get(serve.url + "/v1/models", headers={**auth, "Origin": "http://localhost:3000"}, timeout=30)
    assert local.status_code == 200
    _ = serve.client().models.list()  # and it keeps serving


def test_the_tools_elsewhere_run_against_it_with_the_remote_backend(
    serve: Serve, sample_images: dict[str, Path]
) -> None:
    code = (
        "import json, sys\n"
        "from phi3v_tools import read_text\n"
        f"r = read_text({str(sample_images['cover'])!r}, fields=['title', 'author'])\n"
        "print(json.dumps([list(r.fields), 'torch' in sys.modules]))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHI3V_")}
    env.update(
        PHI3V_BACKEND="openai",
        PHI3V_BASE_URL=serve.url + "/v1",
        PHI3V_API_KEY=TOKEN,
        PHI3V_ALLOWED_DIRS=str(sample_images["cover"].parent),
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [["title", "author"], False]


def test_metrics_are_behind_the_token_and_count_both_surfaces_and_the_guards_refusals(serve: Serve) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    assert httpx.get(serve.url + "/metrics", timeout=30).status_code == 401
    answer = httpx.get(serve.url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert answer.status_code == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(answer.text)
        for s in family.samples
    }

    def requests(surface: str, code: int) -> float:
        return samples.get(("phi3v_http_requests_total", (("code", str(code)), ("surface", surface))), 0.0)

    # What the tests above sent (this module's order): refusals by the guards count as much as answers.
    assert requests("mcp", 401) >= 1 and requests("mcp", 200) >= 1
    assert requests("openai", 401) >= 1 and requests("openai", 413) >= 1 and requests("openai", 421) >= 1
    assert requests("openai", 200) >= 3
    assert requests("other", 401) >= 2  # /health and /metrics without the token
    assert samples[("phi3v_request_success_total", (("finish_reason", "stop"), ("stream", "false")))] >= 1
    assert samples[("phi3v_engine_prompt_tokens_total", ())] > 0
    assert samples[("phi3v_decode_steps_total", ())] > 0


def test_sigterm_stops_the_server_with_143_and_one_line(serve: Serve) -> None:
    serve.proc.send_signal(signal.SIGTERM)
    assert serve.proc.wait(timeout=30) == 143
    log = serve.log.read_text()
    assert log.rstrip().endswith("phi3v-tools: terminated"), log[-2000:]
    assert "Traceback" not in log


def test_host_names_are_read_with_ports_and_ipv6_brackets() -> None:
    from phi3v_tools.serving.server import _hostname

    assert _hostname("localhost:8000") == "localhost" and _hostname("[::1]:8000") == "::1"
    assert (
        _hostname("127.0.0.1") == "127.0.0.1"
        and _hostname("::1") == "::1"
        and _hostname("EVIL.example") == "evil.example"
    )


def test_on_a_wildcard_bind_the_openai_paths_answer_to_this_machines_names_and_refuse_a_rebound_one() -> None:
    import asyncio

    from phi3v_tools.serving.server import serving_app
    from phi3v_tools.settings import Settings
    from tests.fakes import FakeBackend

    settings = Settings(model="fake", serve_host="0.0.0.0", mcp_allowed_hosts=("proxy.example",))
    app = serving_app(settings, FakeBackend())

    async def status(path: str, host: str) -> int:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return (await client.get(path, headers={"Host": host})).status_code

    async def statuses() -> dict[str, int]:
        hosts = [f"{socket.gethostname()}:8000", "proxy.example", "127.0.0.1:8000", "evil.example:8000"]
        return {host: await status("/v1/models", host) for host in hosts} | {
            "metrics from evil.example": await status("/metrics", "evil.example")
        }

    assert asyncio.run(statuses()) == {
        f"{socket.gethostname()}:8000": 200,
        "proxy.example": 200,
        "127.0.0.1:8000": 200,
        "evil.example:8000": 421,
        "metrics from evil.example": 421,
    }
