"""Phi-3-vision as LangChain tools: describe_image, read_text, read_table, compare_images and ask_images.

Each tool is a thin :class:`~langchain_core.tools.BaseTool` over one entry of the tools' table
(:func:`phi3v_tools.tools.tool_specs`): its name, description, arguments and result text come from there.
The model sees concise text (the result plus the images' handles, so a later call can say
``image://sha256/...`` instead of sending an image again); the full pydantic result (fields, handles, token
usage, timings) rides along as the ``ToolMessage`` artifact, which is not sent to the model. Expected failures
(a path outside the allowed directories, an unknown handle, a full queue...) and invalid arguments come back to
the model as error ``ToolMessage`` s it can act on, so an agent run goes on.

Setup:
    Install the extra; the model (the tiny test model, or the real weights) is picked with ``PHI3V_*``
    variables or a :class:`~phi3v_tools.settings.Settings`:

    .. code-block:: bash

        pip install -e '.[langchain]'          # in a clone; or 'phi3v-tools[langchain] @ git+URL'
        export PHI3V_MODEL=microsoft/Phi-3-vision-128k-instruct   # or a local checkpoint, or "tiny"
        export PHI3V_ALLOWED_DIRS=/data/images                     # local paths the tools may read

Instantiation:
    .. code-block:: python

        from phi3v_tools.langchain import Phi3VisionToolkit
        from phi3v_tools.settings import Settings

        tools = Phi3VisionToolkit(settings=Settings.from_env()).get_tools()  # no model loads yet
        # or one tool: DescribeImageTool(toolbox=my_toolbox); without a toolbox, a tool uses
        # phi3v_tools.api.default_toolbox() (the model loads on the first call).

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

PDF documents:
    Every tool takes a PDF where it takes an image, with ``pages`` (e.g. ``"1-3,7"``). ``read_text`` and
    ``read_table`` report their progress as a custom event, ``phi3v_tools.page``, with data
    ``{"tool": ..., "done": pages read, "total": pages in the call}`` (``astream_events`` shows it as
    ``on_custom_event``; a callback handler's ``on_custom_event`` receives it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

from pydantic import ConfigDict, Field, InstanceOf, ValidationError, model_validator

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
from phi3v_tools.tools import (
    AskImagesArgs,
    CompareImagesArgs,
    DescribeImageArgs,
    ReadTableArgs,
    ReadTextArgs,
    ToolArgs,
    Toolbox,
    result_text,
    tool_spec,
    tool_specs,
)

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
    "ReadTableInput",
    "ReadTableTool",
    "ReadTextInput",
    "ReadTextTool",
    "explain_validation_error",
    "result_text",
]

# The arguments models live in the tools' table (phi3v_tools.tools); these names are kept for imports.
DescribeImageInput = DescribeImageArgs
ReadTextInput = ReadTextArgs
ReadTableInput = ReadTableArgs
CompareImagesInput = CompareImagesArgs
AskImagesInput = AskImagesArgs
_INPUTS: dict[str, type[ToolArgs]] = {spec.args.__name__: spec.args for spec in tool_specs()}


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
# Errors


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
    """What the tools share: the toolbox, the spec they come from, the result format and the error handling.

    A subclass names its tool; its description and arguments come from the tools' table
    (:func:`phi3v_tools.tools.tool_specs`), with the toolbox's limits (``max_compare``).
    """

    toolbox: InstanceOf[Toolbox] | None = Field(default=None, exclude=True)
    """The tools' core. ``None``: :func:`phi3v_tools.api.default_toolbox` (built from ``PHI3V_*`` when the tool
    is; the model still loads on the first call)."""

    response_format: Literal["content", "content_and_artifact"] = "content_and_artifact"
    """Content: concise text with image handles. Artifact: the pydantic result model (not sent to the model)."""

    handle_tool_error: bool | str | Callable[[ToolException], ToolExceptionHandlerOutput] | None = True
    """Expected failures come back to the model as an error ToolMessage with an actionable message."""

    handle_validation_error: bool | str | Callable[[ValidationError | ValidationErrorV1], str] | None = (
        explain_validation_error
    )
    """Invalid arguments come back to the model with which argument is wrong and what it expects."""

    @model_validator(mode="after")
    def _from_spec(self) -> _Phi3VisionTool:
        """The description and the arguments (with the toolbox's limits) from the table, unless given."""
        spec = tool_spec(self.name, self._max_compare())
        if "description" not in self.model_fields_set:
            self.description = spec.model_description
        if "args_schema" not in self.model_fields_set:
            self.args_schema = spec.args
        return self

    def _max_compare(self) -> int:
        # Without a toolbox, the limit the default toolbox will have, read without building it.
        return self.toolbox.max_compare if self.toolbox is not None else api.default_settings().max_compare

    def _toolbox(self) -> Toolbox:
        if self.toolbox is None:  # the first call: the default toolbox (its model loads when it first generates)
            self.toolbox = api.default_toolbox()
        return self.toolbox

    def _run(self, *, run_manager: CallbackManagerForToolRun | None = None, **arguments: Any) -> tuple[str, Any]:
        toolbox = self._toolbox()
        on_page = None
        if run_manager is not None:
            child, run_id = run_manager.get_child(), run_manager.run_id

            def on_page(done: int, total: int) -> None:
                child.on_custom_event(PAGE_EVENT, {"tool": self.name, "done": done, "total": total}, run_id=run_id)

        with self._errors():
            result = _SPECS[self.name].call(toolbox, arguments, on_page)  # the call is the same whatever the limits
        return result_text(result), result

    async def _arun(
        self, *, run_manager: AsyncCallbackManagerForToolRun | None = None, **arguments: Any
    ) -> tuple[str, Any]:
        events: list[asyncio.Task[Any]] = []
        on_page = None
        if run_manager is not None:
            child, run_id = run_manager.get_child(), run_manager.run_id
            loop = asyncio.get_running_loop()

            async def deliver(data: dict[str, Any], previous: asyncio.Task[Any] | None) -> None:
                if previous is not None:  # in order: each event after the one before it
                    await asyncio.gather(previous, return_exceptions=True)
                await child.on_custom_event(PAGE_EVENT, data, run_id=run_id)

            def on_page(done: int, total: int) -> None:  # on the loop, or from a worker thread
                data = {"tool": self.name, "done": done, "total": total}

                def send() -> None:
                    events.append(loop.create_task(deliver(data, events[-1] if events else None)))

                loop.call_soon_threadsafe(send)

        with self._errors():
            toolbox = await asyncio.to_thread(self._ready)  # a first-use model load runs in a thread, not on the loop
            try:
                result = await _SPECS[self.name].acall(toolbox, arguments, on_page=on_page)
            finally:
                await asyncio.sleep(0)  # the events scheduled last are created, then all of them delivered
                await asyncio.gather(*events, return_exceptions=True)
        return result_text(result), result

    def _ready(self) -> Toolbox:
        toolbox = self._toolbox()
        _ = toolbox.backend
        return toolbox

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


PAGE_EVENT = "phi3v_tools.page"  # the custom event of a PDF's page progress
_SPECS = {spec.name: spec for spec in tool_specs()}  # the defaults the classes show before a toolbox is known


class DescribeImageTool(_Phi3VisionTool):
    """Phi-3-vision ``describe_image``: what one image shows.

    Setup:
        The ``langchain`` extra (``pip install -e '.[langchain]'`` in a clone); pick the model with ``PHI3V_MODEL``.

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
    description: str = _SPECS[name].model_description
    args_schema: ArgsSchema | None = _SPECS[name].args


class ReadTextTool(_Phi3VisionTool):
    """Phi-3-vision ``read_text``: the text in one image (OCR), and optionally named fields.

    Setup:
        The ``langchain`` extra (``pip install -e '.[langchain]'`` in a clone); pick the model with ``PHI3V_MODEL``.

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
    description: str = _SPECS[name].model_description
    args_schema: ArgsSchema | None = _SPECS[name].args


class ReadTableTool(_Phi3VisionTool):
    """Phi-3-vision ``read_table``: a table, chart or form in one image as columns and rows.

    Setup:
        The ``langchain`` extra (``pip install -e '.[langchain]'`` in a clone); pick the model with ``PHI3V_MODEL``.

    Instantiation:
        .. code-block:: python

            tool = ReadTableTool()  # or ReadTableTool(toolbox=my_toolbox)

    Invocation with args:
        .. code-block:: python

            tool.invoke({"image": "sales.png", "columns": ["Region", "Q1"]})

    Invocation with ToolCall:
        .. code-block:: python

            message = tool.invoke({"type": "tool_call", "id": "1", "name": "read_table", "args": {...}})
            message.artifact  # Table: columns, rows, title, units, summary, images, call; .to_csv()
    """

    name: str = "read_table"
    description: str = _SPECS[name].model_description
    args_schema: ArgsSchema | None = _SPECS[name].args


class CompareImagesTool(_Phi3VisionTool):
    """Phi-3-vision ``compare_images``: how 2 to ``max_compare`` (4 by default) images relate.

    Setup:
        The ``langchain`` extra (``pip install -e '.[langchain]'`` in a clone); pick the model with ``PHI3V_MODEL``.

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
    description: str = _SPECS[name].model_description
    args_schema: ArgsSchema | None = _SPECS[name].args


class AskImagesTool(_Phi3VisionTool):
    """Phi-3-vision ``ask_images``: any question about 1 to ``max_compare`` images, optionally answered as JSON.

    Setup:
        The ``langchain`` extra (``pip install -e '.[langchain]'`` in a clone); pick the model with ``PHI3V_MODEL``.

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
    description: str = _SPECS[name].model_description
    args_schema: ArgsSchema | None = _SPECS[name].args


TOOL_CLASSES: dict[str, Callable[..., BaseTool]] = {
    cls.model_fields["name"].default: cls
    for cls in (DescribeImageTool, ReadTextTool, ReadTableTool, CompareImagesTool, AskImagesTool)
}


# ---------------------------------------------------------------------------------------------------------------------
# The toolkit


class Phi3VisionToolkit(BaseToolkit):
    """The Phi-3-vision tools over one shared toolbox (one model, one store of image handles).

    Setup:
        The ``langchain`` extra (``pip install -e '.[langchain]'`` in a clone, or see the README's Install).

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
        """The tools of the table (``describe_image``, ``read_text``, ``read_table``, ``compare_images``,
        ``ask_images``), sharing one toolbox."""
        most = self.toolbox.max_compare if self.toolbox is not None else api.default_settings().max_compare
        return [TOOL_CLASSES[spec.name](toolbox=self.toolbox) for spec in tool_specs(most)]
