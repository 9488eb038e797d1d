"""How a phi3v-tools process ends on SIGINT (Ctrl-C) and SIGTERM (``kill``, a service manager, a container stop).

Both stop the process the same way: Python raises :class:`KeyboardInterrupt` in the main thread for SIGINT, and
:func:`terminate_as_interrupt` makes SIGTERM raise :class:`Terminated`, a ``KeyboardInterrupt``. Every path that
already stops cleanly on Ctrl-C (``asyncio.run`` cancelling its tasks, uvicorn's graceful shutdown, which
re-raises the signal it caught once it has drained, the CLI closing its models) therefore stops cleanly on
SIGTERM too, and the edge reports it: exit status 130 or 143 (128 + the signal, as a shell reports it) and one
line on stderr, never a traceback.

Torch-free: the CLI imports it before it knows whether a model will load.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

INTERRUPTED = 128 + signal.SIGINT  # 130
TERMINATED = 128 + signal.SIGTERM  # 143


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread where Ctrl-C would raise KeyboardInterrupt."""


def exit_status(stop: BaseException) -> int:
    """The exit status for a process stopped by ``stop``: 143 after SIGTERM, else 130."""
    return TERMINATED if isinstance(stop, Terminated) else INTERRUPTED


def ending_line(program: str, stop: BaseException) -> str:
    """The one line a stopped process writes on stderr."""
    return f"{program}: {'terminated' if isinstance(stop, Terminated) else 'interrupted'}"


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated` in the main thread (elsewhere: nothing changes, as only
    the main thread may set signal handlers). The previous handler is restored on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
