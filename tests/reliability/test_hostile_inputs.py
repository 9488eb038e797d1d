"""Every hostile input of the corpus through every surface: a clear error naming the problem (or, for unusual
but valid pictures, a correct result), nothing outside the allowed directory opened, no connection to a refused
address, no request reaching the internal service, and the same surface serving a good call right after.

An innocent call runs beside every hostile one, on the same surface, and must succeed. A hostile call that
reaches the model (a valid but unusual schema, a question full of special tokens) shares one batch with the
innocent call: the runner's worker waits until both are queued before it collects a batch.

The model is the tiny checkpoint with answers capped at 16 tokens; all surfaces share one toolbox, so the
image handles of one surface are valid on the others (as they are for one server's clients).
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from PIL import Image

from phi3v_tools.model import Phi3VForCausalLM, Phi3VProcessor
from phi3v_tools.runner import Runner
from phi3v_tools.settings import Settings
from phi3v_tools.tools import Toolbox
from tests.hostile import serving
from tests.mcp_http import http_server
from tests.reliability.corpus import SURFACES, Case, HostileEnv, corpus, make_env
from tests.reliability.surfaces import (
    LangChainSurface,
    McpHttpSurface,
    McpMemorySurface,
    Outcome,
    PythonSurface,
    watching,
)

CASES = corpus()
PARAMS = [
    pytest.param(case, surface, id=f"{surface}-{case.id}", marks=[pytest.mark.slow] if case.slow else [])
    for surface in SURFACES
    for case in CASES
    if surface in case.surfaces
]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileEnv]:
    with serving("127.0.0.1") as web, serving("127.0.0.2") as internal:
        yield make_env(tmp_path_factory.mktemp("hostile"), web, internal)


class Gate:
    """While ``pair()`` is active, an idle engine waits (up to 5 s) until two requests are waiting before it admits
    them, and decoding waits until the second one's prompt is in too (so they share decode steps whatever their
    prompt lengths); the number of rows of every decode step is recorded."""

    def __init__(self, runner: Runner) -> None:
        self.batches: list[int] = []
        self._runner = runner
        self._limits = runner.limits
        self._active = False
        decode = runner._decode

        def recorded_decode() -> None:
            if self._active and runner._prefilling and len(runner._running) < 2:
                return  # the companion is still being prefilled: let it join first
            if runner._running:
                self.batches.append(len(runner._running))
            decode()

        runner._decode = recorded_decode  # type: ignore[method-assign]

    @contextmanager
    def pair(self, active: bool) -> Iterator[None]:
        if active:  # a long window that closes as soon as two requests wait
            self._runner.limits = replace(self._limits, batch_window_ms=5000, max_batch_size=2)
        self._active = active
        try:
            yield
        finally:
            self._active = False
            self._runner.limits = self._limits


@pytest.fixture(scope="module")
def surfaces(
    one_torch_thread: None,
    env: HostileEnv,
    tiny_model: Phi3VForCausalLM,
    tiny_processor: Phi3VProcessor,
    tiny_dir: Path,
) -> Iterator[dict[str, Any]]:
    settings = Settings(model=str(tiny_dir), max_new_tokens=16, batch_window_ms=1, allowed_dirs=(env.allowed,))
    runner = Runner(tiny_model, tiny_processor, settings)
    runner.grammars.warm_up()
    chat_ids = tiny_processor.chat_ids
    lock = threading.Lock()

    def spy(messages: Any, tokens: Any) -> list[int]:
        ids = chat_ids(messages, tokens)
        with lock:
            env.prompts.append(ids)
        return ids

    env.control_ids = frozenset(int(i) for i in tiny_processor.tokenizer.added_tokens_decoder)
    toolbox = Toolbox(runner, env.policy())
    tiny_processor.chat_ids = spy  # type: ignore[method-assign]
    try:
        with http_server(settings, toolbox) as url:
            yield {
                "python": PythonSurface(toolbox),
                "langchain": LangChainSurface(toolbox),
                "mcp_memory": McpMemorySurface(settings, toolbox),
                "mcp_http": McpHttpSurface(url),
                "url": url,
                "gate": Gate(runner),
            }
    finally:
        del tiny_processor.chat_ids  # the instance attribute: the method is back
        runner.close()


def _good_call(surface: Any, env: HostileEnv) -> None:
    outcome = surface.call("describe_image", {"image": str(env.good), "detail": "brief"})
    assert outcome.error is None, f"a good call failed after the hostile one: {outcome.error}"
    assert outcome.result is not None and outcome.result["images"][0]["width"] == 48


def _assert_clear(message: str, case: Case) -> None:
    assert case.error is not None
    assert re.search(case.error, message, re.IGNORECASE | re.DOTALL), f"{message!r} does not match {case.error!r}"
    assert "Traceback" not in message and 'File "' not in message, message
    assert len(message) < 2000, f"the message is {len(message)} characters long"
    message.encode("utf-8")  # sendable as JSON text


@pytest.mark.parametrize(("case", "surface_name"), PARAMS)
def test_a_hostile_input_gets_a_clear_answer_touches_nothing_forbidden_and_the_surface_keeps_serving(
    case: Case, surface_name: str, env: HostileEnv, surfaces: dict[str, Any]
) -> None:
    surface = surfaces[surface_name]
    gate: Gate = surfaces["gate"]
    args = case.args(env)
    if case.id == "handle-from-an-earlier-call":
        _good_call(surface, env)  # the earlier call
    web_before = len(env.web.requests)
    env.prompts.clear()
    gate.batches.clear()
    with gate.pair(case.engine), watching() as watch, ThreadPoolExecutor(2) as pool:
        innocent = pool.submit(surface.call, "describe_image", {"image": str(env.good), "detail": "brief"})
        hostile = pool.submit(surface.call, case.tool, args)
        outcome: Outcome = hostile.result(120)
        beside: Outcome = innocent.result(120)

    assert beside.error is None, f"the innocent call beside the hostile one failed: {beside.error}"
    assert beside.result is not None and beside.result["images"][0]["width"] == 48
    if case.engine:
        assert max(gate.batches, default=0) >= 2, f"the two calls did not share a batch: {gate.batches}"
    if case.error is None:
        assert outcome.error is None, f"a valid input was refused: {outcome.error}"
    elif case.check is None:
        assert outcome.error is not None, f"a hostile input was accepted: {outcome.result}"
    if outcome.error is not None:
        _assert_clear(outcome.error, case)
    else:
        assert outcome.result is not None and case.check is not None
        case.check(outcome.result, env)
    if case.after is not None:
        case.after(env)

    forbidden = {os.path.realpath(p) for p in env.forbidden_files}
    opened = {os.path.realpath(p) for p in watch.opened if not p.startswith(("/usr", str(Path.home() / ".cache")))}
    assert not opened & forbidden, f"forbidden files were opened: {opened & forbidden}"
    allowed_peers = {("127.0.0.1", env.web.port), ("127.0.0.1", urlsplit(surfaces["url"]).port)}
    strays = [peer for peer in watch.connected if _peer(peer) not in allowed_peers]
    assert not strays, f"connections to refused addresses: {strays}"
    assert env.internal.requests == [], "the internal service was contacted"
    if case.error is not None:
        reached = [path for path, _host in env.web.requests[web_before:] if path == "/ok.png"]
        assert not reached, "a refused URL was fetched through the trusted server"

    _good_call(surface, env)


def _peer(address: Any) -> tuple[str, int] | None:
    if isinstance(address, tuple) and len(address) >= 2:
        return (str(address[0]), int(address[1]))
    return None


def test_the_corpus_covers_every_surface_and_kind_of_input() -> None:
    per_surface = {surface: sum(surface in case.surfaces for case in CASES) for surface in SURFACES}
    assert min(per_surface.values()) >= 130, per_surface
    assert sum(case.error is None for case in CASES) >= 10  # unusual but valid pictures must keep working
    per_group = {group: sum(case.group == group for case in CASES) for group in {case.group for case in CASES}}
    assert set(per_group) == {"files", "bytes", "urls", "arguments", "schemas", "chat", "documents"}, per_group
    assert per_group["documents"] >= 14  # PDF bombs, broken, active, encrypted and oversized documents
    assert sum(case.engine for case in CASES) >= 8  # hostile calls that share a batch with an innocent one


@pytest.mark.parametrize("surface_name", ["python", "mcp_http"])
def test_a_20_mb_schema_is_refused_before_any_tokenizing_and_does_not_delay_a_call_beside_it(
    surface_name: str, env: HostileEnv, surfaces: dict[str, Any]
) -> None:
    """The review's case: a 20 MB description inside a schema, under the HTTP body limit, used to be tokenized into
    the prompt on the worker (22 s, ~2 GB) while every other call waited."""
    surface = surfaces[surface_name]
    schema = {"type": "object", "properties": {"a": {"type": "string", "description": "x" * 20 * 2**20}}}
    prompts = len(env.prompts)
    with ThreadPoolExecutor(2) as pool:
        started = time.perf_counter()
        hostile = pool.submit(
            surface.call, "ask_images", {"images": [str(env.good)], "question": "q", "output_schema": schema}
        )
        innocent = pool.submit(surface.call, "describe_image", {"image": str(env.good), "detail": "brief"})
        beside = innocent.result(60)
        waited = time.perf_counter() - started
        outcome = hostile.result(60)
    assert outcome.error is not None and re.search(r"20971520 characters .* the limit is 2000", outcome.error)
    assert beside.error is None, beside.error
    assert waited < 10, f"the innocent call took {waited:.1f} s beside the 20 MB schema"
    assert len(env.prompts) - prompts == 1  # only the innocent call's prompt was ever tokenized


@pytest.mark.parametrize("surface_name", ["python", "mcp_http"])
def test_messages_for_present_and_absent_files_outside_the_allowed_directory_are_the_same(
    surface_name: str, env: HostileEnv, surfaces: dict[str, Any]
) -> None:
    """No existence oracle: whatever is (or is not) at a path outside the allowed directory, or in another user's
    home, the answer reads the same once the name itself is taken out of it."""
    surface = surfaces[surface_name]
    based = env.secret / ("Q" * 200) / ("Q" * 100)  # a long base64-looking path: it must not be looked up either
    based.parent.mkdir(exist_ok=True)
    based.write_bytes(b"x")
    pairs = [
        (str(env.secret / "secret.png"), str(env.secret / "absent.png")),
        (str(based), str(based.parent / ("R" * 100))),
        ("~root/.profile", "~nosuchuser42/.profile"),
    ]
    for present, absent in pairs:
        answers = []
        for path in (present, absent):
            outcome = surface.call("describe_image", {"image": path, "detail": "brief"})
            assert outcome.error is not None, outcome.result
            shown = outcome.error.replace(path, "<path>").replace(path[:100], "<path>")
            answers.append(shown.replace(path.split("/")[0], "<user>") if path.startswith("~") else shown)
        assert answers[0] == answers[1], answers
        assert re.search(r"outside the allowed directories|other users' home|base64 data is not", answers[0]), answers


@pytest.mark.parametrize("surface_name", ["python", "mcp_http"])
def test_a_file_swapped_for_a_link_to_a_secret_never_yields_the_secrets_pixels(
    surface_name: str, env: HostileEnv, surfaces: dict[str, Any]
) -> None:
    """The check-then-open race, through a surface: a thread swaps a picture in the allowed directory for a symlink
    to a file outside, as fast as it can, while calls read it. Every answer is the picture or a clear error."""
    surface = surfaces[surface_name]
    picture = env.allowed / "swap-source.png"
    target = env.allowed / "swap.png"
    Image.new("RGB", (40, 30), (9, 9, 9)).save(picture)  # the secret is 16x12
    stop = threading.Event()

    def swap() -> None:
        link, copy = env.allowed / "swap.link", env.allowed / "swap.copy"
        while not stop.is_set():
            link.unlink(missing_ok=True)
            link.symlink_to(env.secret / "secret.png")
            os.replace(link, target)
            copy.write_bytes(picture.read_bytes())
            os.replace(copy, target)

    swapper = threading.Thread(target=swap, daemon=True)
    swapper.start()
    sizes, errors = set(), set()
    try:
        for _ in range(40 if surface_name == "mcp_http" else 200):
            outcome = surface.call("describe_image", {"image": str(target), "detail": "brief"})
            if outcome.result is not None:
                info = outcome.result["images"][0]
                sizes.add((info["width"], info["height"]))
            else:
                assert outcome.error is not None
                errors.add(re.sub(r"'[^']*'", "'…'", outcome.error)[:80])
    finally:
        stop.set()
        swapper.join(5)
    assert sizes <= {(40, 30)}, f"the secret's pixels came back: {sizes}"
    assert all("symbolic link" in e or "not a readable image" in e or "no image file" in e for e in errors), errors
