"""The remote backend (PHI3V_BACKEND=openai): the tools over an OpenAI-compatible server, here phi3v-tools' own
app on the tiny model over loopback, and small servers that misbehave on purpose."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from phi3v_tools.errors import GenerationError, ModelNotFoundError, PromptError
from phi3v_tools.images import ImagePolicy
from phi3v_tools.runner import GenerationRequest, Runner
from phi3v_tools.tools import Toolbox
from tests.openai_server import MODEL, Served

pytest.importorskip("openai", reason="the remote backend's client: pip install -e '.[remote]'")

from phi3v_tools.backends.openai import OpenAIBackend, RemoteError, to_openai_messages  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def served(tiny_runner: Runner) -> Iterator[Served]:
    with Served(tiny_runner) as running:
        yield running


@pytest.fixture
def remote_toolbox(served: Served, sample_images: dict[str, Path]) -> Toolbox:
    backend = OpenAIBackend(served.url + "/v1")
    return Toolbox(backend, ImagePolicy(allowed_dirs=(sample_images["chart"].parent,)))


def test_the_model_name_is_the_first_the_server_lists(served: Served) -> None:
    assert OpenAIBackend(served.url + "/v1").model_name == MODEL


def test_read_text_over_the_server_returns_exactly_the_fields_asked_for_and_the_local_answer(
    remote_toolbox: Toolbox, tiny_toolbox: Toolbox, sample_images: dict[str, Path]
) -> None:
    cover = sample_images["cover"]
    remote = remote_toolbox.read_text(cover, fields=["title", "author"])
    assert remote.fields is not None and list(remote.fields) == ["title", "author"]
    local = tiny_toolbox.read_text(cover, fields=["title", "author"])
    assert (remote.text, remote.fields) == (local.text, local.fields)  # greedy, the same prompt: the same answer
    assert remote.call.model == MODEL and remote.call.prompt_tokens == local.call.prompt_tokens


def test_every_tool_runs_over_the_server_with_the_local_answers(
    remote_toolbox: Toolbox, tiny_toolbox: Toolbox, sample_images: dict[str, Path]
) -> None:
    chart, a, b = (str(sample_images[k]) for k in ("chart", "scene_a", "scene_b"))

    async def both(name: str, *args: Any) -> tuple[Any, Any]:
        return await getattr(remote_toolbox, name)(*args), await getattr(tiny_toolbox, name)(*args)

    for name, args in [
        ("adescribe_image", (chart, "What is shown?", "brief")),
        ("aread_table", (chart,)),
        ("acompare_images", ([a, b],)),  # several images, 4 crops each (mm_processor_kwargs)
        ("aask_images", ([a], "How many players?")),
    ]:
        remote, local = asyncio.run(both(name, *args))
        strip = {"call"}
        assert remote.model_dump(exclude=strip) == local.model_dump(exclude=strip), name


def test_streaming_over_the_server_reports_pieces_that_add_up_to_the_answer(
    remote_toolbox: Toolbox, sample_images: dict[str, Path]
) -> None:
    pieces: list[str] = []
    answer = asyncio.run(
        remote_toolbox.aask_images([str(sample_images["chart"])], "Describe it.", on_text=pieces.append)
    )
    assert len(pieces) > 1 and "".join(pieces).strip() == answer.answer


def test_an_image_sent_again_is_encoded_once_and_the_encodings_kept_are_bounded(
    served: Served, sample_images: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from phi3v_tools.backends import openai as remote

    encoded: list[tuple[int, int]] = []
    real = remote.png_data_uri

    def counting(image: Any) -> str:
        encoded.append(image.size)
        return real(image)

    monkeypatch.setattr(remote, "png_data_uri", counting)
    backend = OpenAIBackend(served.url + "/v1")
    toolbox = Toolbox(backend, ImagePolicy(allowed_dirs=(sample_images["chart"].parent,)))
    first = toolbox.describe_image(sample_images["chart"], detail="brief")
    again = toolbox.ask_images(first.images[0].handle, "What colour are the bars?")
    assert len(encoded) == 1 and again.call.cached_images == 1  # one encoding; the server's cache hit too
    monkeypatch.setattr(remote, "URI_CACHE_BYTES", backend._uri_bytes + 10)  # room for the chart's alone
    toolbox.describe_image(sample_images["cover"], detail="brief")
    assert backend._uri_bytes <= remote.URI_CACHE_BYTES and len(backend._uris) == 1  # the chart's went out
    toolbox.describe_image(sample_images["chart"], detail="brief")
    assert len(encoded) == 3


# ---------------------------------------------------------------------------------------------------------------------
# Servers that misbehave


class Scripted:
    """A tiny OpenAI-like server: answers /v1/chat/completions from a script of (status, body, headers)."""

    def __init__(self, script: list[tuple[int, Any, dict[str, str]]]) -> None:
        self.script = script
        self.calls = 0
        self.peers: list[int | None] = []  # the client's port per call: one connection, one port

    async def chat(self, request: Request) -> Response:
        self.calls += 1
        self.peers.append(request.client.port if request.client else None)
        status, body, headers = self.script[min(self.calls, len(self.script)) - 1]
        return JSONResponse(body, status_code=status, headers=headers)

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "scripted", "object": "model", "created": 0}]})

    def app(self) -> Starlette:
        return Starlette(
            routes=[Route("/v1/chat/completions", self.chat, methods=["POST"]), Route("/v1/models", self.models)]
        )


def completion(content: str) -> dict[str, Any]:
    return {
        "id": "x",
        "object": "chat.completion",
        "created": 0,
        "model": "scripted",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }


def test_async_calls_on_one_event_loop_reuse_one_connection_which_closes_with_the_loop() -> None:
    script = Scripted([(200, completion("ok"), {})])
    with Served(app=script.app()) as running:
        backend = OpenAIBackend(running.url + "/v1")

        async def three_calls() -> Any:
            for _ in range(3):
                await backend.generate(GenerationRequest.from_text("hi"))
            return backend._loops[asyncio.get_running_loop()][1]

        first_client = asyncio.run(three_calls())
        assert first_client.is_closed()  # asyncio.run closed it with its loop: no connection left open
        second_client = asyncio.run(three_calls())
    assert second_client is not first_client and second_client.is_closed()
    assert backend._loops == {}  # nothing kept for loops that are gone
    first, second = script.peers[:3], script.peers[3:]
    assert len(set(first)) == 1 and len(set(second)) == 1 and first != second  # one connection per loop


def test_a_503_then_a_200_is_retried_and_answers() -> None:
    script = Scripted(
        [(503, {"error": {"message": "warming up"}}, {"Retry-After": "0"}), (200, completion("hello"), {})]
    )
    with Served(app=script.app()) as running:
        result = OpenAIBackend(running.url + "/v1").generate_sync(GenerationRequest.from_text("hi"))
    assert result.text == "hello" and script.calls == 2 and result.prompt_tokens == 5


@pytest.mark.parametrize(
    ("status", "error", "fragment"),
    [
        (401, RemoteError, "refused the API key"),
        (404, ModelNotFoundError, "does not serve"),
        (400, PromptError, "refused the request: too long"),
        (503, RemoteError, "up but not serving"),
    ],
)
def test_a_refusal_becomes_an_error_that_says_what_to_do(status: int, error: type, fragment: str) -> None:
    message = "too long" if status == 400 else "nope"
    script = Scripted([(status, {"error": {"message": message}}, {"Retry-After": "0"})])
    with Served(app=script.app()) as running:
        backend = OpenAIBackend(running.url + "/v1", model="scripted")
        with pytest.raises(error, match=fragment):
            backend.generate_sync(GenerationRequest.from_text("hi"))


def test_a_server_that_ignores_the_schema_is_an_error_not_a_wrong_answer() -> None:
    script = Scripted([(200, completion("not json at all"), {})])
    with Served(app=script.app()) as running:
        backend = OpenAIBackend(running.url + "/v1")
        with pytest.raises(GenerationError, match="JSON"):
            backend.generate_sync(GenerationRequest.from_text("hi", json_schema={"type": "object"}))


def test_an_unreachable_server_is_one_clear_error() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    backend = OpenAIBackend(f"http://127.0.0.1:{port}/v1", model="m", timeout_s=5)
    with pytest.raises(RemoteError, match="cannot reach"):
        backend.generate_sync(GenerationRequest.from_text("hi"))


def test_cancelling_a_streamed_call_closes_the_stream_and_stops_the_generation() -> None:
    from tests.test_serving import Slow

    slow = Slow()
    with Served(slow) as running:
        backend = OpenAIBackend(running.url + "/v1", model=MODEL)

        async def call_then_cancel() -> None:
            got = asyncio.Event()
            task = asyncio.ensure_future(
                backend.generate(GenerationRequest.from_text("hi", on_text=lambda piece: got.set()))
            )
            await asyncio.wait_for(got.wait(), 30)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(call_then_cancel())
        deadline = time.monotonic() + 10
        while not slow.ended and time.monotonic() < deadline:
            time.sleep(0.05)
    assert slow.ended == ["cancelled"]


def test_images_go_where_their_tags_stand_or_before_the_last_user_text() -> None:
    from PIL import Image

    red, blue = Image.new("RGB", (4, 4), "red"), Image.new("RGB", (4, 4), "blue")
    untagged = to_openai_messages([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}], [red, blue])
    assert untagged[0] == {"role": "system", "content": "S"}
    assert [p["type"] for p in untagged[1]["content"]] == ["image_url", "image_url", "text"]
    tagged = to_openai_messages([{"role": "user", "content": "A <|image_2|>\nB <|image_1|>\nC"}], [red, blue])
    kinds = [(p["type"], p.get("text")) for p in tagged[0]["content"]]
    assert kinds == [("text", "A "), ("image_url", None), ("text", "\nB "), ("image_url", None), ("text", "C")]
    assert tagged[0]["content"][1]["image_url"]["url"] == untagged[1]["content"][1]["image_url"]["url"]  # blue
    with pytest.raises(PromptError, match="names no image"):
        to_openai_messages([{"role": "user", "content": "<|image_3|>"}], [red])


WITH_HEAVY_REPORT = """
import atexit, json, sys
def report():
    with open(sys.argv[1], "w") as out:
        json.dump([m for m in ("torch", "transformers", "llguidance") if m in sys.modules], out)
atexit.register(report)
from phi3v_mcp.__main__ import main
sys.exit(main([]))
"""


def test_the_stdio_mcp_server_with_the_remote_backend_serves_the_tools_without_torch(
    served: Served, sample_images: dict[str, Path], tmp_path: Path
) -> None:
    import anyio
    from mcp import Client, StdioServerParameters
    from mcp.client.stdio import stdio_client

    from phi3v_tools.tools import TextReading

    report = tmp_path / "heavy.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHI3V_")}
    env.update(
        PHI3V_BACKEND="openai",
        PHI3V_BASE_URL=served.url + "/v1",
        PHI3V_ALLOWED_DIRS=str(sample_images["cover"].parent),
    )
    without_local = str(REPO / "tests" / "without_local.py")  # torch, transformers, llguidance: not importable
    args = [without_local, "-c", WITH_HEAVY_REPORT, str(report)]
    params = StdioServerParameters(command=sys.executable, args=args, env=env)

    async def session() -> Any:
        with open(tmp_path / "server.log", "w") as errlog, anyio.fail_after(120):
            async with Client(stdio_client(params, errlog=errlog), read_timeout_seconds=100) as client:
                return await client.call_tool(
                    "read_text", {"image": str(sample_images["cover"]), "fields": ["title", "author"]}
                )

    result = anyio.run(session)
    log = (tmp_path / "server.log").read_text()
    assert not result.is_error, log
    reading = TextReading.model_validate(result.structured_content)
    assert reading.fields is not None and list(reading.fields) == ["title", "author"] and reading.call.model == MODEL
    assert f"ready on {served.url}/v1" in log
    assert json.loads(report.read_text()) == []  # no torch, transformers or llguidance in the server's process


def test_the_cli_runs_a_tool_and_shows_info_over_the_remote_backend(
    served: Served, sample_images: dict[str, Path], tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHI3V_")}
    env.update(PHI3V_BACKEND="openai", PHI3V_BASE_URL=served.url + "/v1", PHI3V_CACHE_DIR=str(tmp_path))
    cover = sample_images["cover"]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "phi3v_tools.cli", *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=cover.parent)

    reading = cli("read-text", str(cover), "--fields", "title,author", "--json")
    assert reading.returncode == 0, reading.stderr
    assert list(json.loads(reading.stdout)["fields"]) == ["title", "author"]
    info = cli("info", "--json")
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout) == {
        "backend": "openai",
        "base_url": served.url + "/v1",
        "model": MODEL,
        "models": [MODEL],
    }
    demo = cli("demo")
    assert demo.returncode == 1 and "unset PHI3V_BACKEND" in demo.stderr


def test_an_answer_the_server_did_not_complete_is_an_error_not_a_short_success() -> None:
    cut = completion("half an ans")
    cut["choices"][0]["finish_reason"] = "abort"  # vLLM's, when it drops a request
    script = Scripted([(200, cut, {})])
    with Served(app=script.app()) as running, pytest.raises(GenerationError, match="without completing it"):
        OpenAIBackend(running.url + "/v1").generate_sync(GenerationRequest.from_text("hi"))
