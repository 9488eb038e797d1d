"""phi3v-tools: Phi-3-vision as tools for agents (LangChain, MCP, CLI, Python).

The model lives in :mod:`phi3v_tools.model`; it is imported on first use so that ``import phi3v_tools``
stays light.
"""

from importlib.metadata import PackageNotFoundError, version

from phi3v_tools.errors import Phi3VToolsError

try:
    __version__ = version("phi3v-tools")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without installing
    __version__ = "0.0.0"

__all__ = ["Phi3VToolsError", "__version__"]
