"""Streaming one request's text to an event loop: ``async for piece in engine.stream(request)``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Protocol

from phi3v_tools.engine.types import WATCHDOG_GRACE_S, GenerationRequest, GenerationResult, RequestHandle


class _Submits(Protocol):
    async def _submit_async(self, request: GenerationRequest) -> RequestHandle: ...


class TextStream:
    """Async iterator over the pieces of text of one request; ``result`` holds the full result at the end.

    Breaking out of the loop (or cancelling the consuming task) cancels the request. The caller waits at most
    until the request's deadline plus a short grace for each piece.
    """

    def __init__(self, engine: _Submits, request: GenerationRequest) -> None:
        self._engine = engine
        self._request = request
        self.result: GenerationResult | None = None

    async def __aiter__(self) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()
        listener = self._request.on_text

        def on_text(piece: str) -> None:
            if listener is not None:
                listener(piece)
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

        handle = await self._engine._submit_async(replace(self._request, on_text=on_text))
        handle.future.add_done_callback(lambda _f: loop.call_soon_threadsafe(pieces.put_nowait, None))
        try:
            while True:
                remaining = max(handle.deadline - time.perf_counter(), 0.0) + WATCHDOG_GRACE_S
                try:
                    piece = await asyncio.wait_for(pieces.get(), remaining)
                except asyncio.TimeoutError:
                    handle.cancel()
                    raise handle.timed_out() from None
                if piece is None:
                    break
                yield piece
            self.result = await handle.wait_async()
        finally:
            if not handle.future.done():
                handle.cancel()
