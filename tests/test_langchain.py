"""The LangChain tools: the standard langchain-tests suites for each tool, then our own claims (text content
with handles plus the result as artifact, a native async path, errors and invalid arguments as error
ToolMessages, the toolkit, a real agent loop, the example script)."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
from langchain.agents import create_agent
from langchain_core.callbacks import BaseCallbackHandler, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolCall, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langchain_tests.integration_tests import ToolsIntegrationTests
from langchain_tests.unit_tests import ToolsUnitTests
from pydantic import Field

from phi3v_tools import api
from phi3v_tools.errors import BusyError, OptionalDependencyError
from phi3v_tools.images import ImagePolicy
from phi3v_tools.langchain import (
    PAGE_EVENT,
    AskImagesTool,
    CompareImagesTool,
    DescribeImageTool,
    Phi3VisionToolkit,
    ReadTableTool,
    ReadTextTool,
    result_text,
)
from phi3v_tools.runner import GenerationRequest, GenerationResult
from phi3v_tools.settings import Settings
from phi3v_tools.tools import IMAGE_REF, ImageComparison, ImageDescription, Table, TextReading, Toolbox, tool_specs
from tests.conftest import REPO
from tests.fakes import FakeBackend

HANDLE = re.compile(r"image://sha256/[0-9a-f]{64}")
TOOLS = (DescribeImageTool, ReadTextTool, ReadTableTool, CompareImagesTool, AskImagesTool)  # the table's order
NAMES = [spec.name for spec in tool_specs()]


def examples(images: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """One valid argument set per tool, on the sample images."""
    return {
        "describe_image": {"image": str(images["scene_a"]), "question": "Who is on the pitch?", "detail": "brief"},
        "read_text": {"image": str(images["cover"]), "fields": ["title", "author"]},
        "read_table": {"image": str(images["table"]), "columns": ["Region", "Q1"]},
        "compare_images": {"images": [str(images["scene_a"]), str(images["scene_b"])]},
        "ask_images": {
            "images": [str(images["chart"])],
            "question": "How many bars are there?",
            "output_schema": {"type": "object", "properties": {"bars": {"type": "integer"}}, "required": ["bars"]},
        },
    }


RESULTS = {spec.name: spec.result for spec in tool_specs()}


def tool_call(name: str, args: dict[str, Any], call_id: str = "call-1") -> ToolCall:
    return ToolCall(name=name, args=args, id=call_id, type="tool_call")


@pytest.fixture
def fake_toolbox(sample_images: dict[str, Path]) -> Toolbox:
    """Instant schema-valid answers; local paths allowed under the sample images' folder."""
    return Toolbox(FakeBackend(), ImagePolicy(allowed_dirs=(sample_images["chart"].parent,)))


# ---------------------------------------------------------------------------------------------------------------------
# The standard suites (langchain-tests)


class _Standard:
    """Feeds a standard suite from fixtures.

    The suites read plain properties, so an autouse fixture (bound to the same test instance) first puts a
    toolbox and the sample images on the instance. Unit suites get a FakeBackend toolbox (nothing runs);
    integration suites get the tiny model.
    """

    tool_class: ClassVar[type[BaseTool]]
    toolbox_fixture: ClassVar[str] = "fake_toolbox"

    @pytest.fixture(autouse=True)
    def _inject(self, request: pytest.FixtureRequest, sample_images: dict[str, Path]) -> None:
        self._toolbox: Toolbox = request.getfixturevalue(self.toolbox_fixture)
        self._images = sample_images

    @property
    def tool_constructor(self) -> type[BaseTool]:
        return self.tool_class

    @property
    def tool_constructor_params(self) -> dict[str, Any]:
        return {"toolbox": self._toolbox}

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return examples(self._images)[self.tool_class.model_fields["name"].default]


# The integration suite mixes sync and async tests. Without asyncio_mode=auto its async tests need the asyncio
# mark, and pytest-asyncio then warns that the class-wide mark also sits on the sync ones.
ASYNC_SUITE = [
    pytest.mark.asyncio,
    pytest.mark.filterwarnings(
        "ignore:The test <Function test_.* is marked with '@pytest.mark.asyncio' but it is not an async"
        ":pytest.PytestWarning"
    ),
]


class _Describe(_Standard):
    tool_class = DescribeImageTool


class _Read(_Standard):
    tool_class = ReadTextTool


class _Table(_Standard):
    tool_class = ReadTableTool


class _Compare(_Standard):
    tool_class = CompareImagesTool


class _Ask(_Standard):
    tool_class = AskImagesTool


class TestDescribeImageToolUnit(_Describe, ToolsUnitTests):
    pass


class TestReadTextToolUnit(_Read, ToolsUnitTests):
    pass


class TestReadTableToolUnit(_Table, ToolsUnitTests):
    pass


class TestCompareImagesToolUnit(_Compare, ToolsUnitTests):
    pass


class TestAskImagesToolUnit(_Ask, ToolsUnitTests):
    pass


class TestDescribeImageToolIntegration(_Describe, ToolsIntegrationTests):
    pytestmark = ASYNC_SUITE
    toolbox_fixture = "local_tiny_toolbox"


class TestReadTextToolIntegration(_Read, ToolsIntegrationTests):
    pytestmark = ASYNC_SUITE
    toolbox_fixture = "local_tiny_toolbox"


class TestReadTableToolIntegration(_Table, ToolsIntegrationTests):
    pytestmark = ASYNC_SUITE
    toolbox_fixture = "local_tiny_toolbox"


class TestCompareImagesToolIntegration(_Compare, ToolsIntegrationTests):
    pytestmark = ASYNC_SUITE
    toolbox_fixture = "local_tiny_toolbox"


class TestAskImagesToolIntegration(_Ask, ToolsIntegrationTests):
    pytestmark = ASYNC_SUITE
    toolbox_fixture = "local_tiny_toolbox"


# ---------------------------------------------------------------------------------------------------------------------
# What the model sees, and what the caller gets


@pytest.mark.parametrize("cls", TOOLS, ids=lambda cls: cls.__name__)
def test_content_is_concise_text_with_handles_and_the_artifact_is_the_result(
    cls: type[BaseTool], fake_toolbox: Toolbox, sample_images: dict[str, Path]
) -> None:
    tool = cls(toolbox=fake_toolbox)
    message = tool.invoke(tool_call(tool.name, examples(sample_images)[tool.name]))

    assert isinstance(message, ToolMessage) and message.status == "success"
    result = message.artifact
    assert isinstance(result, RESULTS[tool.name])
    assert isinstance(message.content, str)
    assert message.content == result_text(result)
    assert message.content.startswith(result.to_text())
    assert HANDLE.findall(message.content) == [image.handle for image in result.images]  # every handle, in order
    assert "prompt_tokens" not in message.content and "seconds" not in message.content  # for the caller only


def test_plain_invoke_returns_the_text_only(fake_toolbox: Toolbox, sample_images: dict[str, Path]) -> None:
    text = ReadTextTool(toolbox=fake_toolbox).invoke({"image": str(sample_images["cover"]), "fields": ["title"]})
    assert isinstance(text, str)
    assert text.startswith("title: ")
    assert text.splitlines()[-1].startswith("Image handle for later calls: image://sha256/")


def test_a_handle_from_one_result_works_as_the_image_of_the_next_call(
    fake_toolbox: Toolbox, sample_images: dict[str, Path]
) -> None:
    read, compare = ReadTextTool(toolbox=fake_toolbox), CompareImagesTool(toolbox=fake_toolbox)
    first = read.invoke(tool_call("read_text", {"image": str(sample_images["cover"])}))
    handle = HANDLE.search(first.content).group(0)
    second = compare.invoke(tool_call("compare_images", {"images": [handle, str(sample_images["scene_a"])]}))
    assert second.status == "success"
    assert second.artifact.images[0].handle == handle


def test_the_schema_the_model_sees() -> None:
    functions = {tool.name: convert_to_openai_tool(tool)["function"] for tool in Phi3VisionToolkit().get_tools()}
    assert list(functions) == NAMES
    for function in functions.values():
        assert "image://sha256/" in function["description"]  # results carry handles for chaining
    describe = functions["describe_image"]["parameters"]["properties"]
    assert describe["detail"]["enum"] == ["brief", "normal", "detailed"]
    assert describe["image"]["description"] == IMAGE_REF
    columns = functions["read_table"]["parameters"]["properties"]["columns"]
    assert columns["anyOf"][0]["maxItems"] == 30
    compare = functions["compare_images"]["parameters"]["properties"]["images"]
    assert (compare["minItems"], compare["maxItems"]) == (2, 4)
    read = functions["read_text"]["parameters"]["properties"]["fields"]
    assert read["anyOf"][0]["items"] == {"type": "string"}
    ask = functions["ask_images"]["parameters"]
    assert ask["required"] == ["images", "question"]
    assert "JSON schema" in ask["properties"]["output_schema"]["description"]


def test_read_table_gives_a_markdown_table_as_content_and_the_table_as_artifact(
    fake_toolbox: Toolbox, sample_images: dict[str, Path]
) -> None:
    fake_toolbox.backend.answers.append(  # type: ignore[attr-defined]
        {"title": "Sales", "rows": [["North", 120, 135]], "units": None, "summary": "Two quarters."}
    )
    message = ReadTableTool(toolbox=fake_toolbox).invoke(
        tool_call("read_table", {"image": str(sample_images["table"]), "columns": "Region, Q1"})
    )
    assert message.status == "success"
    table = message.artifact
    assert isinstance(table, Table) and table.columns == ["Region", "Q1"] and table.rows == [["North", 120]]
    assert "| Region | Q1 |\n|---|---|\n| North | 120 |" in message.content
    assert table.to_csv() == "Region,Q1\nNorth,120\n"


def test_the_toolbox_is_not_serialized(fake_toolbox: Toolbox) -> None:
    tool = DescribeImageTool(toolbox=fake_toolbox)
    assert "toolbox" not in tool.model_dump()
    assert "toolbox" not in Phi3VisionToolkit(fake_toolbox).model_dump()
    assert "toolbox" not in tool.tool_call_schema.model_json_schema()["properties"]


# ---------------------------------------------------------------------------------------------------------------------
# The async path


def test_ainvoke_awaits_the_async_toolbox_method(sample_images: dict[str, Path]) -> None:
    class AsyncOnly(FakeBackend):
        def generate_sync(self, request: GenerationRequest) -> GenerationResult:
            raise AssertionError("the async path must not call the blocking method")

    backend = AsyncOnly()
    toolbox = Toolbox(backend, ImagePolicy(allowed_dirs=(sample_images["chart"].parent,)))
    tools = [cls(toolbox=toolbox) for cls in TOOLS]

    async def together() -> list[ToolMessage]:
        calls = [tool_call(tool.name, examples(sample_images)[tool.name]) for tool in tools]
        return list(await asyncio.gather(*(tool.ainvoke(call) for tool, call in zip(tools, calls, strict=True))))

    messages = asyncio.run(together())
    assert [m.status for m in messages] == ["success"] * len(TOOLS)
    assert len(backend.requests) == len(TOOLS)


def test_ainvoke_does_not_block_the_event_loop(tiny_toolbox: Toolbox, sample_images: dict[str, Path]) -> None:
    tool = DescribeImageTool(toolbox=tiny_toolbox)
    call = tool_call("describe_image", {"image": str(sample_images["scene_b"]), "detail": "detailed"})

    async def scenario() -> tuple[ToolMessage, list[float], float]:
        ticks: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            while not done.is_set():
                ticks.append(time.perf_counter())
                await asyncio.sleep(0.005)

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        start = time.perf_counter()
        message = await tool.ainvoke(call)
        elapsed = time.perf_counter() - start
        done.set()
        await task
        return message, ticks, elapsed

    message, ticks, elapsed = asyncio.run(scenario())
    assert message.status == "success" and isinstance(message.artifact, ImageDescription)
    assert elapsed > 0.1  # the tiny model really ran
    gaps = [b - a for a, b in zip(ticks, ticks[1:], strict=False)]
    assert len(ticks) >= 10, f"the loop ticked {len(ticks)} times in {elapsed:.2f} s"
    assert max(gaps) < elapsed / 2, f"the loop stalled for {max(gaps):.2f} s of {elapsed:.2f} s"


# ---------------------------------------------------------------------------------------------------------------------
# Errors the model can act on


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
def test_an_image_outside_the_allowed_dirs_is_an_error_message_not_an_exception(
    mode: str, fake_toolbox: Toolbox, tmp_path: Path, sample_images: dict[str, Path]
) -> None:
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(sample_images["cover"].read_bytes())
    tool = ReadTextTool(toolbox=fake_toolbox)
    call = tool_call("read_text", {"image": str(outside)})
    message = tool.invoke(call) if mode == "invoke" else asyncio.run(tool.ainvoke(call))

    assert isinstance(message, ToolMessage)
    assert message.status == "error" and message.tool_call_id == "call-1" and message.name == "read_text"
    assert message.content.startswith("read_text failed: ")
    assert "outside the allowed directories" in message.content
    assert "base64" in message.content  # says what to do instead
    assert fake_toolbox.backend.requests == []  # type: ignore[attr-defined]


def test_an_unknown_handle_is_an_error_message(fake_toolbox: Toolbox, sample_images: dict[str, Path]) -> None:
    unknown = "image://sha256/" + "0" * 64
    message = CompareImagesTool(toolbox=fake_toolbox).invoke(
        tool_call("compare_images", {"images": [unknown, str(sample_images["scene_a"])]})
    )
    assert message.status == "error"
    assert f"unknown image handle {unknown}" in message.content
    assert "send the image itself again" in message.content


def test_a_busy_model_says_to_retry(fake_toolbox: Toolbox, sample_images: dict[str, Path]) -> None:
    fake_toolbox.backend.error = BusyError("the model is busy (64 requests waiting)")  # type: ignore[attr-defined]
    message = DescribeImageTool(toolbox=fake_toolbox).invoke(
        tool_call("describe_image", {"image": str(sample_images["chart"])})
    )
    assert message.status == "error"
    assert message.content == (
        "describe_image failed: the model is busy (64 requests waiting). "
        "The vision model is busy: wait a few seconds, then call the tool again."
    )


def test_plain_invoke_returns_the_error_text_too(fake_toolbox: Toolbox) -> None:
    text = DescribeImageTool(toolbox=fake_toolbox).invoke({"image": "image://sha256/" + "1" * 64})
    assert isinstance(text, str) and text.startswith("describe_image failed: unknown image handle")


@pytest.mark.parametrize(
    ("cls", "args", "expected"),
    [
        (DescribeImageTool, {"image": "IMG", "detail": "huge"}, ["- detail:", "'brief', 'normal' or 'detailed'"]),
        (CompareImagesTool, {"images": ["IMG"]}, ["- images:", "at least 2 items", "Expected: 2 to 4 images"]),
        (AskImagesTool, {"images": ["IMG"]}, ["- question: Field required", "Expected: The question"]),
        (ReadTextTool, {"image": "IMG", "feilds": ["title"]}, ["- feilds: unknown argument", "image, fields"]),
        (AskImagesTool, {"images": ["IMG"] * 5, "question": "?"}, ["- images:", "at most 4 items"]),
    ],
    ids=["detail-enum", "compare-one-image", "ask-no-question", "misspelt-argument", "too-many-images"],
)
def test_invalid_arguments_are_explained_to_the_model(
    cls: type[BaseTool],
    args: dict[str, Any],
    expected: list[str],
    fake_toolbox: Toolbox,
    sample_images: dict[str, Path],
) -> None:
    tool = cls(toolbox=fake_toolbox)
    path = str(sample_images["cover"])
    args = {k: [path] * len(v) if isinstance(v, list) else path if v == "IMG" else v for k, v in args.items()}
    message = tool.invoke(tool_call(tool.name, args))

    assert isinstance(message, ToolMessage) and message.status == "error"
    assert message.content.startswith("Invalid arguments, nothing was run:")
    assert message.content.endswith("Fix them and call the tool again.")
    for text in expected:
        assert text in message.content
    assert len(message.content) < 600  # short enough to read
    assert fake_toolbox.backend.requests == []  # type: ignore[attr-defined]


def test_forgiving_argument_shapes(fake_toolbox: Toolbox, sample_images: dict[str, Path]) -> None:
    """Shapes models often send instead: one image as a string, fields as one string, a schema as JSON text."""
    ask = AskImagesTool(toolbox=fake_toolbox).invoke(
        tool_call(
            "ask_images",
            {
                "images": str(sample_images["chart"]),
                "question": "How many bars?",
                "output_schema": '{"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}',
            },
        )
    )
    assert ask.status == "success" and set(ask.artifact.answer) == {"n"}
    read = ReadTextTool(toolbox=fake_toolbox).invoke(
        tool_call("read_text", {"image": str(sample_images["cover"]), "fields": "title, author"})
    )
    assert read.status == "success" and list(read.artifact.fields) == ["title", "author"]


# ---------------------------------------------------------------------------------------------------------------------
# The toolkit, and nothing loads until a tool runs


def test_the_toolkit_gives_the_five_tools_of_the_table_sharing_one_toolbox(fake_toolbox: Toolbox) -> None:
    tools = Phi3VisionToolkit(fake_toolbox).get_tools()
    assert [tool.name for tool in tools] == NAMES == [cls.model_fields["name"].default for cls in TOOLS]
    assert all(tool.toolbox is fake_toolbox for tool in tools)  # type: ignore[attr-defined]
    assert all(tool.response_format == "content_and_artifact" for tool in tools)


def test_the_toolkit_builds_one_toolbox_from_settings_without_loading_a_model(
    tmp_path: Path, sample_images: dict[str, Path]
) -> None:
    settings = Settings(model=str(tmp_path), allowed_dirs=(sample_images["chart"].parent,))  # not a checkpoint
    toolkit = Phi3VisionToolkit(settings=settings)
    tools = toolkit.get_tools()
    assert toolkit.toolbox is not None
    assert all(tool.toolbox is toolkit.toolbox for tool in tools)  # type: ignore[attr-defined]
    # The model loads on the first call; here that fails, and the model is told so instead of the run crashing.
    message = tools[0].invoke(tool_call("describe_image", {"image": str(sample_images["chart"])}))
    assert message.status == "error"
    assert "no config.json" in message.content and "carry on without it" in message.content
    with pytest.raises(ValueError, match="either a toolbox or settings"):
        Phi3VisionToolkit(toolbox=toolkit.toolbox, settings=settings)


def test_constructing_tools_loads_nothing_until_the_first_call(
    monkeypatch: pytest.MonkeyPatch, fake_toolbox: Toolbox, sample_images: dict[str, Path]
) -> None:
    def not_yet() -> Toolbox:
        raise AssertionError("default_toolbox() was called before any tool ran")

    monkeypatch.setattr(api, "default_toolbox", not_yet)
    tools = [*Phi3VisionToolkit().get_tools(), *(cls() for cls in TOOLS)]
    assert all(tool.toolbox is None for tool in tools)  # type: ignore[attr-defined]

    calls: list[int] = []

    def default() -> Toolbox:
        calls.append(1)
        return fake_toolbox

    monkeypatch.setattr(api, "default_toolbox", default)
    message = tools[1].invoke(tool_call("read_text", {"image": str(sample_images["cover"])}))
    assert message.status == "success"
    assert tools[1].toolbox is fake_toolbox  # type: ignore[attr-defined]
    asyncio.run(tools[0].ainvoke({"image": str(sample_images["chart"])}))
    assert tools[0].toolbox is fake_toolbox and len(calls) == 2  # type: ignore[attr-defined]


def test_without_langchain_core_the_import_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "langchain_core" or m.startswith("langchain_core.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "langchain_core", None)  # makes any langchain_core import fail
    spec = importlib.util.spec_from_file_location("phi3v_langchain_probe", REPO / "phi3v_tools" / "langchain.py")
    assert spec is not None and spec.loader is not None
    # The package is not on PyPI: the hint names the extra's own requirements, which install anywhere.
    with pytest.raises(
        OptionalDependencyError, match=r"pip install 'langchain-core<2,>=1.8' 'langchain<2,>=1.0'"
    ) as info:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert info.value.package == "langchain-core"


def test_importing_the_package_does_not_import_langchain() -> None:
    code = "import sys, phi3v_tools; print(sorted(m for m in sys.modules if m.startswith('langchain')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------------------------------
# A real agent loop


class ScriptedChatModel(BaseChatModel):
    """A tool-calling chat model that follows a script: step k sees the conversation and writes message k."""

    steps: list[Callable[[list[BaseMessage]], AIMessage]]
    seen: list[list[BaseMessage]] = Field(default_factory=list)
    bound: list[str] = Field(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> ScriptedChatModel:
        self.bound = [tool.name for tool in tools]
        return self

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        step = self.steps[len(self.seen)]
        self.seen.append(list(messages))
        return ChatResult(generations=[ChatGeneration(message=step(messages))])


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
def test_an_agent_chains_read_text_and_compare_images_through_a_handle(
    mode: str, tiny_toolbox: Toolbox, sample_images: dict[str, Path]
) -> None:
    cover, scene = str(sample_images["cover"]), str(sample_images["scene_a"])
    handles: list[str] = []

    def read(messages: list[BaseMessage]) -> AIMessage:
        args = {"image": cover, "fields": ["title", "author"]}
        return AIMessage("", tool_calls=[tool_call("read_text", args, "call-read")])

    def compare(messages: list[BaseMessage]) -> AIMessage:
        assert isinstance(messages[-1], ToolMessage) and messages[-1].name == "read_text"
        handles.append(HANDLE.search(str(messages[-1].content)).group(0))  # the model reads the handle
        return AIMessage("", tool_calls=[tool_call("compare_images", {"images": [handles[0], scene]}, "call-cmp")])

    def answer(messages: list[BaseMessage]) -> AIMessage:
        return AIMessage("The cover and the scene differ in every way.")

    model = ScriptedChatModel(steps=[read, compare, answer])
    agent = create_agent(model, Phi3VisionToolkit(tiny_toolbox).get_tools())
    state = {"messages": [HumanMessage("Read the cover, then compare it with the scene.")]}
    out = agent.invoke(state) if mode == "invoke" else asyncio.run(agent.ainvoke(state))

    assert model.bound == NAMES
    messages = out["messages"]
    assert [type(m).__name__ for m in messages] == [
        "HumanMessage",
        "AIMessage",
        "ToolMessage",
        "AIMessage",
        "ToolMessage",
        "AIMessage",
    ]
    read_message, compare_message = messages[2], messages[4]
    assert read_message.status == compare_message.status == "success"
    assert isinstance(read_message.artifact, TextReading)
    assert read_message.artifact.images[0].handle == handles[0]
    comparison = compare_message.artifact
    assert isinstance(comparison, ImageComparison)
    assert [image.handle for image in comparison.images][0] == handles[0]
    assert comparison.call.cached_images >= 1  # the cover's features were reused, not encoded again
    final = messages[-1]
    assert isinstance(final, AIMessage) and not final.tool_calls and final.content


def test_an_agent_run_goes_on_after_tool_errors(
    fake_toolbox: Toolbox, tmp_path: Path, sample_images: dict[str, Path]
) -> None:
    outside = tmp_path / "outside.png"
    outside.write_bytes(sample_images["chart"].read_bytes())
    wrong = AIMessage("", tool_calls=[tool_call("compare_images", {"images": [str(outside)]}, "call-1")])
    denied = AIMessage("", tool_calls=[tool_call("compare_images", {"images": [str(outside)] * 2}, "call-2")])
    model = ScriptedChatModel(steps=[lambda m: wrong, lambda m: denied, lambda m: AIMessage("I could not look.")])
    out = create_agent(model, Phi3VisionToolkit(fake_toolbox).get_tools()).invoke(
        {"messages": [HumanMessage("Compare these.")]}
    )
    results = [m for m in out["messages"] if isinstance(m, ToolMessage)]
    assert [m.status for m in results] == ["error", "error"]
    assert "- images: List should have at least 2 items" in results[0].content
    assert "outside the allowed directories" in results[1].content
    last_seen = model.seen[2][-1]  # the model read the error, and the run went on to its answer
    assert isinstance(last_seen, ToolMessage) and last_seen.tool_call_id == "call-2" and last_seen.status == "error"
    assert out["messages"][-1].content == "I could not look."


@pytest.mark.slow
def test_the_agent_chain_example_runs(tiny_dir: Path) -> None:
    env = {**os.environ, "PHI3V_MODEL": str(tiny_dir)}
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "agent_chain.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert f"model: {tiny_dir}" in out
    assert "1. model -> read_text({" in out and "'fields': ['title', 'author']" in out
    assert re.search(r"2\. model -> compare_images\(\{'images': \['image://sha256/[0-9a-f]{64}'", out)
    assert re.search(r"\(ImageComparison; cached images: [1-9]", out)
    assert "Final answer: The cover reads: " in out


# ---------------------------------------------------------------------------------------------------------------------
# PDF documents


class _PageEvents(BaseCallbackHandler):
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
        self.events.append((name, data))


def test_a_pdf_through_a_langchain_tool_gives_per_page_results_handles_and_a_page_event_each(
    fake_toolbox: Toolbox, demo_pdf: Path
) -> None:
    pytest.importorskip("pypdfium2")
    handler = _PageEvents()
    message = ReadTableTool(toolbox=fake_toolbox).invoke(
        tool_call("read_table", {"image": str(demo_pdf), "pages": "1-3"}), config={"callbacks": [handler]}
    )
    assert message.status == "success", message.content
    table = message.artifact
    assert isinstance(table, Table) and table.pages is not None and [p.page for p in table.pages] == [1, 2, 3]
    assert HANDLE.findall(message.content) == [p.handle for p in table.pages]
    assert handler.events == [(PAGE_EVENT, {"tool": "read_table", "done": done, "total": 3}) for done in (0, 1, 2, 3)]


def test_read_text_on_a_pdf_streams_page_events_to_astream_events_on_the_tiny_model(
    local_tiny_toolbox: Toolbox, demo_pdf: Path
) -> None:
    pytest.importorskip("pypdfium2")
    tool = ReadTextTool(toolbox=local_tiny_toolbox)

    async def run() -> list[dict[str, Any]]:
        return [event async for event in tool.astream_events({"image": str(demo_pdf)}, version="v2")]

    events = asyncio.run(run())
    pages = [event["data"] for event in events if event["event"] == "on_custom_event" and event["name"] == PAGE_EVENT]
    assert pages == [{"tool": "read_text", "done": 2, "total": 3}, {"tool": "read_text", "done": 3, "total": 3}]
    (end,) = [event for event in events if event["event"] == "on_tool_end"]
    assert "--- page 1 (text layer) ---\nInvoice INV-2041" in end["data"]["output"]


def test_a_hostile_pdf_is_an_error_tool_message_an_agent_can_act_on(fake_toolbox: Toolbox, demo_pdf: Path) -> None:
    pytest.importorskip("pypdfium2")
    broken = demo_pdf.with_name("broken.pdf")
    broken.write_bytes(b"%PDF-1.7\n" + b"\x00garbage" * 100)
    message = ReadTextTool(toolbox=fake_toolbox).invoke(tool_call("read_text", {"image": str(broken)}))
    assert message.status == "error" and "broken.pdf" in message.content and "Traceback" not in message.content
    assert ReadTextTool(toolbox=fake_toolbox).invoke({"image": str(demo_pdf), "pages": "2"}).startswith("--- page 2")
