"""The tools side imports no torch: settings, request types, tools, images and the API stay light.

Each check imports one module in a fresh interpreter, so what this test process has imported already
(the conftest loads the model stack) cannot hide an import.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from phi3v_tools.settings import Settings

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers")

LIGHT_MODULES = [
    "phi3v_tools",
    "phi3v_tools.settings",
    "phi3v_tools.engine.types",
    "phi3v_tools.tools",
    "phi3v_tools.images",
    "phi3v_tools.api",
    "phi3v_tools.structured",
    "phi3v_tools.errors",
    "phi3v_tools.langchain",
    "phi3v_tools.model",
    "phi3v_tools.model.names",
    "phi3v_tools.model.chat_format",
    "phi3v_tools.model.pil",
    "phi3v_tools.digests",
    "phi3v_tools.signals",
    "phi3v_tools.serving.protocol",
    "phi3v_tools.serving.app",
    "phi3v_tools.backends.openai",
    "phi3v_tools.serving.server",
    "phi3v_tools.cli",
    "phi3v_mcp.__main__",
]


def _fresh(code: str) -> object:
    """Run ``code`` in a new interpreter; it prints one JSON value as its last line, returned here."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _heavy_after(statement: str) -> list[str]:
    code = f"import json, sys\n{statement}\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    loaded = _fresh(code)
    assert isinstance(loaded, list)
    return loaded


@pytest.mark.parametrize("module", LIGHT_MODULES)
def test_importing_a_tools_side_module_leaves_torch_and_transformers_unloaded(module: str) -> None:
    assert _heavy_after(f"import {module}") == []


def test_the_model_package_still_exports_its_names_and_loads_them_on_first_use() -> None:
    statement = (
        "from phi3v_tools.model import Phi3VForCausalLM, Phi3VProcessor, make_tiny_checkpoint\n"
        "assert Phi3VForCausalLM.__name__ == 'Phi3VForCausalLM' and Phi3VProcessor.__name__ == 'Phi3VProcessor'\n"
        "assert callable(make_tiny_checkpoint)"
    )
    assert _heavy_after(statement) == ["torch", "transformers"]


def test_every_name_the_model_package_lists_is_importable_from_it() -> None:
    import phi3v_tools.model as model

    for name in model.__all__:
        assert getattr(model, name) is not None, name
        assert name in dir(model)
    with pytest.raises(AttributeError, match="no_such_name"):
        model.no_such_name  # noqa: B018


def test_moved_names_are_still_importable_from_their_old_modules() -> None:
    from phi3v_tools import digests
    from phi3v_tools.engine import types
    from phi3v_tools.feature_cache import image_digest
    from phi3v_tools.model import chat_format, names, pil
    from phi3v_tools.model.checkpoint import DEFAULT_CACHE_DIR, DEFAULT_MODEL_ID, TINY_MODEL_ID
    from phi3v_tools.model.image_processing import to_rgb
    from phi3v_tools.model.processing import CHAT_ROLES, IMAGE_TAG, check_image_tags, check_text
    from phi3v_tools.tools import Backend

    assert image_digest is digests.image_digest and to_rgb is pil.to_rgb
    assert (IMAGE_TAG, CHAT_ROLES, check_text, check_image_tags) == (
        chat_format.IMAGE_TAG,
        chat_format.CHAT_ROLES,
        chat_format.check_text,
        chat_format.check_image_tags,
    )
    assert (DEFAULT_MODEL_ID, DEFAULT_CACHE_DIR, TINY_MODEL_ID) == (
        names.DEFAULT_MODEL_ID,
        names.DEFAULT_CACHE_DIR,
        names.TINY_MODEL_ID,
    )
    assert Backend is types.Backend


def test_model_config_ignores_what_only_the_tools_and_the_engine_limits_use() -> None:
    plain = Settings(model="tiny").model_config()
    assert plain == Settings(model="tiny", allowed_dirs=(Path("images"),), max_queue=3).model_config()
    assert plain != Settings(model="other").model_config()


def test_engine_limits_carry_over_the_queue_bound() -> None:
    assert Settings(model="tiny", max_queue=3).engine_limits().max_queue == 3
    assert Settings(model="tiny").engine_limits() == Settings(model="other").engine_limits()


CLI_WITHOUT_A_MODEL = [
    (["--version"], 0),
    (["--help"], 0),
    (["describe", "--help"], 0),
    (["mcp", "--help"], 0),
    (["describe"], 2),  # a usage error: no image
    (["describe", "x.png", "--detail", "huge"], 2),
    (["no-such-command"], 2),
]


@pytest.mark.parametrize(("args", "status"), CLI_WITHOUT_A_MODEL, ids=[" ".join(a) for a, _ in CLI_WITHOUT_A_MODEL])
def test_help_version_and_usage_errors_answer_without_importing_torch(args: list[str], status: int) -> None:
    # Importing torch and transformers is most of a command's start-up (about 4 s); these need neither.
    code = (
        "import json, sys\n"
        "from phi3v_tools.cli import main\n"
        "try:\n"
        f"    main({args!r}, prog_name='phi3v-tools')\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        f"print(json.dumps([code, [m for m in {HEAVY!r} if m in sys.modules]]))"
    )
    assert _fresh(code) == [status, []]


def test_the_mcp_module_answers_help_without_importing_torch() -> None:
    code = (
        "import json, sys\n"
        "from phi3v_mcp.__main__ import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        f"print(json.dumps([code, [m for m in {HEAVY!r} if m in sys.modules]]))"
    )
    assert _fresh(code) == [0, []]
