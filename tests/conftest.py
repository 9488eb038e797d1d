"""Shared fixtures: the package's own tiny checkpoint (always available) and the shared reference data
(``../shared/phi3v-reference``, skipped with a reason when absent)."""

from __future__ import annotations

import os
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


@pytest.fixture
def fake() -> FakeBackend:
    """A backend that answers at once with the smallest schema-valid value (or its queued ``answers``)."""
    return FakeBackend()


@pytest.fixture
def toolbox(fake: FakeBackend, sample_images: dict[str, Path]) -> Toolbox:
    """The tools over ``fake``; local paths are allowed under the sample images' folder."""
    return Toolbox(fake, ImagePolicy(allowed_dirs=(sample_images["chart"].parent,)))


@pytest.fixture(scope="session")
def tiny_toolbox(tiny_runner: Runner, sample_images: dict[str, Path]) -> Toolbox:
    """The tools over the tiny runner; local paths are allowed under the sample images' folder."""
    return Toolbox(tiny_runner, ImagePolicy(allowed_dirs=(sample_images["chart"].parent,)))


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
