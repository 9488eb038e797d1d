"""The same tool call through each surface (Python API, LangChain tool, MCP in memory, MCP over HTTP), and a
process-wide watch on file opens and outgoing connections (Python audit hooks, PEP 578).

Every surface answers with an :class:`Outcome`: the error message the caller (a program, an agent's model)
sees, or the structured result. Anything else, an exception escaping the surface, fails the test.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from mcp import Client
from mcp.types import TextContent
from phi3v_mcp.server import create_server

from phi3v_tools.errors import Phi3VToolsError
from phi3v_tools.langchain import Phi3VisionToolkit
from phi3v_tools.settings import Settings
from phi3v_tools.tools import Toolbox
from tests.mcp_http import http_client


@dataclass
class Outcome:
    error: str | None = None
    result: dict[str, Any] | None = None


class PythonSurface:
    name = "python"

    def __init__(self, toolbox: Toolbox) -> None:
        self.toolbox = toolbox

    def call(self, tool: str, args: dict[str, Any]) -> Outcome:
        try:
            result = getattr(self.toolbox, tool)(**args)
        except Phi3VToolsError as exc:
            return Outcome(error=str(exc))
        return Outcome(result=result.model_dump(mode="json"))


class LangChainSurface:
    name = "langchain"

    def __init__(self, toolbox: Toolbox) -> None:
        self.tools = {tool.name: tool for tool in Phi3VisionToolkit(toolbox).get_tools()}

    def call(self, tool: str, args: dict[str, Any]) -> Outcome:
        # A tool call as an agent's model writes it; the answer is the ToolMessage the model reads next.
        message = self.tools[tool].invoke({"type": "tool_call", "id": "call-1", "name": tool, "args": args})
        if message.status == "error":
            return Outcome(error=str(message.content))
        return Outcome(result=message.artifact.model_dump(mode="json"))


def _mcp_outcome(result: Any) -> Outcome:
    text = "\n".join(block.text for block in result.content if isinstance(block, TextContent))
    if result.is_error:
        return Outcome(error=text)
    return Outcome(result=result.structured_content)


class McpMemorySurface:
    name = "mcp_memory"

    def __init__(self, settings: Settings, toolbox: Toolbox) -> None:
        self.server = create_server(settings, toolbox)

    def call(self, tool: str, args: dict[str, Any]) -> Outcome:
        async def go() -> Outcome:
            async with Client(self.server) as client:
                return _mcp_outcome(await client.call_tool(tool, args))

        return anyio.run(go)


class McpHttpSurface:
    name = "mcp_http"

    def __init__(self, url: str) -> None:
        self.url = url

    def call(self, tool: str, args: dict[str, Any]) -> Outcome:
        async def go() -> Outcome:
            async with http_client(self.url, None) as client:
                return _mcp_outcome(await client.call_tool(tool, args))

        return anyio.run(go)


# ---------------------------------------------------------------------------------------------------------------------
# What the process touches


@dataclass
class Watch:
    """Files opened and addresses connected to (by any thread) while active."""

    active: bool = False
    opened: list[str] = field(default_factory=list)
    connected: list[Any] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


WATCH = Watch()


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if not WATCH.active:
        return
    if event == "open" and isinstance(args[0], str | bytes):
        with WATCH.lock:
            WATCH.opened.append(os.fsdecode(args[0]))
    elif event == "socket.connect":
        with WATCH.lock:
            WATCH.connected.append(args[1])


_installed = False


@contextmanager
def watching() -> Iterator[Watch]:
    """Record file opens and connections until the block ends (audit hooks cannot be removed: one, switched)."""
    global _installed
    if not _installed:
        sys.addaudithook(_hook)
        _installed = True
    with WATCH.lock:
        WATCH.opened.clear()
        WATCH.connected.clear()
    WATCH.active = True
    try:
        yield WATCH
    finally:
        WATCH.active = False
