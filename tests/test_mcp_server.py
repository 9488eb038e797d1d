"""The MCP server (servers/phi3v_mcp): in memory, over stdio, over HTTP, through LangChain, and the example."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.types import CallToolResult, TextContent
from phi3v_mcp.server import create_server, listening_socket
from pydantic import BaseModel

from phi3v_tools.runner import Runner
from phi3v_tools.settings import Settings
from phi3v_tools.tools import Answer, ImageDescription, Table, TextReading, Toolbox, tool_specs
from tests.mcp_http import http_client, http_server

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("one_torch_thread")]

REPO = Path(__file__).resolve().parent.parent
TOOLS = {spec.name: spec.result for spec in tool_specs()}
COUNT_SCHEMA = {"type": "object", "properties": {"count": {"type": "integer"}}, "required": ["count"]}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def settings(tiny_dir: Path, sample_images: dict[str, Path]) -> Settings:
    return Settings(model=str(tiny_dir), allowed_dirs=(sample_images["chart"].parent,), allow_urls=False)


def text_of(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, TextContent))


def arguments(tool: str, images: dict[str, Path]) -> dict[str, Any]:
    chart, a, b = str(images["chart"]), str(images["scene_a"]), str(images["scene_b"])
    return {
        "describe_image": {"image": chart, "detail": "brief"},
        "read_text": {"image": str(images["cover"]), "fields": ["title", "author"]},
        "read_table": {"image": str(images["table"]), "columns": ["Region", "Q1", "Q2"]},
        "compare_images": {"images": [a, b], "question": "What differs?"},
        "ask_images": {"images": [chart], "question": "How many bars?", "output_schema": COUNT_SCHEMA},
    }[tool]


# ---------------------------------------------------------------------------------------------------------------------
# In memory


@pytest.mark.parametrize("allow_urls", [False, True])
async def test_list_tools_shows_the_five_read_only_tools_with_schemas_and_open_world_following_allow_urls(
    settings: Settings, tiny_toolbox: Toolbox, allow_urls: bool
) -> None:
    server = create_server(replace(settings, allow_urls=allow_urls), tiny_toolbox)
    async with Client(server) as client:
        listed = await client.list_tools()
        assert client.server_info is not None and client.server_info.name == "phi3v-tools"
        assert client.instructions and "image://sha256/" in client.instructions
    tools = {tool.name: tool for tool in listed.tools}
    assert list(tools) == list(TOOLS)
    for name, model in TOOLS.items():
        tool = tools[name]
        assert tool.description
        assert tool.input_schema["type"] == "object"
        assert "ctx" not in tool.input_schema["properties"]
        assert all(p.get("description") for p in tool.input_schema["properties"].values()), name
        assert tool.output_schema is not None
        assert set(model.model_fields) <= set(tool.output_schema["properties"])
        assert tool.annotations is not None
        assert tool.annotations.read_only_hint is True
        assert tool.annotations.open_world_hint is allow_urls
    assert tools["describe_image"].input_schema["properties"]["detail"]["enum"] == ["brief", "normal", "detailed"]
    assert tools["compare_images"].input_schema["properties"]["images"]["minItems"] == 2
    assert tools["compare_images"].input_schema["required"] == ["images"]
    assert set(tools["ask_images"].input_schema["required"]) == {"images", "question"}


@pytest.mark.parametrize("tool", list(TOOLS))
async def test_each_tool_returns_structured_content_valid_for_its_result_model_and_a_concise_text_block(
    settings: Settings, tiny_toolbox: Toolbox, sample_images: dict[str, Path], tool: str
) -> None:
    async with Client(create_server(settings, tiny_toolbox)) as client:
        result = await client.call_tool(tool, arguments(tool, sample_images))
    assert not result.is_error, text_of(result)
    assert result.structured_content is not None
    model: BaseModel = TOOLS[tool].model_validate(result.structured_content)
    text = text_of(result)
    assert text.startswith(model.to_text())  # type: ignore[attr-defined]
    assert not text.lstrip().startswith("{") or tool == "ask_images"  # a summary, not the JSON dump
    for info in result.structured_content["images"]:
        assert info["handle"].startswith("image://sha256/")
        assert info["handle"] in text  # handles reach models that only read the text
    if isinstance(model, Table):  # the columns asked for, exactly, and one cell per column in every row
        assert model.columns == arguments(tool, sample_images)["columns"]
        assert all(len(row) == len(model.columns) for row in model.rows)


async def test_a_chained_call_by_handle_reuses_the_image_and_hits_the_feature_cache(
    settings: Settings, tiny_toolbox: Toolbox, sample_images: dict[str, Path]
) -> None:
    async with Client(create_server(settings, tiny_toolbox)) as client:
        first = await client.call_tool("describe_image", {"image": str(sample_images["chart"]), "detail": "brief"})
        assert first.structured_content is not None, text_of(first)
        handle = first.structured_content["images"][0]["handle"]
        second = await client.call_tool(
            "ask_images", {"images": [handle], "question": "How many bars?", "output_schema": COUNT_SCHEMA}
        )
    assert not second.is_error, text_of(second)
    answer = Answer.model_validate(second.structured_content)
    assert answer.images[0].handle == handle
    assert answer.call.cached_images >= 1
    assert set(answer.answer) == {"count"}


@pytest.mark.parametrize(
    ("tool", "args", "expected"),
    [
        ("describe_image", {"image": "OUTSIDE"}, "outside the allowed directories"),
        ("read_text", {"image": "image://sha256/" + "0" * 64}, "unknown image handle"),
        ("compare_images", {"images": ["CHART"]}, "at least 2 items"),
        ("describe_image", {"image": "CHART", "detail": "verbose"}, "detail"),
    ],
    ids=["path-outside-allowed-dirs", "unknown-handle", "compare-one-image", "bad-detail"],
)
async def test_expected_failures_come_back_as_error_results_with_an_actionable_message_and_no_traceback(
    settings: Settings,
    tiny_toolbox: Toolbox,
    sample_images: dict[str, Path],
    tmp_path: Path,
    tool: str,
    args: dict[str, Any],
    expected: str,
) -> None:
    outside = tmp_path / "outside.png"
    outside.write_bytes(sample_images["chart"].read_bytes())
    swap = {"OUTSIDE": str(outside), "CHART": str(sample_images["chart"])}
    args = {
        k: ([swap.get(v, v) for v in value] if isinstance(value, list) else swap.get(value, value))
        for k, value in args.items()
    }
    async with Client(create_server(settings, tiny_toolbox)) as client:
        result = await client.call_tool(tool, args)
    assert result.is_error
    text = text_of(result)
    assert expected in text
    assert "Traceback" not in text and 'File "' not in text
    assert result.structured_content is None


async def test_progress_notifications_arrive_while_the_model_generates(
    settings: Settings, tiny_toolbox: Toolbox, sample_images: dict[str, Path]
) -> None:
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    async with Client(create_server(settings, tiny_toolbox)) as client:
        result = await client.call_tool(
            "describe_image", {"image": str(sample_images["chart"]), "detail": "brief"}, progress_callback=on_progress
        )
    assert not result.is_error, text_of(result)
    assert seen, "no progress notification arrived"
    values = [p for p, _, _ in seen]
    assert values == sorted(set(values))  # strictly increasing, as the spec requires
    assert all(message and "generating" in message for _, _, message in seen)


def decode_steps(toolbox: Toolbox, runner: Runner) -> Callable[[], int]:
    """How to read the engine's decode steps: in this process, or from the ``/metrics`` of the server that a
    remote toolbox calls (the engine is in that process)."""
    base_url = getattr(toolbox.backend, "base_url", None)
    if base_url is None:
        return lambda: runner.decode_steps

    def scraped() -> int:
        text = httpx.get(str(base_url).removesuffix("/").removesuffix("/v1") + "/metrics", timeout=30).text
        (line,) = [line for line in text.splitlines() if line.startswith("phi3v_decode_steps_total ")]
        return int(float(line.split()[1]))

    return scraped


async def _cancel_a_long_call_then_call_again(client: Client, steps: Callable[[], int], chart: str) -> CallToolResult:
    """Start a rambling call, cancel it once it generates, check that decoding stopped (``steps`` reads the
    engine's decode steps); then a normal call."""
    generating = anyio.Event()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        generating.set()

    async with anyio.create_task_group() as tasks:

        async def long_call() -> None:  # no schema: the tiny model rambles up to its 500-token budget
            await client.call_tool(
                "ask_images",
                {"images": [chart], "question": "Tell me a very long story."},
                progress_callback=on_progress,
            )
            pytest.fail("the long call finished before it was cancelled")

        tasks.start_soon(long_call)
        with anyio.fail_after(60):
            await generating.wait()
        started = steps()
        tasks.cancel_scope.cancel()
    await anyio.sleep(0.5)  # the runner drops the request before its next decode step
    stopped = steps()
    await anyio.sleep(0.5)
    assert steps() == stopped, "generation went on after the cancellation"
    assert stopped - started < 400, "the cancelled request ran to (nearly) its full budget"
    return await client.call_tool("describe_image", {"image": chart, "detail": "brief"})


async def test_cancelling_a_call_from_the_client_stops_generation_and_the_server_serves_the_next_call(
    settings: Settings, tiny_toolbox: Toolbox, tiny_runner: Runner, sample_images: dict[str, Path]
) -> None:
    async with Client(create_server(settings, tiny_toolbox)) as client:
        result = await _cancel_a_long_call_then_call_again(
            client, decode_steps(tiny_toolbox, tiny_runner), str(sample_images["chart"])
        )
    assert not result.is_error, text_of(result)


# ---------------------------------------------------------------------------------------------------------------------
# stdio


def _server_env(tiny_dir: Path, folder: Path) -> dict[str, str]:
    return {
        "PHI3V_MODEL": str(tiny_dir),
        "PHI3V_ALLOWED_DIRS": str(folder),
        "PHI3V_ALLOW_URLS": "false",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",  # see the one_torch_thread fixture
        "COLUMNS": "200",  # the server's log lines unwrapped
    }


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "remote"])
async def test_stdio_subprocess_round_trip_lists_tools_and_describes_an_image(
    backend: str, tiny_dir: Path, sample_images: dict[str, Path], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """``python -m phi3v_mcp`` with the model in it, and ``PHI3V_BACKEND=openai phi3v-tools mcp`` against a
    ``phi3v-tools serve`` process."""
    env = _server_env(tiny_dir, sample_images["chart"].parent)
    args, model = ["-m", "phi3v_mcp"], str(tiny_dir)
    if backend == "remote":
        env.update(PHI3V_BACKEND="openai", PHI3V_BASE_URL=request.getfixturevalue("tiny_server") + "/v1")
        args, model = ["-m", "phi3v_tools.cli", "mcp"], "tiny"
    params = StdioServerParameters(command=sys.executable, args=args, env=env)
    log = tmp_path / "server.log"
    generating = anyio.Event()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        generating.set()

    with open(log, "w") as errlog, anyio.fail_after(180):
        async with Client(stdio_client(params, errlog=errlog), read_timeout_seconds=150) as client:
            listed = await client.list_tools()
            result = await client.call_tool("describe_image", {"image": str(sample_images["chart"]), "detail": "brief"})
            # Abandoning a call sends notifications/cancelled; the server cancels the handler and keeps serving.
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(
                    lambda: client.call_tool(
                        "ask_images",
                        {"images": [str(sample_images["chart"])], "question": "Tell me a very long story."},
                        progress_callback=on_progress,
                    )
                )
                await generating.wait()
                tasks.cancel_scope.cancel()
            assert (await client.list_tools()).tools
    server_log = " ".join(log.read_text().split())
    assert "cancelled after" in server_log and "generation stopped" in server_log, server_log
    assert {tool.name for tool in listed.tools} == set(TOOLS)
    assert not result.is_error, text_of(result) + log.read_text()
    description = ImageDescription.model_validate(result.structured_content)
    assert description.call.model == model
    assert description.images[0].width == 640


# ---------------------------------------------------------------------------------------------------------------------
# Streamable HTTP


POST_HEADERS = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
LIST_TOOLS = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}


@pytest.mark.parametrize(
    ("bound", "allowed", "accepted", "refused"),
    [
        ("127.0.0.1", (), ["127.0.0.1:8765", "localhost:8765", "[::1]:8765"], ["evil.example:8765", "THIS"]),
        ("0.0.0.0", (), ["THIS", "localhost:80", "localhost"], ["evil.example:8765", "gpu.example:8765"]),
        ("0.0.0.0", ("gpu.example", "Proxy.Example"), ["gpu.example:8765", "proxy.example"], ["evil.example"]),
        ("10.1.2.3", (), ["10.1.2.3:8765", "127.0.0.1:1"], ["evil.example:8765", "10.1.2.4:8765"]),
        ("0.0.0.0", ("*",), ["evil.example:8765", "THIS"], []),
    ],
    ids=["loopback", "wildcard", "wildcard+named", "one address", "any"],
)
def test_the_host_check_takes_this_machines_names_on_a_wildcard_bind_and_the_names_configured(
    settings: Settings,
    toolbox: Toolbox,
    bound: str,
    allowed: tuple[str, ...],
    accepted: list[str],
    refused: list[str],
) -> None:
    """DNS-rebinding protection: a Host naming another site is refused (421), on any bind; on 0.0.0.0 the
    machine's own name is not (``http://gpu-box:8765/mcp`` from the network works)."""
    this = f"{socket.gethostname().lower()}:8765"
    settings = replace(settings, mcp_host=bound, mcp_allowed_hosts=allowed)
    with http_server(settings, toolbox) as url, httpx2.Client(timeout=10) as http:
        for host in [this if h == "THIS" else h for h in accepted]:
            answer = http.post(url, json=LIST_TOOLS, headers={**POST_HEADERS, "host": host})
            assert answer.status_code != 421, (host, answer.text)
        for host in [this if h == "THIS" else h for h in refused]:
            answer = http.post(url, json=LIST_TOOLS, headers={**POST_HEADERS, "host": host})
            assert answer.status_code == 421, (host, answer.text)
        page = http.post(url, json=LIST_TOOLS, headers={**POST_HEADERS, "origin": "http://evil.example"})
        if "*" in allowed:
            assert page.status_code not in (403, 421), page.text
        else:
            assert page.status_code == 403, page.text


@pytest.mark.slow
async def test_http_round_trip_needs_the_bearer_token_refuses_foreign_hosts_and_large_bodies(
    settings: Settings, tiny_toolbox: Toolbox, sample_images: dict[str, Path]
) -> None:
    token = "test-token-5d1f"
    settings = replace(settings, mcp_token=token, mcp_max_body_mb=0.05)
    with http_server(settings, tiny_toolbox) as url, httpx2.Client(timeout=10) as http:
        authorized = {**POST_HEADERS, "authorization": f"Bearer {token}"}
        # No token, a wrong token, the wrong scheme: 401 before anything else is looked at.
        for headers in (POST_HEADERS, {**POST_HEADERS, "authorization": "Bearer wrong"}, {"authorization": token}):
            refused = http.post(url, json=LIST_TOOLS, headers=headers)
            assert refused.status_code == 401, refused.text
            assert refused.headers["www-authenticate"].startswith("Bearer")
        # DNS rebinding: a page on another name that resolves to 127.0.0.1 is refused, token or not.
        rebound = http.post(url, json=LIST_TOOLS, headers={**authorized, "host": "evil.example"})
        assert rebound.status_code == 421
        foreign_origin = http.post(url, json=LIST_TOOLS, headers={**authorized, "origin": "http://evil.example"})
        assert foreign_origin.status_code == 403
        # Bodies over the limit, declared or streamed: 413 that states the limit and the way out.
        big = json.dumps({**LIST_TOOLS, "params": {"pad": "x" * 60_000}}).encode()
        for body in (big, (big[i : i + 8192] for i in range(0, len(big), 8192))):
            too_large = http.post(url, content=body, headers=authorized)  # type: ignore[arg-type]
            assert too_large.status_code == 413
            assert "0.05 MB" in too_large.text and "PHI3V_MCP_MAX_BODY_MB" in too_large.text
            assert "handles" in too_large.text

        with anyio.fail_after(120):
            async with http_client(url, token) as client:
                listed = await client.list_tools()
                result = await client.call_tool(
                    "describe_image", {"image": str(sample_images["chart"]), "detail": "brief"}
                )
            with pytest.raises(Exception):  # noqa: B017 - the transport's error type is not part of the claim
                async with http_client(url, "wrong") as client:
                    await client.list_tools()
    assert {tool.name for tool in listed.tools} == set(TOOLS)
    assert not result.is_error, text_of(result)
    ImageDescription.model_validate(result.structured_content)


@pytest.mark.slow
async def test_http_without_a_token_serves_loopback_clients(
    settings: Settings, tiny_toolbox: Toolbox, sample_images: dict[str, Path]
) -> None:
    with http_server(settings, tiny_toolbox) as url, anyio.fail_after(120):
        async with http_client(url, None) as client:
            result = await client.call_tool(
                "ask_images",
                {"images": [str(sample_images["chart"])], "question": "How many bars?", "output_schema": COUNT_SCHEMA},
            )
    assert not result.is_error, text_of(result)
    Answer.model_validate(result.structured_content)


@pytest.mark.slow
async def test_http_cancelling_a_call_aborts_the_request_and_the_server_stops_generation(
    settings: Settings, tiny_toolbox: Toolbox, tiny_runner: Runner, sample_images: dict[str, Path]
) -> None:
    with http_server(settings, tiny_toolbox) as url, anyio.fail_after(120):
        async with http_client(url, None) as client:
            result = await _cancel_a_long_call_then_call_again(
                client, decode_steps(tiny_toolbox, tiny_runner), str(sample_images["chart"])
            )
    assert not result.is_error, text_of(result)


# ---------------------------------------------------------------------------------------------------------------------
# LangChain


@pytest.mark.filterwarnings("ignore::langchain_core._api.beta_decorator.LangChainBetaWarning")
async def test_langchain_mcp_adapter_loads_the_tools_and_invokes_one(
    settings: Settings, tiny_toolbox: Toolbox, sample_images: dict[str, Path]
) -> None:
    pytest.importorskip("fastmcp", reason="langchain.mcp needs fastmcp: pip install 'langchain[mcp]'")
    from langchain.mcp import MCPAdapter
    from langchain_core.messages import ToolMessage

    async with MCPAdapter(create_server(settings, tiny_toolbox)) as adapter:
        tools = {tool.name: tool for tool in await adapter.list_tools()}
        assert set(tools) == set(TOOLS)
        assert tools["describe_image"].metadata is not None
        assert tools["describe_image"].metadata["mcp"]["tool"]["annotations"]["read_only_hint"] is True
        message = await tools["describe_image"].ainvoke(
            {
                "type": "tool_call",
                "id": "call-1",
                "name": "describe_image",
                "args": {"image": str(sample_images["chart"]), "detail": "brief"},
            }
        )
    assert isinstance(message, ToolMessage)
    assert message.status != "error", message.content
    description = ImageDescription.model_validate(message.artifact["structured_content"])
    blocks = message.content if isinstance(message.content, list) else [{"type": "text", "text": message.content}]
    text = "".join(b["text"] for b in blocks if isinstance(b, dict) and b.get("type") == "text")
    assert text.startswith(description.to_text())


# ---------------------------------------------------------------------------------------------------------------------
# The example


@pytest.mark.slow
def test_the_mcp_client_example_runs_against_the_stdio_server(tiny_dir: Path) -> None:
    env = {**os.environ, "PHI3V_MODEL": str(tiny_dir), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "mcp_client.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert ", ".join(TOOLS) in done.stdout  # the five tools, in the table's order
    assert "image features reused from the cache: 1" in done.stdout


# ---------------------------------------------------------------------------------------------------------------------
# Client configurations


@pytest.mark.parametrize(
    ("name", "key"),
    [("claude_desktop.json", "mcpServers"), ("cursor_mcp.json", "mcpServers"), ("vscode_mcp.json", "servers")],
)
def test_the_client_configs_start_phi3v_tools_mcp_with_a_model_and_allowed_dirs(name: str, key: str) -> None:
    text = (REPO / "servers" / "configs" / name).read_text()
    config = json.loads(text)
    entry = config[key]["phi3v-tools"]
    assert (entry["command"], entry["args"]) == ("phi3v-tools", ["mcp"])
    assert {"PHI3V_MODEL", "PHI3V_ALLOWED_DIRS"} <= set(entry["env"])
    assert entry.get("type", "stdio") == "stdio"
    readme = (REPO / "servers" / "README.md").read_text()
    assert text.strip() in readme  # the README shows the same file


def test_http_connections_send_small_writes_at_once() -> None:
    """TCP_NODELAY on the listening socket reaches accepted connections (without it: ~44 ms per request)."""
    listener = listening_socket("127.0.0.1", 0)
    listener.listen(1)
    client = socket.create_connection(listener.getsockname(), timeout=5)
    accepted, _ = listener.accept()
    try:
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        for sock in (accepted, client, listener):
            sock.close()


def test_the_server_process_logs_plainly_to_stderr_and_keeps_library_chatter_out() -> None:
    """The SDK would put a rich handler at INFO on the root logger (~4 ms per record); the server's own
    set-up comes first, so there is one plain stderr handler at WARNING and phi3v's loggers at INFO."""
    script = (
        "import logging\n"
        "from phi3v_mcp.server import configure_logging, create_server\n"
        "from phi3v_tools.settings import Settings\n"
        "configure_logging()\n"
        "create_server(Settings(model='tiny'))\n"
        "root = logging.getLogger()\n"
        "print([type(h).__name__ for h in root.handlers], root.level, logging.getLogger('phi3v_mcp').level)\n"
        "logging.getLogger('httpx').info('not shown')\n"
        "logging.getLogger('phi3v_mcp').info('shown')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.split() == ["['StreamHandler']", str(logging.WARNING), str(logging.INFO)]
    assert "shown" in done.stderr and "not shown" not in done.stderr


# ---------------------------------------------------------------------------------------------------------------------
# PDF documents


async def test_a_pdf_goes_through_mcp_with_per_page_results_handles_and_page_progress(
    settings: Settings, local_tiny_toolbox: Toolbox, demo_pdf: Path
) -> None:
    pytest.importorskip("pypdfium2")
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    async with Client(create_server(settings, local_tiny_toolbox)) as client:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        assert all("pages" in tool.input_schema["properties"] for tool in tools.values())
        result = await client.call_tool("read_text", {"image": str(demo_pdf)}, progress_callback=on_progress)
        assert not result.is_error, text_of(result)
        reading = TextReading.model_validate(result.structured_content)
        assert reading.pages is not None and [(p.page, p.source) for p in reading.pages] == [
            (1, "text"),
            (2, "text"),
            (3, "ocr"),
        ]
        assert reading.pages[0].text.startswith("Invoice INV-2041")
        assert "--- page 2 (text layer) ---\nQuarterly sales by region" in text_of(result)
        # The last page's handle asks about that page alone.
        again = await client.call_tool("describe_image", {"image": reading.pages[2].handle, "detail": "brief"})
        assert not again.is_error, text_of(again)
        assert again.structured_content is not None
        assert again.structured_content["images"][0]["handle"] == reading.pages[2].handle
        page = await client.call_tool("read_text", {"image": str(demo_pdf), "pages": "2"})
        assert [p["page"] for p in (page.structured_content or {})["pages"]] == [2]
    assert seen[0][:2] == (2, 3) and seen[-1] == (3, 3, "3 of 3 pages read")  # two text pages at once, then the scan
    assert all(total == 3 for _, total, _ in seen)


async def test_a_hostile_pdf_is_an_error_result_while_the_call_beside_it_succeeds_and_the_server_serves_on(
    settings: Settings, local_tiny_toolbox: Toolbox, sample_images: dict[str, Path], tmp_path: Path
) -> None:
    pytest.importorskip("pypdfium2")
    from tests.hostile_pdfs import garbage

    folder = sample_images["chart"].parent
    truncated = folder / "truncated.pdf"  # a PDF header, then noise
    truncated.write_bytes(garbage())
    async with Client(create_server(settings, local_tiny_toolbox)) as client:
        async with anyio.create_task_group() as group:
            results: dict[str, CallToolResult] = {}

            async def call(name: str, tool: str, args: dict[str, Any]) -> None:
                results[name] = await client.call_tool(tool, args)

            group.start_soon(call, "hostile", "read_text", {"image": str(truncated)})
            group.start_soon(
                call, "innocent", "describe_image", {"image": str(sample_images["chart"]), "detail": "brief"}
            )
        assert results["hostile"].is_error and "truncated.pdf" in text_of(results["hostile"])
        assert "Traceback" not in text_of(results["hostile"])
        assert not results["innocent"].is_error, text_of(results["innocent"])
        after = await client.call_tool("describe_image", {"image": str(sample_images["chart"]), "detail": "brief"})
        assert not after.is_error, text_of(after)
