"""``OpenAIServer(backend).app()`` served by uvicorn on a free loopback port in a thread, for tests."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn

from phi3v_tools.images import ImagePolicy
from phi3v_tools.serving.app import OpenAIServer

MODEL = "tiny-test"


class Served:
    """``OpenAIServer(backend).app()`` (or any ``app``) on a free loopback port, in a thread, for the test's
    lifetime."""

    def __init__(self, backend: Any = None, policy: ImagePolicy | None = None, *, app: Any = None) -> None:
        if app is None:
            server = OpenAIServer(backend, policy or ImagePolicy(allowed_dirs=()), MODEL, max_context=4096)
            app = server.app()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
        self.uvicorn = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self) -> Served:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=10)

    def client(self) -> Any:
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)
