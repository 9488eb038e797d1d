"""A tools-only install (``pip install '.[remote,mcp]'``: no torch, transformers or llguidance) runs every tool
against a model server, and a local-model path in it says in one line what to install.

The processes here run under ``tests/without_local.py``, which makes the 'local' extra's packages impossible
to import, so they behave as in a venv that lacks them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from phi3v_tools.errors import LOCAL_PACKAGES
from phi3v_tools.runner import Runner
from tests.openai_server import MODEL, Served

pytest.importorskip("openai", reason="the remote backend's client: pip install -e '.[remote]'")

WITHOUT_LOCAL = str(Path(__file__).with_name("without_local.py"))
HEAVY = ("torch", "transformers", "llguidance", "tokenizers", "safetensors", "huggingface_hub")


@pytest.fixture(scope="module")
def served(tiny_runner: Runner) -> Iterator[Served]:
    with Served(tiny_runner) as running:
        yield running


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHI3V_")}
    env.update(extra)
    return env


def _without_local(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, WITHOUT_LOCAL, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, env=env, cwd=cwd)


def test_the_core_requirements_name_none_of_the_local_packages_and_the_local_extra_names_them_all() -> None:
    requires = [Requirement(r) for r in metadata.requires("phi3v-tools") or []]
    core = {r.name.lower().replace("_", "-") for r in requires if r.marker is None}
    local = {r.name.lower().replace("_", "-") for r in requires if r.marker and r.marker.evaluate({"extra": "local"})}
    heavy = {package.replace("_", "-") for _, package in LOCAL_PACKAGES}
    assert heavy <= local and not core & heavy, (core, local)
    assert "openai" not in core and "mcp" not in core  # the surfaces are extras too


TOOLS_WITHOUT_LOCAL = """
import asyncio, json, sys
from phi3v_tools.tools import Toolbox
from phi3v_tools.api import remote_backend
from phi3v_tools.errors import OptionalDependencyError
from phi3v_tools.settings import Settings
for name in {heavy!r}:
    try:
        __import__(name)
    except ModuleNotFoundError:
        continue
    raise SystemExit(f"{{name}} could be imported")
settings = Settings.from_env()
tools = Toolbox(remote_backend(settings), settings.image_policy())
cover, a, b = sys.argv[1:4]
out = {{"fields": list(tools.read_text(cover, fields=["title", "author"]).fields)}}
out["described"] = bool(tools.describe_image(cover, detail="brief").description)
out["compared"] = bool(tools.compare_images([a, b]).summary)
schema = {{"type": "object", "properties": {{"count": {{"type": "integer"}}}}, "required": ["count"]}}
out["asked"] = sorted(tools.ask_images(a, "How many players?", schema).answer)

async def pattern_beside_innocent():
    pattern = {{"type": "object", "properties": {{"code": {{"type": "string", "pattern": "^[A-Z]{{3}}$"}}}}}}
    hostile = tools.aask_images(a, "Which code?", pattern)
    innocent = tools.aread_text(cover)
    return await asyncio.gather(hostile, innocent, return_exceptions=True)

refused, read = asyncio.run(pattern_beside_innocent())
out["pattern"] = [type(refused).__name__, str(refused)]
out["innocent"] = bool(read.text)
out["heavy"] = sorted(m for m in sys.modules if m.partition(".")[0] in {heavy!r})
print(json.dumps(out))
"""


def test_every_tool_runs_against_a_server_where_torch_transformers_and_llguidance_cannot_be_imported(
    served: Served, sample_images: dict[str, Path]
) -> None:
    cover, a, b = (str(sample_images[k]) for k in ("cover", "scene_a", "scene_b"))
    env = _env(PHI3V_BACKEND="openai", PHI3V_BASE_URL=served.url + "/v1", PHI3V_ALLOWED_DIRS=str(Path(a).parent))
    done = _without_local("-c", TOOLS_WITHOUT_LOCAL.format(heavy=HEAVY), cover, a, b, env=env, cwd=Path(a).parent)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["fields"] == ["title", "author"] and out["described"] and out["compared"] and out["asked"] == ["count"]
    kind, message = out["pattern"]  # checking a regex needs the linear-time engine, which is not installed
    assert kind == "OptionalDependencyError" and "pip install 'llguidance" in message and "pattern" in message
    assert out["innocent"] and out["heavy"] == []


@pytest.mark.parametrize(
    "command",
    [
        ["-m", "phi3v_tools.cli", "describe", "cover.png"],
        ["-m", "phi3v_tools.cli", "info"],
        ["-m", "phi3v_tools.cli", "demo"],
        ["-m", "phi3v_tools.cli", "serve", "--port", "0"],
        ["-m", "phi3v_mcp"],
    ],
    ids=["describe", "info", "demo", "serve", "python -m phi3v_mcp"],
)
def test_the_local_model_without_the_local_extra_is_one_line_saying_what_to_install(
    command: list[str], sample_images: dict[str, Path], tmp_path: Path
) -> None:
    env = _env(PHI3V_CACHE_DIR=str(tmp_path))
    done = _without_local(*command, env=env, cwd=sample_images["cover"].parent)
    assert done.returncode == 1, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "needs the 'torch' package" in lines[0] and "pip install 'torch>=" in lines[0]
    assert "'transformers" in lines[0] and "'llguidance" in lines[0] and "PHI3V_BACKEND=openai" in lines[0]


def test_the_cli_without_the_local_extra_reads_text_and_shows_info_over_a_server(
    served: Served, sample_images: dict[str, Path], tmp_path: Path
) -> None:
    env = _env(PHI3V_BACKEND="openai", PHI3V_BASE_URL=served.url + "/v1", PHI3V_CACHE_DIR=str(tmp_path))
    cwd = sample_images["cover"].parent
    read_text = ["-m", "phi3v_tools.cli", "read-text", "cover.png", "--fields", "title,author", "--json"]
    reading = _without_local(*read_text, env=env, cwd=cwd)
    assert reading.returncode == 0, reading.stderr
    assert list(json.loads(reading.stdout)["fields"]) == ["title", "author"]
    info = _without_local("-m", "phi3v_tools.cli", "info", "--json", env=env, cwd=cwd)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["models"] == [MODEL]
