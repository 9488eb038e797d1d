"""What the README promises a newcomer: a two-command quick start, install lines that can work off PyPI, and a
Makefile that installs the PyTorch it says it installs, again when the choice changes."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", REPO / "servers" / "README.md", REPO / "SECURITY.md", REPO / "benchmarks" / "README.md"]


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.DOTALL)


def test_the_quick_start_is_exactly_two_commands_in_one_block() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    (block,) = _code_blocks(section)
    commands = [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert [c.split("#")[0].strip() for c in commands] == ["make demo", "make test"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_no_install_line_asks_pypi_for_the_package(doc: Path) -> None:
    # The package is not on PyPI: `pip install 'phi3v-tools[mcp]'` fails everywhere. A clone (-e .) or a git URL
    # (phi3v-tools[...] @ git+...) works.
    for block in _code_blocks(doc.read_text(encoding="utf-8")):
        for line in block.splitlines():
            if "pip install" in line and "phi3v-tools" in line.split("#")[0]:
                assert "@ git+" in line, line
    assert not re.search(r"pip install '?phi3v-tools\[[a-z,]+\]'?`", doc.read_text(encoding="utf-8"))


def test_the_python_sources_never_hint_a_pypi_install_of_the_package() -> None:
    for path in [*REPO.glob("phi3v_tools/**/*.py"), *REPO.glob("servers/**/*.py"), *REPO.glob("benchmarks/*.py")]:
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"pip install '?phi3v-tools\[", text), path


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_a_new_torch_choice_reinstalls_torch_in_the_existing_venv_without_make_clean() -> None:
    def plan(*variables: str) -> str:
        done = subprocess.run(
            ["make", "-n", "-C", str(REPO), *variables, ".venv/bin/phi3v-tools"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    changed = plan("TORCH_SPEC=torch==2.99.0")
    assert 'pip install --quiet "torch==2.99.0"' in changed  # a dry run: nothing is installed
    assert "pip uninstall --quiet --yes torch" in changed  # the other build goes first
    assert "installing torch==2.99.0 from your pip index" in changed  # the one line that says what it installs
    assert "TORCH_SPEC ?= %s" in changed and "torch.mk" in changed  # remembered: a plain make keeps the choice
    cpu = plan("TORCH_INDEX=https://download.pytorch.org/whl/cpu")
    assert '--index-url "https://download.pytorch.org/whl/cpu"' in cpu
    assert "from https://download.pytorch.org/whl/cpu" in cpu
