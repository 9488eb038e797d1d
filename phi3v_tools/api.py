"""The plain Python API: ``describe_image``, ``read_text``, ``read_table``, ``compare_images``, ``ask_images``,
and their async forms (``adescribe_image`` ... ``aask_images``), which await the engine instead of blocking.

They use one process-wide :class:`~phi3v_tools.tools.Toolbox` built from ``PHI3V_*`` variables on first
use (this module is an edge: it reads the environment once). Build your own Toolbox for other settings.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from phi3v_tools.engine.types import Backend
from phi3v_tools.image_store import DiskImageStore
from phi3v_tools.images import ImageRef, ImageStore
from phi3v_tools.settings import Settings
from phi3v_tools.tools import (
    MULTI_IMAGE_NUM_CROPS,
    Answer,
    Detail,
    ImageComparison,
    ImageDescription,
    PageProgress,
    ProgressCallback,
    Table,
    TextReading,
    Toolbox,
)

if TYPE_CHECKING:
    from phi3v_tools.backends.openai import OpenAIBackend

_DEFAULT: Toolbox | None = None
_SETTINGS: Settings | None = None
_LOCK = threading.Lock()


def toolbox_from_settings(settings: Settings, backend: Backend | None = None) -> Toolbox:
    """A Toolbox over ``backend``, or over the backend ``settings`` name: the process's shared runner (the model
    loads on the first call) or the remote server of ``PHI3V_BASE_URL``."""

    def runner() -> Backend:
        if settings.backend == "openai":
            return remote_backend(settings)
        from phi3v_tools.runner import get_runner  # torch and the model stack load here, on the first call

        return get_runner(settings)

    return Toolbox(
        backend if backend is not None else runner,
        settings.image_policy(),
        store=image_store_from_settings(settings),
        max_compare=settings.max_compare,
        schema_limits=settings.schema_limits(),
        documents=settings.document_policy(),
        # PHI3V_NUM_CROPS, when set, is the crops per image of every call, one image or several; unset, several
        # images get 4 each (the Phi-3.5 card's advice), so that they fit the context.
        multi_image_num_crops=settings.num_crops or MULTI_IMAGE_NUM_CROPS,
    )


def remote_backend(settings: Settings) -> OpenAIBackend:
    """The OpenAI-compatible server of ``PHI3V_BASE_URL`` as a backend (no torch in this process)."""
    from phi3v_tools.backends.openai import OpenAIBackend

    assert settings.base_url is not None  # Settings checks it for backend "openai"
    return OpenAIBackend(
        settings.base_url,
        api_key=settings.api_key,
        model=settings.remote_model,
        timeout_s=settings.remote_timeout_s,
        max_in_flight=settings.remote_max_in_flight,
        schema_limits=settings.schema_limits(),
    )


def image_store_from_settings(settings: Settings) -> ImageStore:
    """The store of image handles: in memory, and also on disk in ``image_store_dir`` when it is set (handles then
    outlive the process and are shared by every process using the directory)."""
    max_bytes = int(settings.image_store_mb * 2**20)
    if settings.image_store_dir is None or settings.image_store_disk_mb == 0 or max_bytes == 0:
        return ImageStore(max_bytes=max_bytes)  # memory only (an empty memory store keeps no handles at all)
    return DiskImageStore(
        settings.image_store_dir,
        max_bytes=max_bytes,
        max_disk_bytes=int(settings.image_store_disk_mb * 2**20),
        max_pixels=settings.max_image_pixels,
    )


def default_settings() -> Settings:
    """The process's settings from ``PHI3V_*``, read once (they say, e.g., how many images a tool takes)."""
    global _SETTINGS
    with _LOCK:
        if _SETTINGS is None:
            _SETTINGS = Settings.from_env()
        return _SETTINGS


def default_toolbox() -> Toolbox:
    """The process-wide toolbox over :func:`default_settings` (the model loads on its first call)."""
    global _DEFAULT
    settings = default_settings()
    with _LOCK:
        if _DEFAULT is None:
            _DEFAULT = toolbox_from_settings(settings)
        return _DEFAULT


def describe_image(
    image: ImageRef, question: str | None = None, detail: Detail = "normal", pages: str | None = None
) -> ImageDescription:
    """What an image (or one page of a PDF, ``pages``) shows: description, main objects, kind, visible text."""
    return default_toolbox().describe_image(image, question, detail, pages)


def read_text(
    image: ImageRef,
    fields: Sequence[str] | None = None,
    pages: str | None = None,
    *,
    on_page: PageProgress | None = None,
) -> TextReading:
    """The text in an image in reading order; with ``fields`` (e.g. ["title", "author"]) those values too. For a
    PDF, each page of ``pages`` (e.g. "1-3,7"; ``on_page(done, total)`` reports them as they are read)."""
    return default_toolbox().read_text(image, fields, pages, on_page=on_page)


def read_table(
    image: ImageRef,
    columns: Sequence[str] | None = None,
    pages: str | None = None,
    *,
    on_page: PageProgress | None = None,
) -> Table:
    """A table or chart as data (columns, rows, title, units, summary); with ``columns``, exactly those. For a PDF,
    the table of each page of ``pages``."""
    return default_toolbox().read_table(image, columns, pages, on_page=on_page)


def compare_images(
    images: Sequence[ImageRef], question: str | None = None, pages: str | None = None
) -> ImageComparison:
    """Summary, similarities and differences of 2 to ``PHI3V_MAX_COMPARE`` (default 4) images or PDF pages."""
    return default_toolbox().compare_images(images, question, pages)


def ask_images(
    images: ImageRef | Sequence[ImageRef],
    question: str,
    output_schema: dict[str, Any] | type[BaseModel] | None = None,
    pages: str | None = None,
) -> Answer:
    """Any question about images (or PDF pages); with ``output_schema`` the answer conforms to it."""
    return default_toolbox().ask_images(images, question, output_schema, pages)


async def adescribe_image(
    image: ImageRef,
    question: str | None = None,
    detail: Detail = "normal",
    pages: str | None = None,
    *,
    on_text: ProgressCallback | None = None,
) -> ImageDescription:
    """:func:`describe_image`, awaited; ``on_text`` sees the answer's text as it is written."""
    return await default_toolbox().adescribe_image(image, question, detail, pages, on_text=on_text)


async def aread_text(
    image: ImageRef,
    fields: Sequence[str] | None = None,
    pages: str | None = None,
    *,
    on_text: ProgressCallback | None = None,
    on_page: PageProgress | None = None,
) -> TextReading:
    """:func:`read_text`, awaited."""
    return await default_toolbox().aread_text(image, fields, pages, on_text=on_text, on_page=on_page)


async def aread_table(
    image: ImageRef,
    columns: Sequence[str] | None = None,
    pages: str | None = None,
    *,
    on_text: ProgressCallback | None = None,
    on_page: PageProgress | None = None,
) -> Table:
    """:func:`read_table`, awaited."""
    return await default_toolbox().aread_table(image, columns, pages, on_text=on_text, on_page=on_page)


async def acompare_images(
    images: Sequence[ImageRef],
    question: str | None = None,
    pages: str | None = None,
    *,
    on_text: ProgressCallback | None = None,
) -> ImageComparison:
    """:func:`compare_images`, awaited."""
    return await default_toolbox().acompare_images(images, question, pages, on_text=on_text)


async def aask_images(
    images: ImageRef | Sequence[ImageRef],
    question: str,
    output_schema: dict[str, Any] | type[BaseModel] | None = None,
    pages: str | None = None,
    *,
    on_text: ProgressCallback | None = None,
) -> Answer:
    """:func:`ask_images`, awaited."""
    return await default_toolbox().aask_images(images, question, output_schema, pages, on_text=on_text)
