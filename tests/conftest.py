"""Shared fixtures: the package's own tiny checkpoint (always available) and the shared reference data
(``../shared/phi3v-reference``, skipped with a reason when absent)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from phi3v_tools.images import ImagePolicy
from phi3v_tools.model import Phi3VForCausalLM, Phi3VProcessor, make_tiny_checkpoint
from phi3v_tools.runner import Runner
from phi3v_tools.settings import Settings
from phi3v_tools.tools import Toolbox
from tests.fakes import FakeBackend

REPO = Path(__file__).resolve().parent.parent
REFERENCE = Path(os.environ.get("PHI3V_REFERENCE_DIR", REPO.parent / "shared" / "phi3v-reference"))
needs_reference = pytest.mark.skipif(
    not (REFERENCE / "golden" / "expected.json").is_file(),
    reason=f"the shared reference data is not at {REFERENCE} (set PHI3V_REFERENCE_DIR to point at it)",
)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random checkpoint in the official layout, written by the package itself."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_model(tiny_dir: Path) -> Phi3VForCausalLM:
    return Phi3VForCausalLM.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def tiny_processor(tiny_dir: Path) -> Phi3VProcessor:
    return Phi3VProcessor.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def tiny_runner(tiny_model: Phi3VForCausalLM, tiny_processor: Phi3VProcessor, tiny_dir: Path) -> Iterator[Runner]:
    """A runner over the tiny model, shared by the tests that do not change its settings."""
    runner = Runner(tiny_model, tiny_processor, Settings(model=str(tiny_dir), batch_window_ms=20))
    yield runner
    runner.close()


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo pictures as files in one directory: chart.png, cover.png, scene_a.png, scene_b.png, table.png."""
    from phi3v_tools.demo import book_cover, revenue_chart, sales_table, scene

    folder = tmp_path_factory.mktemp("images")
    paths = {
        "chart": folder / "chart.png",
        "cover": folder / "cover.png",
        "scene_a": folder / "scene_a.png",
        "scene_b": folder / "scene_b.png",
        "table": folder / "table.png",
    }
    revenue_chart().save(paths["chart"])
    book_cover().save(paths["cover"])
    scene(False).save(paths["scene_a"])
    scene(True).save(paths["scene_b"])
    sales_table().save(paths["table"])
    return paths


@pytest.fixture(scope="session")
def demo_pdf(sample_images: dict[str, Path]) -> Path:
    """The demo document (an invoice and a table with text layers, a scan with a hidden OCR layer), as demo.pdf in
    the sample images' folder."""
    from phi3v_tools.pdf_samples import demo_document

    path = sample_images["chart"].parent / "demo.pdf"
    path.write_bytes(demo_document())
    return path


@pytest.fixture
def fake() -> FakeBackend:
    """A backend that answers at once with the smallest schema-valid value (or its queued ``answers``)."""
    return FakeBackend()


@pytest.fixture
def toolbox(fake: FakeBackend, sample_images: dict[str, Path]) -> Toolbox:
    """The tools over ``fake``; local paths are allowed under the sample images' folder."""
    return Toolbox(fake, ImagePolicy(allowed_dirs=(sample_images["chart"].parent,)))


@pytest.fixture(scope="session")
def local_tiny_toolbox(tiny_runner: Runner, sample_images: dict[str, Path]) -> Toolbox:
    """The tools over the tiny runner in this process; local paths are allowed under the sample images' folder.
    For tests of what only an in-process engine has (its feature cache, its queue)."""
    return Toolbox(tiny_runner, ImagePolicy(allowed_dirs=(sample_images["chart"].parent,)))


@pytest.fixture(scope="session")
def tiny_server(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``phi3v-tools serve`` on the tiny model, in a subprocess on a free loopback port; yields its base URL."""
    pytest.importorskip("openai", reason="the remote backend's client: pip install -e '.[remote]'")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHI3V_")}
    env.update(
        PHI3V_MODEL=str(tiny_dir), PHI3V_BATCH_WINDOW_MS="20", PHI3V_SERVED_MODEL_NAME="tiny", OMP_NUM_THREADS="1"
    )
    log = tmp_path_factory.mktemp("tiny-server") / "serve.log"
    with open(log, "w") as out:
        command = [sys.executable, "-m", "phi3v_tools.cli", "serve", "--port", str(port)]
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"phi3v-tools serve exited: {log.read_text()}"
            assert time.monotonic() < deadline, f"phi3v-tools serve did not get healthy: {log.read_text()}"
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="session", params=["local", "remote"])
def tiny_toolbox(request: pytest.FixtureRequest, sample_images: dict[str, Path]) -> Toolbox:
    """The tools over the tiny model, once in this process and once through the remote backend against
    ``phi3v-tools serve`` (a subprocess): the tests that take it run on both backends."""
    if request.param == "local":
        toolbox: Toolbox = request.getfixturevalue("local_tiny_toolbox")
        return toolbox
    from phi3v_tools.backends.openai import OpenAIBackend

    backend = OpenAIBackend(request.getfixturevalue("tiny_server") + "/v1")
    return Toolbox(backend, ImagePolicy(allowed_dirs=(sample_images["chart"].parent,)))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not (REFERENCE / "golden" / "expected.json").is_file():
        pytest.skip(f"the shared reference data is not at {REFERENCE}")
    return REFERENCE


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module (then the previous count): the tiny model is no faster on more, and on a
    shared machine idle-spinning OpenMP threads make it many times slower. Subprocesses get OMP_NUM_THREADS=1.
    Use it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Heavy variants run only when asked for: ``pytest -m heavy``."""
    if "heavy" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="a heavy variant: run it with `pytest -m heavy`")
    for item in items:
        if "heavy" in item.keywords:
            item.add_marker(skip)
