"""The one error hierarchy of phi3v-tools.

Every expected failure raises a subclass of :class:`Phi3VToolsError` with a message a person or a model
can act on: what was wrong, and what is allowed instead. Adapters (MCP, LangChain, CLI) turn these into
their own error results; anything else is a bug.
"""

from __future__ import annotations

import re

__all__ = [
    "BusyError",
    "CancelledError",
    "CheckpointError",
    "DeviceError",
    "DocumentError",
    "ImageError",
    "ModelNotFoundError",
    "OptionalDependencyError",
    "Phi3VToolsError",
    "PromptError",
    "GenerationError",
    "OutOfMemoryError",
    "RequestTimeoutError",
    "install_command",
    "require_local",
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


class DocumentError(ImageError):
    """A PDF document was refused or could not be rendered (too large, encrypted, malformed, over a limit)."""


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

    def __init__(self, package: str, extra: str, purpose: str, otherwise: str = "", *, alone: bool = False) -> None:
        """``alone``: the install line names ``package`` only (as the extra pins it), not the whole extra."""
        command = install_command(extra, only=package if alone else None)
        whose = "from" if alone else "the"
        super().__init__(
            f"{purpose} needs the '{package}' package, which is not installed. "
            f"Install it with: {command} ({whose} '{extra}' extra of phi3v-tools){otherwise}"
        )
        self.package = package
        self.extra = extra


# What the in-process model imports (the 'local' extra), by import name and distribution name.
LOCAL_PACKAGES = (
    ("torch", "torch"),
    ("transformers", "transformers"),
    ("tokenizers", "tokenizers"),
    ("safetensors", "safetensors"),
    ("huggingface_hub", "huggingface_hub"),
    ("llguidance", "llguidance"),
)


def require_local(purpose: str = "The in-process model (PHI3V_BACKEND=local, the default)") -> None:
    """Raise :class:`OptionalDependencyError` unless the 'local' extra's packages are installed.

    A tools-only install (``[remote,mcp]``) has none of them; this turns the first ``import torch`` of a
    local-model path into one line that says what to install, or which backend needs nothing more.
    """
    from importlib.util import find_spec

    for module, package in LOCAL_PACKAGES:
        if find_spec(module) is None:
            raise OptionalDependencyError(
                package,
                "local",
                purpose,
                "; or run the tools against a model server: PHI3V_BACKEND=openai PHI3V_BASE_URL=http://host:8000/v1",
            )


def install_command(extra: str, only: str | None = None) -> str:
    """``pip install`` with the requirements of one of the package's extras, as the installed metadata lists them.

    The package is installed from a clone or from git, not from PyPI, so asking pip for ``phi3v-tools[mcp]``
    would fail; the extra's own requirements (those of the extras it names, expanded) install into any
    environment. ``only``: just that distribution's requirement from the extra.
    """
    from importlib import metadata

    try:
        requires = metadata.requires("phi3v-tools") or []
    except metadata.PackageNotFoundError:
        requires = []
    wanted = _extra_requirements(requires, extra, set())
    if only is not None:
        wanted = [req for req in wanted if re.match(rf"{re.escape(only)}\b(?![-_.])", req, re.IGNORECASE)] or [only]
    if not wanted:
        return f"pip install -e '.[{extra}]' (in a clone of phi3v-tools)"
    return "pip install " + " ".join(f"'{req}'" for req in wanted)


def _extra_requirements(requires: list[str], extra: str, seen: set[str]) -> list[str]:
    """The requirements of ``extra``, with ``phi3v-tools[a,b]`` (an extra naming others) replaced by theirs."""
    seen.add(extra)
    wanted: list[str] = []
    for req in requires:
        spec, _, marker = req.partition(";")
        if marker.replace("'", '"').replace(" ", "") != f'extra=="{extra}"':
            continue
        spec = spec.strip()
        itself = re.fullmatch(r"phi3v[-_]tools\s*\[([^\]]*)\]", spec, re.IGNORECASE)
        if itself is None:
            wanted.append(spec)
            continue
        for name in itself.group(1).split(","):
            if name.strip() and name.strip() not in seen:
                wanted += [r for r in _extra_requirements(requires, name.strip(), seen) if r not in wanted]
    return wanted
