"""An MCP client session against the phi3v-tools server, over stdio.

It starts the server as a subprocess (``python -m phi3v_mcp``), lists its tools, describes a book cover
(drawn by ``phi3v_tools.demo`` into a temporary folder that the server is allowed to read), then reads the
cover's title and author by the image handle the first call returned: nothing is sent twice, and the image's
features come from the server's cache.

    python examples/mcp_client.py                      # the tiny random test model (random words, offline)
    PHI3V_MODEL=microsoft/Phi-3-vision-128k-instruct python examples/mcp_client.py

With the tiny model the answers are random words: the point is that the whole path runs.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path

from mcp import Client, StdioServerParameters
from mcp.types import CallToolResult, TextContent

from phi3v_tools.demo import book_cover


def text_of(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, TextContent))


async def main() -> int:
    model = os.environ.get("PHI3V_MODEL") or "tiny"
    with tempfile.TemporaryDirectory(prefix="phi3v-mcp-example-") as folder:
        cover = Path(folder) / "cover.png"
        book_cover().save(cover)
        server = StdioServerParameters(
            command=sys.executable,
            args=["-m", "phi3v_mcp", "--transport", "stdio"],
            # The caller's PHI3V_* / HF_* / OMP_* settings pass through (a stdio server otherwise gets only a few
            # safe variables); then only this folder may be read, and no URLs are fetched.
            env={
                **{k: v for k, v in os.environ.items() if k.startswith(("PHI3V_", "HF_", "OMP_"))},
                "PHI3V_MODEL": model,
                "PHI3V_ALLOWED_DIRS": folder,
                "PHI3V_ALLOW_URLS": "false",
            },
        )
        async with Client(server, read_timeout_seconds=600) as client:
            listed = await client.list_tools()
            print(f"server {client.server_info.name if client.server_info else '?'}: tools", end=" ")
            print(", ".join(tool.name for tool in listed.tools))

            async def on_progress(progress: float, total: float | None, message: str | None) -> None:
                print(f"  ... {message or progress}", file=sys.stderr)

            described = await client.call_tool(
                "describe_image", {"image": str(cover), "detail": "brief"}, progress_callback=on_progress
            )
            if described.is_error or described.structured_content is None:
                print(f"describe_image failed: {text_of(described)}", file=sys.stderr)
                return 1
            handle = described.structured_content["images"][0]["handle"]
            print(f"\n## describe_image({cover.name})\n{text_of(described)}")

            reading = await client.call_tool("read_text", {"image": handle, "fields": ["title", "author"]})
            if reading.is_error or reading.structured_content is None:
                print(f"read_text failed: {text_of(reading)}", file=sys.stderr)
                return 1
            data = reading.structured_content
            print(f"\n## read_text({handle[:30]}..., fields=[title, author])")
            print(f"fields: {data['fields']}")
            print(f"image features reused from the cache: {data['call']['cached_images']}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
