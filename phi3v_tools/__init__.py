"""phi3v-tools: Phi-3-vision as tools for agents (LangChain, MCP, CLI, Python).

``describe_image``, ``read_text``, ``read_table``, ``compare_images`` and ``ask_images``, and their async
forms ``adescribe_image`` ... ``aask_images``, are the Python API (see :mod:`phi3v_tools.api`); the model
lives in :mod:`phi3v_tools.model`. Both are imported on first use so that ``import phi3v_tools`` stays light.
"""

from importlib.metadata import PackageNotFoundError, version

from phi3v_tools.errors import Phi3VToolsError

try:
    __version__ = version("phi3v-tools")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without installing
    __version__ = "0.0.0"

__all__ = [
    "Phi3VToolsError",
    "__version__",
    "aask_images",
    "acompare_images",
    "adescribe_image",
    "aread_table",
    "aread_text",
    "ask_images",
    "compare_images",
    "describe_image",
    "read_table",
    "read_text",
]
_LAZY = set(__all__) - {"Phi3VToolsError", "__version__"}


def __getattr__(name: str) -> object:
    """The tool functions load the model stack on first use, so ``import phi3v_tools`` stays light."""
    if name in _LAZY:
        from phi3v_tools import api

        return getattr(api, name)
    raise AttributeError(f"module 'phi3v_tools' has no attribute {name!r}")
