"""Phi-3-vision as LangChain tools: ``describe_image``, ``read_text``, ``compare_images``, ``ask_images``.

Each tool is a thin :class:`~langchain_core.tools.BaseTool` over one :class:`~phi3v_tools.tools.Toolbox` method.
The model sees concise text (the result plus the images' handles, so a later call can say
``image://sha256/...`` instead of sending an image again); the full pydantic result (fields, handles, token
usage, timings) rides along as the ``ToolMessage`` artifact, which is not sent to the model. Expected failures
(a path outside the allowed directories, an unknown handle, a full queue...) and invalid arguments come back to
the model as error ``ToolMessage`` s it can act on, so an agent run goes on.

Setup:
    Install the extra; the model (the tiny test model, or the real weights) is picked with ``PHI3V_*``
    variables or a :class:`~phi3v_tools.settings.Settings`:

    .. code-block:: bash

        pip install 'phi3v-tools[langchain]'
        export PHI3V_MODEL=microsoft/Phi-3-vision-128k-instruct   # or a local checkpoint, or "tiny"
        export PHI3V_ALLOWED_DIRS=/data/images                     # local paths the tools may read

Instantiation:
    .. code-block:: python

        from phi3v_tools.langchain import Phi3VisionToolkit
        from phi3v_tools.settings import Settings

        tools = Phi3VisionToolkit(settings=Settings.from_env()).get_tools()  # no model loads yet
        # or one tool: DescribeImageTool(toolbox=my_toolbox); without a toolbox, the tools use
        # phi3v_tools.api.default_toolbox() on first use.

Invocation with args:
    .. code-block:: python

        tool = ReadTextTool()
        tool.invoke({"image": "/data/images/cover.png", "fields": ["title", "author"]})
        # 'title: THE QUIET HARBOUR; author: Ada Lindqvist\\n\\n...\\nImage handle for later calls: image://sha256/...'

Invocation with ToolCall:
    .. code-block:: python

        message = tool.invoke(
            {"type": "tool_call", "id": "1", "name": "read_text", "args": {"image": "/data/images/cover.png"}}
        )
        message.content  # the text above
        message.artifact  # the TextReading result: .text, .lines, .fields, .images[0].handle, .call

    In an agent: ``langchain.agents.create_agent(model, tools)``; see ``examples/agent_chain.py``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, InstanceOf, ValidationError, field_validator, model_validator

from phi3v_tools import api
from phi3v_tools.errors import (
    BusyError,
    CancelledError,
    CheckpointError,
    GenerationError,
    ModelNotFoundError,
    OptionalDependencyError,
    OutOfMemoryError,
    Phi3VToolsError,
    RequestTimeoutError,
)
from phi3v_tools.settings import Settings
from phi3v_tools.tools import Answer, Detail, ImageComparison, ImageDescription, TextReading, Toolbox

try:
    from langchain_core.callbacks import AsyncCallbackManagerForToolRun, CallbackManagerForToolRun
    from langchain_core.tools import ArgsSchema, BaseTool, BaseToolkit, ToolException
    from langchain_core.tools.base import ToolExceptionHandlerOutput
    from pydantic.v1 import ValidationError as ValidationErrorV1
except ImportError as exc:  # pragma: no cover - a test hides langchain_core to check this
    raise OptionalDependencyError("langchain-core", "langchain", "The LangChain tools") from exc

__all__ = [
    "AskImagesInput",
    "AskImagesTool",
    "CompareImagesInput",
    "CompareImagesTool",
    "DescribeImageInput",
    "DescribeImageTool",
    "Phi3VisionToolkit",
    "ReadTextInput",
    "ReadTextTool",
    "explain_validation_error",
    "result_text",
]

Result = ImageDescription | TextReading | ImageComparison | Answer

IMAGE_REF = "Path, http(s) URL, data: URI, base64, or an image://sha256/... handle from an earlier result."
IMAGES_REF = (
    "images, in order; each a path, http(s) URL, data: URI, base64, or an image://sha256/... handle from an "
    "earlier result."
)


# ---------------------------------------------------------------------------------------------------------------------
# Inputs: the field descriptions (not the docstrings) are what the model sees.


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DescribeImageInput(_Input):
    """Arguments of ``describe_image``."""

    image: str = Field(min_length=1, description=IMAGE_REF)
    question: str | None = Field(
        default=None, description="Optional: what to focus on, e.g. 'What is the person holding?'."
    )
    detail: Detail = Field(
        default="normal",
        description="How long the description is: brief (one or two sentences), normal (a short paragraph) "
        "or detailed.",
    )


class ReadTextInput(_Input):
    """Arguments of ``read_text``."""

    image: str = Field(min_length=1, description=IMAGE_REF)
    fields: list[str] | None = Field(
        default=None,
        min_length=1,
        max_length=20,
        description="Optional names of values to extract besides the full text, e.g. ['title', 'author'] or "
        "['date', 'total']; each comes back with the value read, or as not found.",
    )

    @field_validator("fields", mode="before")
    @classmethod
    def _split_names(cls, value: Any) -> Any:
        return [name.strip() for name in value.split(",") if name.strip()] if isinstance(value, str) else value


class CompareImagesInput(_Input):
    """Arguments of ``compare_images``."""

    images: list[str] = Field(min_length=2, max_length=4, description="2 to 4 " + IMAGES_REF)
    question: str | None = Field(
        default=None, description="Optional: what to compare, e.g. 'What changed between the two?'."
    )


class AskImagesInput(_Input):
    """Arguments of ``ask_images``."""

    images: list[str] = Field(min_length=1, max_length=4, description="1 to 4 " + IMAGES_REF)
    question: str = Field(min_length=1, description="The question about the images.")
    output_schema: dict[str, Any] | None = Field(
        default=None,
        description="Optional JSON schema the answer must conform to, e.g. {'type': 'object', 'properties': "
        "{'count': {'type': 'integer'}}, 'required': ['count']}. Omit it for a free-text answer.",
    )

    @field_validator("images", mode="before")
    @classmethod
    def _one_image(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("output_schema", mode="before")
    @classmethod
    def _schema_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                raise ValueError("output_schema must be a JSON object (a JSON schema), not free text") from None
        return value


_INPUTS: dict[str, type[_Input]] = {
    model.__name__: model for model in (DescribeImageInput, ReadTextInput, CompareImagesInput, AskImagesInput)
}


def explain_validation_error(error: ValidationError | ValidationErrorV1) -> str:
    """A short explanation, for the model, of which arguments are wrong and what each one expects."""
    model = _INPUTS.get(error.title) if isinstance(error, ValidationError) else None
    if model is None or not isinstance(error, ValidationError):
        return f"Invalid tool arguments: {error}\nFix them and call the tool again."
    problems = []
    for item in error.errors(include_url=False):
        field = str(item["loc"][0]) if item["loc"] else ""
        where = ".".join(str(part) for part in item["loc"]) or "arguments"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = f"unknown argument; the arguments are: {', '.join(model.model_fields)}"
        elif item["type"] != "missing":
            message += f" (got {_short(item['input'])})"
        info = model.model_fields.get(field)
        if info is not None and info.description:
            message += f". Expected: {info.description}"
        problems.append(f"- {where}: {message}")
    return "Invalid arguments, nothing was run:\n" + "\n".join(problems) + "\nFix them and call the tool again."


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------------------------
# Results and errors


def result_text(result: Result) -> str:
    """What the model sees: the result's concise text, then the images' handles for later calls."""
    lines = [result.to_text()]
    if result.call.truncated:
        lines.append("(The answer reached its length limit and was cut short.)")
    handles = "; ".join(f"{image.handle} ({image.width}x{image.height})" for image in result.images)
    label = "Image handle" if len(result.images) == 1 else "Image handles, in order,"
    lines.append(f"{label} for later calls: {handles}")
    return "\n".join(lines)


def _hint(error: Phi3VToolsError) -> str:
    if isinstance(error, BusyError):
        return " The vision model is busy: wait a few seconds, then call the tool again."
    if isinstance(error, RequestTimeoutError):
        return " Try again with fewer images, or ask for a shorter answer."
    if isinstance(error, OutOfMemoryError):
        return " Try fewer images at once."
    if isinstance(error, GenerationError):
        return " Try fewer images or a shorter question."
    if isinstance(error, ModelNotFoundError | CheckpointError):
        return " The vision model is not available, so this tool cannot be used now; carry on without it."
    if isinstance(error, CancelledError):
        return " The request was cancelled; call the tool again if you still need it."
    return ""


# ---------------------------------------------------------------------------------------------------------------------
# The tools


class _Phi3VisionTool(BaseTool):
    """What the four tools share: the toolbox, the result format and the error handling."""

    toolbox: InstanceOf[Toolbox] | None = Field(default=None, exclude=True)
    """The tools' core. ``None``: :func:`phi3v_tools.api.default_toolbox`, resolved on first use (so
    constructing a tool never loads a model)."""

    response_format: Literal["content", "content_and_artifact"] = "content_and_artifact"
    """Content: concise text with image handles. Artifact: the pydantic result model (not sent to the model)."""

    handle_tool_error: bool | str | Callable[[ToolException], ToolExceptionHandlerOutput] | None = True
    """Expected failures come back to the model as an error ToolMessage with an actionable message."""

    handle_validation_error: bool | str | Callable[[ValidationError | ValidationErrorV1], str] | None = (
        explain_validation_error
    )
    """Invalid arguments come back to the model with which argument is wrong and what it expects."""

    def _resolve_toolbox(self) -> Toolbox:
        if self.toolbox is None:
            self.toolbox = api.default_toolbox()
        return self.toolbox

    async def _aresolve_toolbox(self) -> Toolbox:
        """The toolbox with its backend ready; a first-use model load runs in a thread, not on the loop."""

        def ready() -> Toolbox:
            toolbox = self._resolve_toolbox()
            _ = toolbox.backend
            return toolbox

        return await asyncio.to_thread(ready)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except Phi3VToolsError as exc:
            text = str(exc).strip() or type(exc).__name__
            if not text.endswith((".", "!", "?")):
                text += "."
            raise ToolException(f"{self.name} failed: {text}{_hint(exc)}") from exc
        except ValidationError as exc:  # not the arguments (checked before _run): the answer did not fit
            raise ToolException(
                f"{self.name} failed: the vision model's answer did not fit the result format "
                f"({exc.error_count()} problems). Try again, perhaps with a simpler question."
            ) from exc


class DescribeImageTool(_Phi3VisionTool):
    """Phi-3-vision ``describe_image``: what one image shows.

    Setup:
        ``pip install 'phi3v-tools[langchain]'``; pick the model with ``PHI3V_MODEL``.

    Instantiation:
        .. code-block:: python

            tool = DescribeImageTool()  # or DescribeImageTool(toolbox=my_toolbox)

    Invocation with args:
        .. code-block:: python

            tool.invoke({"image": "photo.jpg", "detail": "brief"})

    Invocation with ToolCall:
        .. code-block:: python

            message = tool.invoke({"type": "tool_call", "id": "1", "name": "describe_image", "args": {...}})
            message.artifact  # ImageDescription: description, objects, kind, visible_text, images, call
    """

    name: str = "describe_image"
    """The tool name the model calls."""

    description: str = (
        "Look at one image and say what it shows: a description, the main objects, the kind of image (photo, "
        "chart, document, screenshot, diagram, illustration) and any visible text. Use it to find out what is "
        "in a picture; pass a question to focus the description. For exact text use read_text. The result ends "
        "with the image's handle (image://sha256/...): pass it instead of the image in later calls."
    )
    """Tells the model what the tool does and when to use it."""

    args_schema: ArgsSchema | None = DescribeImageInput
    """The arguments the model fills in."""

    def _run(
        self,
        image: str,
        question: str | None = None,
        detail: Detail = "normal",
        run_manager: CallbackManagerForToolRun | None = None,
    ) -> tuple[str, ImageDescription]:
        with self._errors():
            result = self._resolve_toolbox().describe_image(image, question, detail)
        return result_text(result), result

    async def _arun(
        self,
        image: str,
        question: str | None = None,
        detail: Detail = "normal",
        run_manager: AsyncCallbackManagerForToolRun | None = None,
    ) -> tuple[str, ImageDescription]:
        with self._errors():
            toolbox = await self._aresolve_toolbox()
            result = await toolbox.adescribe_image(image, question, detail)
        return result_text(result), result


class ReadTextTool(_Phi3VisionTool):
    """Phi-3-vision ``read_text``: the text in one image (OCR), and optionally named fields.

    Setup:
        ``pip install 'phi3v-tools[langchain]'``; pick the model with ``PHI3V_MODEL``.

    Instantiation:
        .. code-block:: python

            tool = ReadTextTool()  # or ReadTextTool(toolbox=my_toolbox)

    Invocation with args:
        .. code-block:: python

            tool.invoke({"image": "cover.png", "fields": ["title", "author"]})

    Invocation with ToolCall:
        .. code-block:: python

            message = tool.invoke({"type": "tool_call", "id": "1", "name": "read_text", "args": {...}})
            message.artifact  # TextReading: text, lines, fields, images, call
    """

    name: str = "read_text"
    """The tool name the model calls."""

    description: str = (
        "Read the text in one image (OCR): documents, screenshots, receipts, signs, slides, book covers. Returns "
        "the text in reading order; with fields (e.g. ['title', 'author']) it also extracts those values, saying "
        "which were not found. Use it instead of describe_image when you need the exact words. The result ends "
        "with the image's handle (image://sha256/...): pass it instead of the image in later calls."
    )
    """Tells the model what the tool does and when to use it."""

    args_schema: ArgsSchema | None = ReadTextInput
    """The arguments the model fills in."""

    def _run(
        self,
        image: str,
        fields: list[str] | None = None,
        run_manager: CallbackManagerForToolRun | None = None,
    ) -> tuple[str, TextReading]:
        with self._errors():
            result = self._resolve_toolbox().read_text(image, fields)
        return result_text(result), result

    async def _arun(
        self,
        image: str,
        fields: list[str] | None = None,
        run_manager: AsyncCallbackManagerForToolRun | None = None,
    ) -> tuple[str, TextReading]:
        with self._errors():
            toolbox = await self._aresolve_toolbox()
            result = await toolbox.aread_text(image, fields)
        return result_text(result), result


class CompareImagesTool(_Phi3VisionTool):
    """Phi-3-vision ``compare_images``: how 2 to 4 images relate.

    Setup:
        ``pip install 'phi3v-tools[langchain]'``; pick the model with ``PHI3V_MODEL``.

    Instantiation:
        .. code-block:: python

            tool = CompareImagesTool()  # or CompareImagesTool(toolbox=my_toolbox)

    Invocation with args:
        .. code-block:: python

            tool.invoke({"images": ["before.png", "image://sha256/..."], "question": "What changed?"})

    Invocation with ToolCall:
        .. code-block:: python

            message = tool.invoke({"type": "tool_call", "id": "1", "name": "compare_images", "args": {...}})
            message.artifact  # ImageComparison: summary, similarities, differences, images, call
    """

    name: str = "compare_images"
    """The tool name the model calls."""

    description: str = (
        "Compare 2 to 4 images: a summary of how they relate, what they have in common and how they differ "
        "(spot the difference, before and after, versions of a chart or page). Images already seen can be given "
        "by their image://sha256/... handles, which is faster than sending them again. The result ends with the "
        "images' handles."
    )
    """Tells the model what the tool does and when to use it."""

    args_schema: ArgsSchema | None = CompareImagesInput
    """The arguments the model fills in."""

    def _run(
        self,
        images: list[str],
        question: str | None = None,
        run_manager: CallbackManagerForToolRun | None = None,
    ) -> tuple[str, ImageComparison]:
        with self._errors():
            result = self._resolve_toolbox().compare_images(images, question)
        return result_text(result), result

    async def _arun(
        self,
        images: list[str],
        question: str | None = None,
        run_manager: AsyncCallbackManagerForToolRun | None = None,
    ) -> tuple[str, ImageComparison]:
        with self._errors():
            toolbox = await self._aresolve_toolbox()
            result = await toolbox.acompare_images(images, question)
        return result_text(result), result


class AskImagesTool(_Phi3VisionTool):
    """Phi-3-vision ``ask_images``: any question about 1 to 4 images, optionally answered as JSON.

    Setup:
        ``pip install 'phi3v-tools[langchain]'``; pick the model with ``PHI3V_MODEL``.

    Instantiation:
        .. code-block:: python

            tool = AskImagesTool()  # or AskImagesTool(toolbox=my_toolbox)

    Invocation with args:
        .. code-block:: python

            tool.invoke(
                {
                    "images": ["shelf.jpg"],
                    "question": "How many books are on the shelf?",
                    "output_schema": {"type": "object", "properties": {"count": {"type": "integer"}}},
                }
            )

    Invocation with ToolCall:
        .. code-block:: python

            message = tool.invoke({"type": "tool_call", "id": "1", "name": "ask_images", "args": {...}})
            message.artifact  # Answer: answer (text, or JSON matching output_schema), images, call
    """

    name: str = "ask_images"
    """The tool name the model calls."""

    description: str = (
        "Ask any question about 1 to 4 images and get a free-text answer, or, with output_schema (a JSON "
        "schema), a JSON value that conforms to it. Use it when describe_image, read_text and compare_images do "
        "not fit: counting, yes/no checks, reading a chart's values, extracting structured data. The result ends "
        "with the images' handles (image://sha256/...): pass them instead of the images in later calls."
    )
    """Tells the model what the tool does and when to use it."""

    args_schema: ArgsSchema | None = AskImagesInput
    """The arguments the model fills in."""

    def _run(
        self,
        images: list[str],
        question: str,
        output_schema: dict[str, Any] | None = None,
        run_manager: CallbackManagerForToolRun | None = None,
    ) -> tuple[str, Answer]:
        with self._errors():
            result = self._resolve_toolbox().ask_images(images, question, output_schema)
        return result_text(result), result

    async def _arun(
        self,
        images: list[str],
        question: str,
        output_schema: dict[str, Any] | None = None,
        run_manager: AsyncCallbackManagerForToolRun | None = None,
    ) -> tuple[str, Answer]:
        with self._errors():
            toolbox = await self._aresolve_toolbox()
            result = await toolbox.aask_images(images, question, output_schema)
        return result_text(result), result


# ---------------------------------------------------------------------------------------------------------------------
# The toolkit


class Phi3VisionToolkit(BaseToolkit):
    """The four Phi-3-vision tools over one shared toolbox (one model, one store of image handles).

    Setup:
        ``pip install 'phi3v-tools[langchain]'``.

    Instantiation:
        .. code-block:: python

            toolkit = Phi3VisionToolkit()  # the process-wide default toolbox, on first use
            toolkit = Phi3VisionToolkit(settings=Settings.from_env(allowed_dirs=(Path("images"),)))
            toolkit = Phi3VisionToolkit(my_toolbox)

    Invocation:
        .. code-block:: python

            agent = langchain.agents.create_agent(model, toolkit.get_tools())

    Nothing loads when the toolkit is built: the model loads on the first tool call.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    toolbox: InstanceOf[Toolbox] | None = Field(default=None, exclude=True)
    """The toolbox the tools share; ``None``: :func:`phi3v_tools.api.default_toolbox` on first use."""

    settings: InstanceOf[Settings] | None = Field(default=None, exclude=True)
    """Build the toolbox from these settings instead (the model still loads on first use)."""

    def __init__(self, toolbox: Toolbox | None = None, settings: Settings | None = None, **kwargs: Any) -> None:
        """The toolkit over ``toolbox``, or over a toolbox built from ``settings``, or over the default one."""
        fields: dict[str, Any] = {"toolbox": toolbox, "settings": settings, **kwargs}
        super().__init__(**fields)

    @model_validator(mode="after")
    def _build_toolbox(self) -> Phi3VisionToolkit:
        if self.toolbox is not None and self.settings is not None:
            raise ValueError("give either a toolbox or settings, not both")
        if self.settings is not None:
            self.toolbox = api.toolbox_from_settings(self.settings)
        return self

    def get_tools(self) -> list[BaseTool]:
        """``describe_image``, ``read_text``, ``compare_images`` and ``ask_images``, sharing one toolbox."""
        classes = (DescribeImageTool, ReadTextTool, CompareImagesTool, AskImagesTool)
        return [cls(toolbox=self.toolbox) for cls in classes]
