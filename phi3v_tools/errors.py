"""The one error hierarchy of phi3v-tools.

Every expected failure raises a subclass of :class:`Phi3VToolsError` with a message a person or a model
can act on: what was wrong, and what is allowed instead. Adapters (MCP, LangChain, CLI) turn these into
their own error results; anything else is a bug.
"""

from __future__ import annotations

__all__ = [
    "BusyError",
    "CancelledError",
    "CheckpointError",
    "DeviceError",
    "ImageError",
    "ModelNotFoundError",
    "OptionalDependencyError",
    "Phi3VToolsError",
    "PromptError",
    "GenerationError",
    "OutOfMemoryError",
    "RequestTimeoutError",
]


class Phi3VToolsError(Exception):
    """Base class of every error phi3v-tools raises on purpose."""


class ModelNotFoundError(Phi3VToolsError):
    """The model id or path could not be resolved to a checkpoint directory."""


class CheckpointError(Phi3VToolsError):
    """A checkpoint directory is incomplete, corrupt, or not a Phi-3-vision checkpoint."""


class DeviceError(Phi3VToolsError, ValueError):
    """The device or attention asked for is not usable here: a CPU-only PyTorch, no GPU visible, an index past the
    last GPU, flash-attn off CUDA."""


class ImageError(Phi3VToolsError, ValueError):
    """An image could not be decoded or converted for the model."""


class PromptError(Phi3VToolsError, ValueError):
    """A prompt does not match the images given (``<|image_k|>`` tags), or is otherwise invalid."""


class GenerationError(Phi3VToolsError):
    """Generation was asked for something the model cannot do (e.g. more tokens than its context)."""


class BusyError(Phi3VToolsError):
    """The runner's queue is full: retry later (the message says how full it is)."""


class RequestTimeoutError(Phi3VToolsError, TimeoutError):
    """A request did not finish within its timeout (waiting included)."""


class CancelledError(Phi3VToolsError):
    """A request was cancelled by its caller before it finished."""


class OutOfMemoryError(Phi3VToolsError):
    """A single request does not fit in accelerator memory even when run alone."""


class OptionalDependencyError(Phi3VToolsError, ImportError):
    """An optional dependency is missing; the message carries the exact install command."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the '{package}' package, which is not installed. "
            f"Install it with: {install_command(extra)} (the '{extra}' extra of phi3v-tools)"
        )
        self.package = package
        self.extra = extra


def install_command(extra: str) -> str:
    """``pip install`` with the requirements of one of the package's extras, as the installed metadata lists them.

    The package is installed from a clone or from git, not from PyPI, so asking pip for ``phi3v-tools[mcp]``
    would fail; the extra's own requirements install into any environment.
    """
    from importlib import metadata

    try:
        requires = metadata.requires("phi3v-tools") or []
    except metadata.PackageNotFoundError:
        requires = []
    wanted = [
        req.split(";")[0].strip()
        for req in requires
        if ";" in req and req.split(";", 1)[1].replace("'", '"').replace(" ", "") == f'extra=="{extra}"'
    ]
    if not wanted:
        return f"pip install -e '.[{extra}]' (in a clone of phi3v-tools)"
    return "pip install " + " ".join(f"'{req}'" for req in wanted)
