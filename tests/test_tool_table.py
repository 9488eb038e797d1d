"""One table of tools drives every surface: for each entry of ``tool_specs()``, the LangChain tool, the MCP tool
and the CLI command show its name, description, arguments (with their limits) and result; and the settings'
``max_compare`` (``PHI3V_MAX_COMPARE``) reaches all three."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from langchain_core.messages import ToolCall
from mcp import Client
from phi3v_mcp.server import create_server

import phi3v_tools.cli
from phi3v_tools import api
from phi3v_tools.images import ImagePolicy
from phi3v_tools.langchain import TOOL_CLASSES, CompareImagesTool, Phi3VisionToolkit
from phi3v_tools.settings import Settings
from phi3v_tools.tools import ImageComparison, Toolbox, ToolSpec, tool_specs
from tests.fakes import FakeBackend

SPECS = tool_specs()
IDS = [spec.name for spec in SPECS]
LIMITS = ("minItems", "maxItems", "minLength", "maxLength", "enum", "default")


def _fields(spec: ToolSpec) -> dict[str, dict[str, Any]]:
    """The arguments' JSON schema, per field, as the table defines it (an optional list: its list branch)."""
    properties = spec.args.model_json_schema()["properties"]
    return {name: _branch(schema) for name, schema in properties.items()}


def _branch(schema: dict[str, Any]) -> dict[str, Any]:
    """``X | None`` as its ``X`` part, with the field's own keys (description, default) kept."""
    if "anyOf" in schema:
        inner = next(s for s in schema["anyOf"] if s.get("type") != "null")
        return {**inner, **{k: v for k, v in schema.items() if k != "anyOf"}}
    return schema


def _required(spec: ToolSpec) -> list[str]:
    return [name for name, info in spec.args.model_fields.items() if info.is_required()]


@pytest.fixture
def settings(sample_images: dict[str, Path]) -> Settings:
    return Settings(model="tiny", allowed_dirs=(sample_images["chart"].parent,), allow_urls=False)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No PHI3V_* from the environment; the default settings are read again in each test."""
    for name in [n for n in os.environ if n.startswith("PHI3V_")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(api, "_SETTINGS", None)
    monkeypatch.setattr(api, "_DEFAULT", None)
    yield


# ---------------------------------------------------------------------------------------------------------------------
# Each surface agrees with the table


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_the_langchain_tool_takes_name_description_arguments_and_result_from_the_table(
    spec: ToolSpec, toolbox: Toolbox
) -> None:
    tool = next(t for t in Phi3VisionToolkit(toolbox).get_tools() if t.name == spec.name)
    assert type(tool) is TOOL_CLASSES[spec.name]
    assert tool.description == spec.model_description
    assert tool.args_schema is spec.args
    schema = tool.tool_call_schema.model_json_schema()  # type: ignore[union-attr]
    assert {k: _branch(v) for k, v in schema["properties"].items()} == _fields(spec)
    assert schema.get("required", []) == _required(spec)


@pytest.mark.anyio
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
async def test_the_mcp_tool_takes_name_description_arguments_and_result_from_the_table(
    spec: ToolSpec, toolbox: Toolbox, settings: Settings
) -> None:
    async with Client(create_server(settings, toolbox)) as client:
        listed = {tool.name: tool for tool in (await client.list_tools()).tools}
    assert list(listed) == IDS
    tool = listed[spec.name]
    assert tool.description == spec.model_description and tool.title == spec.title
    properties = tool.input_schema["properties"]
    assert list(properties) == list(spec.args.model_fields)
    assert sorted(tool.input_schema.get("required", [])) == sorted(_required(spec))
    for name, expected in _fields(spec).items():
        got = _branch(properties[name])
        assert got["description"] == expected["description"], name
        assert {k: got.get(k) for k in LIMITS} == {k: expected.get(k) for k in LIMITS}, name
    assert tool.output_schema is not None
    assert set(spec.result.model_fields) <= set(tool.output_schema["properties"])
    assert tool.annotations is not None and tool.annotations.read_only_hint is spec.read_only


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_the_cli_command_takes_name_help_and_arguments_from_the_table(spec: ToolSpec) -> None:
    command = phi3v_tools.cli.main.commands[phi3v_tools.cli.COMMAND_NAMES[spec.name]]
    assert command.get_short_help_str() == spec.title
    names = {param.name for param in command.params}
    assert set(spec.args.model_fields) <= names
    for param in command.params:
        if isinstance(param, click.Option) and param.name in spec.args.model_fields:
            info = spec.args.model_fields[param.name]
            assert param.required == info.is_required(), param.name
            if param.help is not None:
                assert param.help == info.description, param.name
    shown = CliRunner().invoke(phi3v_tools.cli.main, [command.name or "", "--help"])
    assert shown.exit_code == 0
    assert " ".join(spec.description.split()[:6]) in " ".join(shown.output.split())
    assert ("--csv" in shown.output) is hasattr(spec.result, "to_csv")


def test_the_surfaces_list_the_tools_in_the_same_order(toolbox: Toolbox) -> None:
    assert [tool.name for tool in Phi3VisionToolkit(toolbox).get_tools()] == IDS
    assert list(TOOL_CLASSES) == IDS
    cli_order = [name for name in phi3v_tools.cli.main.commands if name in phi3v_tools.cli.COMMAND_NAMES.values()]
    assert cli_order == [phi3v_tools.cli.COMMAND_NAMES[name] for name in IDS]


# ---------------------------------------------------------------------------------------------------------------------
# PHI3V_MAX_COMPARE=6 on every surface


def _six(sample_images: dict[str, Path]) -> list[str]:
    names = ["chart", "cover", "scene_a", "scene_b", "table", "chart"]
    return [str(sample_images[name]) for name in names]


def test_max_compare_6_reaches_the_langchain_tools_from_a_toolbox_and_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, sample_images: dict[str, Path]
) -> None:
    toolbox = Toolbox(FakeBackend(), ImagePolicy(allowed_dirs=(sample_images["chart"].parent,)), max_compare=6)
    compare = next(t for t in Phi3VisionToolkit(toolbox).get_tools() if t.name == "compare_images")
    call = ToolCall(name="compare_images", args={"images": _six(sample_images)}, id="1", type="tool_call")
    message = compare.invoke(call)
    assert message.status == "success" and isinstance(message.artifact, ImageComparison)
    assert len(message.artifact.images) == 6
    seven = compare.invoke({**call, "args": {"images": [*_six(sample_images), str(sample_images["chart"])]}})
    assert seven.status == "error" and "at most 6 items" in seven.content
    assert "2 to 6 images" in compare.description

    monkeypatch.setenv("PHI3V_MAX_COMPARE", "6")  # no toolbox: the limit the default toolbox will have
    from_env = CompareImagesTool()
    assert from_env.args_schema.model_json_schema()["properties"]["images"]["maxItems"] == 6  # type: ignore[union-attr]
    assert from_env.toolbox is None  # reading the limit built nothing


@pytest.mark.anyio
async def test_max_compare_6_reaches_the_mcp_tools(settings: Settings, sample_images: dict[str, Path]) -> None:
    six = replace(settings, max_compare=6)
    toolbox = Toolbox(FakeBackend(), six.image_policy(), max_compare=six.max_compare)
    async with Client(create_server(six, toolbox)) as client:
        listed = {tool.name: tool for tool in (await client.list_tools()).tools}
        result = await client.call_tool("compare_images", {"images": _six(sample_images)})
        assert client.instructions is not None and "1 to 6 images" in client.instructions
    assert listed["compare_images"].input_schema["properties"]["images"]["maxItems"] == 6
    assert listed["ask_images"].input_schema["properties"]["images"]["maxItems"] == 6
    assert not result.is_error and result.structured_content is not None
    assert len(result.structured_content["images"]) == 6


def test_max_compare_6_reaches_the_cli_help_and_its_calls(
    monkeypatch: pytest.MonkeyPatch, sample_images: dict[str, Path]
) -> None:
    built: list[Settings] = []

    def fake_toolbox(settings: Settings) -> Toolbox:
        built.append(settings)
        return Toolbox(FakeBackend(), settings.image_policy(), max_compare=settings.max_compare)

    monkeypatch.setattr(api, "toolbox_from_settings", fake_toolbox)
    env = {"PHI3V_MAX_COMPARE": "6", "PHI3V_ALLOWED_DIRS": str(sample_images["chart"].parent)}
    runner = CliRunner()
    shown = runner.invoke(phi3v_tools.cli.main, ["compare", "--help"], env=env)
    assert "Compare 2 to 6 images" in " ".join(shown.output.split())
    done = runner.invoke(phi3v_tools.cli.main, ["compare", *_six(sample_images), "--json"], env=env)
    assert done.exit_code == 0, done.output
    assert len(ImageComparison.model_validate_json(done.stdout).images) == 6
    assert built[-1].max_compare == 6
    refused = runner.invoke(phi3v_tools.cli.main, ["compare", *_six(sample_images), str(sample_images["chart"])])
    assert refused.exit_code == 1 and "2 to 4" in refused.stderr  # without the variable: the default limit
