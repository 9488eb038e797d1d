"""Faults around the MCP server: clients that leave mid-generation, failures inside the model, SIGTERM under
load, broken model paths at start-up, and the HTTP guards of a server configured from the environment."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx2
import pytest
import torch
from mcp import Client
from mcp.types import TextContent
from phi3v_mcp.server import create_server

from benchmarks.load_http import Call, free_port, load, mcp_http_server
from phi3v_tools.images import ImagePolicy
from phi3v_tools.model import Phi3VForCausalLM, Phi3VProcessor
from phi3v_tools.runner import Runner
from phi3v_tools.settings import Settings
from phi3v_tools.tools import Toolbox, tool_specs
from tests.mcp_http import http_client, http_server

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_torch_thread")
POST_HEADERS = {"content-type": "application/json", "accept": "application/json, text/event-stream"}


@pytest.fixture
def served(
    tiny_model: Phi3VForCausalLM, tiny_processor: Phi3VProcessor, tiny_dir: Path, sample_images: dict[str, Path]
) -> Iterator[tuple[Settings, Runner, Toolbox]]:
    folder = sample_images["chart"].parent
    settings = Settings(model=str(tiny_dir), allowed_dirs=(folder,), allow_urls=False, batch_window_ms=1)
    runner = Runner(tiny_model, tiny_processor, settings)
    yield settings, runner, Toolbox(runner, ImagePolicy(allowed_dirs=(folder,)))
    runner.close()


def _text(result: Any) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, TextContent))


# ---------------------------------------------------------------------------------------------------------------------
# A client that leaves


def _legacy_session(http: httpx2.Client, url: str) -> dict[str, str]:
    """The pre-2026 handshake (initialize + initialized), as HTTP clients such as desktop assistants do it."""
    hello = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
    }
    response = http.post(url, json=hello, headers=POST_HEADERS)
    assert response.status_code == 200, response.text
    headers = {**POST_HEADERS, "mcp-session-id": response.headers["mcp-session-id"]}
    http.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers)
    return headers


def test_a_client_that_disconnects_mid_generation_frees_its_slot_and_the_next_call_runs(
    served: tuple[Settings, Runner, Toolbox], sample_images: dict[str, Path]
) -> None:
    settings, runner, toolbox = served
    rambling = {  # no schema: the tiny model rambles up to the 500-token budget unless stopped
        "jsonrpc": "2.0",
        "id": 2,
        "method": "tools/call",
        "params": {
            "name": "ask_images",
            "arguments": {"images": [str(sample_images["chart"])], "question": "Tell me everything."},
            "_meta": {"progressToken": "p"},
        },
    }
    with http_server(settings, toolbox) as url:
        with httpx2.Client(timeout=30) as http:
            headers = _legacy_session(http, url)
            with http.stream("POST", url, json=rambling, headers=headers) as response:
                for line in response.iter_lines():
                    if "notifications/progress" in line:
                        break  # generating: hang up without cancelling
        left = runner.decode_steps
        time.sleep(1.0)
        after_a_second = runner.decode_steps - left
        time.sleep(1.0)
        assert runner.decode_steps - left == after_a_second, "generation went on after the client left"
        assert after_a_second <= 5, f"{after_a_second} decode steps after the client left"

        async def next_call() -> Any:
            async with http_client(url, None) as client:
                return await client.call_tool("describe_image", {"image": str(sample_images["cover"])})

        result = anyio.run(next_call)
    assert not result.is_error, _text(result)


MALFORMED = {
    "empty": b"",
    "not-json": b"not json",
    "deeply-nested-array": b"[" * 100_000,
    "deeply-nested-object": b'{"a":' * 50_000,
    "invalid-utf8": b'{"jsonrpc":"2.0","id":1,"method":"\xff\xfe"}',
    "batch": b'[{"jsonrpc":"2.0","id":1,"method":"tools/list"}]',
    "huge-integer-id": b'{"jsonrpc":"2.0","id":' + b"9" * 100_000 + b',"method":"tools/list"}',
    "no-method": b'{"jsonrpc":"2.0","id":1}',
    "null": b"null",
    "tool-call-without-a-session": b'{"jsonrpc":"2.0","id":1,"method":"tools/call",'
    b'"params":{"name":"describe_image","arguments":{"image":"/etc/passwd"}}}',
}


def test_malformed_http_requests_get_4xx_answers_and_the_server_keeps_serving(
    served: tuple[Settings, Runner, Toolbox], sample_images: dict[str, Path]
) -> None:
    settings, _runner, toolbox = served
    with http_server(settings, toolbox) as url:
        with httpx2.Client(timeout=30) as http:
            statuses = {
                name: http.post(url, content=body, headers=POST_HEADERS).status_code for name, body in MALFORMED.items()
            }
            statuses["wrong-content-type"] = http.post(
                url, content=MALFORMED["batch"], headers={**POST_HEADERS, "content-type": "text/plain"}
            ).status_code
            statuses["put"] = http.put(url, content=b"{}").status_code
        assert all(400 <= status < 500 for status in statuses.values()), statuses

        async def good_call() -> Any:
            async with http_client(url, None) as client:
                return await client.call_tool("describe_image", {"image": str(sample_images["chart"])})

        result = anyio.run(good_call)
    assert not result.is_error, _text(result)


# ---------------------------------------------------------------------------------------------------------------------
# Failures inside the model


def _call_twice_over_both_transports(settings: Settings, toolbox: Toolbox, image: str) -> list[Any]:
    """describe_image twice in memory, then twice over HTTP: [error?, ok, error?, ok] depending on the fault."""

    async def go(url: str) -> list[Any]:
        arguments = {"image": image, "detail": "brief"}
        async with Client(create_server(settings, toolbox)) as client:
            results = [await client.call_tool("describe_image", arguments) for _ in range(2)]
        async with http_client(url, None) as client:
            results += [await client.call_tool("describe_image", arguments) for _ in range(2)]
        return results

    with http_server(settings, toolbox) as url:
        return anyio.run(go, url)


def _assert_each_fault_failed_one_call_and_the_next_was_served(results: list[Any], *fragments: str) -> None:
    failed, served_ok = results[0::2], results[1::2]
    for result in failed:
        assert result.is_error and all(fragment in _text(result) for fragment in fragments), _text(result)
        assert "Traceback" not in _text(result)
    assert all(not result.is_error for result in served_ok), [_text(r) for r in served_ok]


def test_an_injected_cuda_out_of_memory_fails_the_call_with_a_hint_and_the_server_keeps_serving(
    served: tuple[Settings, Runner, Toolbox], sample_images: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, runner, toolbox = served
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
    _fail_every_other_call(runner.model.language_model, oom, monkeypatch, counted=_is_prefill)
    results = _call_twice_over_both_transports(settings, toolbox, str(sample_images["chart"]))
    _assert_each_fault_failed_one_call_and_the_next_was_served(results, "memory", "num_crops")


def _fail_every_other_call(
    module: torch.nn.Module,
    error: BaseException,
    monkeypatch: pytest.MonkeyPatch,
    counted: Callable[[dict[str, Any]], bool] = lambda _kwargs: True,
) -> None:
    """``module.forward`` raises ``error`` on its 1st, 3rd, 5th... counted call and runs normally otherwise."""
    original = module.forward
    calls = {"n": 0}

    def forward(*args: Any, **kwargs: Any) -> Any:
        if counted(kwargs):
            calls["n"] += 1
            if calls["n"] % 2 == 1:
                raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "forward", forward)


def _is_prefill(kwargs: dict[str, Any]) -> bool:
    """The first chunk of a prompt's prefill (a long prompt is prefilled in several)."""
    embeds, positions = kwargs.get("inputs_embeds"), kwargs.get("position_ids")
    return embeds is not None and embeds.shape[1] > 1 and positions is not None and int(positions[0, 0]) == 0


def test_an_exception_inside_the_vision_tower_fails_the_call_cleanly_and_the_server_keeps_serving(
    served: tuple[Settings, Runner, Toolbox], sample_images: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, runner, toolbox = served
    _fail_every_other_call(runner.model.vision_tower, RuntimeError("injected: illegal memory access"), monkeypatch)
    runner.feature_cache.clear()  # every call must reach the tower
    monkeypatch.setattr(runner.feature_cache, "put", lambda *args, **kwargs: None)
    results = _call_twice_over_both_transports(settings, toolbox, str(sample_images["scene_a"]))
    _assert_each_fault_failed_one_call_and_the_next_was_served(results, "injected: illegal memory access")


# ---------------------------------------------------------------------------------------------------------------------
# Processes: SIGTERM under load, start-up errors, guards configured from the environment


@pytest.mark.slow
def test_sigterm_under_load_lets_calls_in_flight_finish_refuses_new_ones_and_exits_within_the_grace_period(
    tiny_dir: Path, tmp_path: Path
) -> None:
    grace = 3.0
    env = {"PHI3V_MAX_NEW_TOKENS": "64", "PHI3V_MCP_SHUTDOWN_GRACE_S": str(grace), "OMP_NUM_THREADS": "1"}
    calls: list[Call] = []
    with mcp_http_server(str(tiny_dir), tmp_path / "server.log", **env) as (process, url):

        async def scenario() -> tuple[float, float, int]:
            async with anyio.create_task_group() as group:
                group.start_soon(load, url, 6, 4, calls)
                with anyio.fail_after(120):
                    while len(calls) < 3:  # the server is busy: some calls done, others in flight
                        await anyio.sleep(0.02)
                signalled = time.monotonic()
                process.send_signal(signal.SIGTERM)
                ok_at_signal = sum(c.outcome == "ok" for c in calls)
                with anyio.fail_after(grace + 15):
                    while process.poll() is None:
                        await anyio.sleep(0.05)
                exited = time.monotonic() - signalled
            return exited, time.monotonic() - signalled, ok_at_signal

        exited, clients_done, ok_at_signal = anyio.run(scenario)
    log = (tmp_path / "server.log").read_text()
    assert exited < grace + 10, f"exited {exited:.1f}s after SIGTERM"
    assert clients_done < grace + 15, "the clients were left hanging"
    assert process.returncode == 143, log[-2000:]  # 128 + SIGTERM, after the drain, with one line
    assert log.rstrip().endswith("phi3v_mcp: terminated"), log[-2000:]
    assert len(calls) == 24 and len({(c.client, c.index) for c in calls}) == 24, "a call got no answer or two"
    outcomes = {c.outcome.split(":")[0] for c in calls}
    assert outcomes <= {"ok", "session failed", "exception", "error"}, outcomes  # never a timeout or a mix-up
    assert sum(c.outcome == "ok" for c in calls) > ok_at_signal, "no call in flight at the signal finished"
    assert "Traceback" not in log, log[-3000:]


def _start_up(model: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PHI3V_MODEL": model, "HF_HUB_OFFLINE": "1", "PHI3V_MCP_PORT": str(free_port())}
    return subprocess.run(
        [sys.executable, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
    )


def _clean_failure(done: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    for fragment in fragments:
        assert fragment in done.stderr, done.stderr[-2000:]
    assert done.stdout == "", "stdout belongs to the protocol"


@pytest.mark.slow
@pytest.mark.parametrize(
    "command", [("-m", "phi3v_mcp", "--transport", "http"), ("-m", "phi3v_tools.cli", "mcp")], ids=["http", "stdio"]
)
def test_a_model_path_that_does_not_exist_is_one_clear_start_up_error_and_exit_1(
    command: tuple[str, ...], tmp_path: Path
) -> None:
    missing = str(tmp_path / "no-such-model")
    _clean_failure(_start_up(missing, *command), "no-such-model")


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated-weights", "garbage-config"])
def test_a_corrupt_checkpoint_is_one_clear_start_up_error_and_exit_1(
    damage: str, tiny_dir: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    if damage == "truncated-weights":
        weights = sorted(broken.glob("*.safetensors"))[0]
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        expected = weights.name
    else:
        (broken / "config.json").write_text("{not json")
        expected = "config.json"
    _clean_failure(_start_up(str(broken), "-m", "phi3v_mcp", "--transport", "http"), expected)


@pytest.mark.slow
def test_a_server_configured_from_the_environment_refuses_wrong_hosts_origins_and_tokens(
    tiny_dir: Path, tmp_path: Path
) -> None:
    token = "s3cret-token"
    listing = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}})
    with mcp_http_server(str(tiny_dir), tmp_path / "server.log", PHI3V_MCP_TOKEN=token) as (_process, url):
        with httpx2.Client(timeout=10) as http:

            def post(**headers: str) -> int:
                return http.post(url, content=listing, headers={**POST_HEADERS, **headers}).status_code

            authorized = {"authorization": f"Bearer {token}"}
            assert post() == 401
            assert post(authorization="Bearer wrong") == 401
            assert post(authorization=token) == 401  # the scheme is part of it
            assert post(**authorized, host="evil.example") == 421
            assert post(**authorized, origin="http://evil.example") == 403
            assert post(**authorized, host=f"localhost:{urlsplit(url).port}") not in (401, 403, 421)

        async def listed() -> set[str]:
            async with http_client(url, token) as client:
                return {tool.name for tool in (await client.list_tools()).tools}

        assert anyio.run(listed) == {spec.name for spec in tool_specs()}
