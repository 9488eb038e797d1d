"""The four tools (phi3v_tools.tools): the requests they build (over FakeBackend), their results, their argument
checks, and a run of each over the tiny real model (random but valid output), sync and async, plus the Python API."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from PIL import Image
from pydantic import BaseModel

import phi3v_tools
from phi3v_tools import api
from phi3v_tools.errors import ImageError, Phi3VToolsError, PromptError
from phi3v_tools.feature_cache import image_digest
from phi3v_tools.images import HANDLE_PREFIX, ImagePolicy
from phi3v_tools.model.processing import IMAGE_TAG
from phi3v_tools.settings import Settings
from phi3v_tools.tools import (
    Answer,
    ImageComparison,
    ImageDescription,
    TextReading,
    Toolbox,
    _CompareAnswer,
    _DescribeAnswer,
    _ReadAnswer,
)
from tests.fakes import FakeBackend

# ---------------------------------------------------------------------------------------------------------------------
# Helpers


class BarCount(BaseModel):
    bars: int
    tallest: str


DICT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"colour": {"type": "string", "enum": ["red", "green", "blue"]}, "count": {"type": "integer"}},
    "required": ["colour", "count"],
    "additionalProperties": False,
}

TOOL_CLASSES = (ImageDescription, TextReading, ImageComparison, Answer)


def _digest(path: Path) -> str:
    with Image.open(path) as image:
        return image_digest(image.convert("RGB"))


def _size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def _prompt(fake: FakeBackend, index: int = -1) -> str:
    request = fake.requests[index]
    assert len(request.messages) == 1 and request.messages[0]["role"] == "user"
    return request.messages[0]["content"]


def _check_meta(result: Any, paths: list[Path], model: str) -> None:
    """The parts of a result that the tool (not the model) fills in."""
    assert [(i.width, i.height) for i in result.images] == [_size(p) for p in paths]
    assert [i.handle for i in result.images] == [HANDLE_PREFIX + _digest(p) for p in paths]
    assert result.call.model == model
    assert result.call.prompt_tokens > 0 and result.call.completion_tokens > 0
    seconds = result.call.seconds
    assert set(seconds) == {"load", "queue", "preprocess", "vision", "prefill", "decode", "other", "total"}
    assert all(v >= 0 for v in seconds.values())
    assert sum(v for k, v in seconds.items() if k != "total") == pytest.approx(seconds["total"], abs=1e-3)


# ---------------------------------------------------------------------------------------------------------------------
# Requests and results over the fake backend


def test_describe_image_builds_its_request(toolbox: Toolbox, fake: FakeBackend, sample_images: dict[str, Path]) -> None:
    chart = sample_images["chart"]
    result = toolbox.describe_image(chart, "Which quarter had the most revenue?", detail="brief")
    request = fake.requests[0]
    prompt = _prompt(fake)
    assert "Which quarter had the most revenue?" in prompt
    assert "one or two sentences" in prompt and "kind of image" in prompt and "visible text" in prompt
    assert request.json_schema == _DescribeAnswer.model_json_schema()
    assert request.image_digests == [_digest(chart)]
    assert len(request.images) == 1 and request.images[0].mode == "RGB"
    assert request.max_new_tokens == 160
    assert request.num_crops is None  # one image: the runner's default
    assert isinstance(result, ImageDescription)
    _check_meta(result, [chart], "fake-phi3v")
    assert result.call.prompt_tokens == 100 and result.call.completion_tokens == 10
    assert result.call.seconds["decode"] == 0.005 and result.call.seconds["total"] >= 0.01  # the engine's 0.01 and more


@pytest.mark.parametrize(
    ("detail", "tokens", "words"), [("normal", 400, "short paragraph"), ("detailed", 800, "detail")]
)
def test_describe_detail_sets_length_and_budget(
    toolbox: Toolbox, fake: FakeBackend, sample_images: dict[str, Path], detail: Any, tokens: int, words: str
) -> None:
    toolbox.describe_image(sample_images["scene_a"], detail=detail)
    assert fake.requests[0].max_new_tokens == tokens
    assert _prompt(fake).startswith("Describe this image") and words in _prompt(fake)


def test_read_text_without_fields(toolbox: Toolbox, fake: FakeBackend, sample_images: dict[str, Path]) -> None:
    cover = sample_images["cover"]
    result = toolbox.read_text(cover)
    request = fake.requests[0]
    assert "Transcribe" in _prompt(fake) and "fields" not in _prompt(fake)
    assert request.json_schema == _ReadAnswer.model_json_schema()
    assert request.image_digests == [_digest(cover)]
    assert isinstance(result, TextReading) and result.fields is None
    _check_meta(result, [cover], "fake-phi3v")


def test_read_text_with_fields_constrains_exactly_those_fields(
    toolbox: Toolbox, fake: FakeBackend, sample_images: dict[str, Path]
) -> None:
    names = ["title", "author", "publication year"]
    result = toolbox.read_text(sample_images["cover"], fields=names)
    schema = fake.requests[0].json_schema
    assert schema is not None and "fields" in schema["required"]
    fields = schema["properties"]["fields"]
    assert fields["type"] == "object"
    assert list(fields["properties"]) == names
    assert fields["required"] == names
    assert fields["additionalProperties"] is False
    for value_schema in fields["properties"].values():  # each value: a string, or null when not in the image
        jsonschema.validate("x", value_schema)
        jsonschema.validate(None, value_schema)
    # the rest of the schema is the plain read_text schema
    plain = _ReadAnswer.model_json_schema()
    assert {k: v for k, v in schema["properties"].items() if k != "fields"} == plain["properties"]
    assert all(name in _prompt(fake) for name in names)
    assert result.fields is not None and list(result.fields) == names
    # a full, valid answer passes through unchanged; a value may be null
    answer = {"text": "THE BOOK\nJ. Doe", "lines": ["THE BOOK", "J. Doe"], "fields": dict.fromkeys(names)}
    answer["fields"]["title"] = "THE BOOK"
    jsonschema.validate(answer, schema)
    fake.answers.append(answer)
    again = toolbox.read_text(sample_images["cover"], fields=names)
    assert again.fields == answer["fields"]
    assert "title: THE BOOK" in again.to_text() and "author: (not found)" in again.to_text()


def test_field_names_may_be_a_comma_separated_string_and_duplicates_collapse(
    toolbox: Toolbox, fake: FakeBackend, sample_images: dict[str, Path]
) -> None:
    result = toolbox.read_text(sample_images["cover"], fields="title, author,title")  # type: ignore[arg-type]
    assert fake.requests[0].json_schema["properties"]["fields"]["required"] == ["title", "author"]
    assert result.fields is not None and list(result.fields) == ["title", "author"]
    twenty = [f"field_{i}" for i in range(20)]
    assert list(toolbox.read_text(sample_images["cover"], fields=twenty).fields or {}) == twenty


@pytest.mark.parametrize(
    "fields",
    [["a.b"], ["1st"], ["   "], ["x" * 65], ["name;drop"], ["ok", "bad!"], ["new\nline"], ["quote'"]],
    ids=["dot", "digit-first", "blank", "too-long", "semicolon", "one-bad", "newline", "quote"],
)
def test_invalid_field_names_are_refused(
    toolbox: Toolbox, fake: FakeBackend, sample_images: dict[str, Path], fields: list[str]
) -> None:
    with pytest.raises(PromptError, match="letters, digits, spaces, '_' or '-', at most 64 characters"):
        toolbox.read_text(sample_images["cover"], fields=fields)
    assert fake.requests == []


def test_more_than_20_fields_are_refused(toolbox: Toolbox, fake: FakeBackend, sample_images: dict[str, Path]) -> None:
    with pytest.raises(PromptError, match="give 1 to 20 field names, got 21"):
        toolbox.read_text(sample_images["cover"], fields=[f"f{i}" for i in range(21)])
    assert fake.requests == []


def test_compare_images_builds_its_request(toolbox: Toolbox, fake: FakeBackend, sample_images: dict[str, Path]) -> None:
    paths = [sample_images["scene_a"], sample_images["scene_b"]]
    result = toolbox.compare_images(paths, "What moved?")
    request = fake.requests[0]
    assert "What moved?" in _prompt(fake) and "similarities" in _prompt(fake) and "differences" in _prompt(fake)
    assert request.json_schema == _CompareAnswer.model_json_schema()
    assert request.image_digests == [_digest(p) for p in paths]
    assert request.num_crops == 4
    assert isinstance(result, ImageComparison)
    _check_meta(result, paths, "fake-phi3v")
    four = [sample_images[k] for k in ("chart", "cover", "scene_a", "scene_b")]
    assert len(toolbox.compare_images(four).images) == 4


@pytest.mark.parametrize("count", [1, 5])
def test_compare_takes_2_to_4_images(
    toolbox: Toolbox, fake: FakeBackend, sample_images: dict[str, Path], count: int
) -> None:
    paths = [sample_images[k] for k in ("chart", "cover", "scene_a", "scene_b", "chart")][:count]
    with pytest.raises(PromptError, match=f"{count} images? given; this tool takes 2 to 4"):
        toolbox.compare_images(paths)
    with pytest.raises(PromptError, match="takes 2 to 4"):
        toolbox.compare_images(sample_images["chart"])  # type: ignore[arg-type]  # one image, not a list
    assert fake.requests == []


def test_ask_images_with_a_pydantic_model(toolbox: Toolbox, fake: FakeBackend, sample_images: dict[str, Path]) -> None:
    chart = sample_images["chart"]
    fake.answers.append({"bars": 4, "tallest": "Q4"})
    result = toolbox.ask_images(chart, "How many bars are there?", BarCount)
    request = fake.requests[0]
    assert request.json_schema == BarCount.model_json_schema()
    assert _prompt(fake) == "How many bars are there?"
    assert request.image_digests == [_digest(chart)]
    assert request.num_crops is None
    assert isinstance(result, Answer) and result.answer == {"bars": 4, "tallest": "Q4"}
    assert BarCount.model_validate(result.answer).bars == 4
    assert json.loads(result.to_text()) == {"bars": 4, "tallest": "Q4"}
    _check_meta(result, [chart], "fake-phi3v")


def test_ask_images_with_a_dict_schema(toolbox: Toolbox, fake: FakeBackend, sample_images: dict[str, Path]) -> None:
    paths = [sample_images["scene_a"], sample_images["scene_b"]]
    result = toolbox.ask_images(paths, "Which colour is the ball, and how many balls?", DICT_SCHEMA)
    request = fake.requests[0]
    assert request.json_schema == DICT_SCHEMA
    assert request.num_crops == 4  # several images
    assert request.image_digests == [_digest(p) for p in paths]
    jsonschema.validate(result.answer, DICT_SCHEMA)
    assert result.to_text()


def test_ask_images_without_a_schema_answers_text(
    toolbox: Toolbox, fake: FakeBackend, sample_images: dict[str, Path]
) -> None:
    result = toolbox.ask_images([sample_images["chart"]], "What is this?")
    assert fake.requests[0].json_schema is None
    assert result.answer == "a fake answer" and result.to_text() == "a fake answer"


def test_ask_images_needs_a_question(toolbox: Toolbox, fake: FakeBackend, sample_images: dict[str, Path]) -> None:
    for question in ("", "   \n"):
        with pytest.raises(PromptError, match="needs a question"):
            toolbox.ask_images(sample_images["chart"], question)
    with pytest.raises(PromptError, match="5 images given; this tool takes 1 to 4"):
        toolbox.ask_images([sample_images["chart"]] * 5, "Which?")
    assert fake.requests == []


def test_results_carry_handles_that_work_in_the_next_call(
    toolbox: Toolbox, fake: FakeBackend, sample_images: dict[str, Path]
) -> None:
    first = toolbox.describe_image(sample_images["chart"])
    handle = first.images[0].handle
    second = toolbox.ask_images(handle, "And the axis labels?")
    assert second.images[0] == first.images[0]
    assert fake.requests[1].image_digests == fake.requests[0].image_digests


REALISTIC = {
    "describe": {
        "description": "A bar chart of revenue by quarter.",
        "objects": ["bars", "axis"],
        "kind": "chart",
        "visible_text": "Revenue",
    },
    "read": {"text": "THE BOOK\nJ. Doe", "lines": ["THE BOOK", "J. Doe"]},
    "compare": {"summary": "The same scene; the ball moved.", "similarities": ["tree"], "differences": ["ball"]},
    "ask": "Four bars.",
}


def _call(toolbox: Toolbox, tool: str, sample_images: dict[str, Path]) -> Any:
    if tool == "describe":
        return toolbox.describe_image(sample_images["chart"])
    if tool == "read":
        return toolbox.read_text(sample_images["cover"])
    if tool == "compare":
        return toolbox.compare_images([sample_images["scene_a"], sample_images["scene_b"]])
    return toolbox.ask_images(sample_images["chart"], "How many bars?")


@pytest.mark.parametrize("tool", ["describe", "read", "compare", "ask"])
def test_to_text_is_concise_and_carries_the_answer(
    toolbox: Toolbox, fake: FakeBackend, sample_images: dict[str, Path], tool: str
) -> None:
    fake.answers.append(REALISTIC[tool])
    text = _call(toolbox, tool, sample_images).to_text()
    assert text.strip() and len(text) < 500
    assert "image://" not in text and "prompt_tokens" not in text  # metadata stays in the structured result
    first = REALISTIC[tool] if isinstance(REALISTIC[tool], str) else next(iter(REALISTIC[tool].values()))
    assert first in text


@pytest.mark.parametrize(
    "tool",
    [
        "describe",
        "read",
        "compare",
        "ask",
    ],
)
def test_to_text_is_never_empty_even_for_an_empty_answer(
    toolbox: Toolbox, fake: FakeBackend, sample_images: dict[str, Path], tool: str
) -> None:
    """FakeBackend's default answer is the smallest schema-valid value: empty strings and lists."""
    assert _call(toolbox, tool, sample_images).to_text().strip()


def test_an_unknown_detail_is_refused(toolbox: Toolbox, fake: FakeBackend, sample_images: dict[str, Path]) -> None:
    with pytest.raises(PromptError, match="detail must be one of brief, normal, detailed, not 'huge'"):
        toolbox.describe_image(sample_images["chart"], detail="huge")  # type: ignore[arg-type]
    assert fake.requests == []


def test_image_tags_in_questions_are_removed(
    toolbox: Toolbox, fake: FakeBackend, sample_images: dict[str, Path]
) -> None:
    question = "What is in <|image_1|> compared with <|image_2|>?<|image_12|>"
    toolbox.describe_image(sample_images["chart"], question)
    toolbox.compare_images([sample_images["scene_a"], sample_images["scene_b"]], question)
    toolbox.ask_images(sample_images["chart"], question)
    for request in fake.requests:
        prompt = request.messages[0]["content"]
        assert "<|image_" not in prompt
        assert "What is in" in prompt and "compared with" in prompt


def test_a_question_of_only_image_tags_is_no_question(
    toolbox: Toolbox, fake: FakeBackend, sample_images: dict[str, Path]
) -> None:
    with pytest.raises(PromptError, match="needs a question"):
        toolbox.ask_images(sample_images["chart"], "<|image_1|> <|image_2|>")


def test_a_question_over_4000_characters_is_refused(
    toolbox: Toolbox, fake: FakeBackend, sample_images: dict[str, Path]
) -> None:
    long = "why " * 1000 + "?"  # 4001 characters
    with pytest.raises(PromptError, match="4001 characters; keep it under 4000"):
        toolbox.describe_image(sample_images["chart"], long)
    with pytest.raises(PromptError, match="4000"):
        toolbox.compare_images([sample_images["scene_a"], sample_images["scene_b"]], long)
    with pytest.raises(PromptError, match="4000"):
        toolbox.ask_images(sample_images["chart"], long)
    assert fake.requests == []
    toolbox.ask_images(sample_images["chart"], "x" * 4000)  # exactly at the limit is fine


def test_a_nested_image_tag_cannot_survive_the_cleaning(
    toolbox: Toolbox, fake: FakeBackend, sample_images: dict[str, Path]
) -> None:
    """Removing ``<|image_1|>`` from ``<|ima<|image_1|>ge_1|>`` would form a new tag: each tag becomes a space."""
    for question in ("<|ima<|image_1|>ge_1|>", "<|image_<|image_2|>1|> what?", "<<|image_1|>|image_1|>|>"):
        toolbox.describe_image(sample_images["chart"], question)
        assert IMAGE_TAG.search(fake.requests[-1].messages[0]["content"]) is None, question


@pytest.mark.parametrize(
    ("call", "problem"),
    [
        (lambda tb, img: tb.describe_image(img, question=123), "question must be text or null, not int"),
        (lambda tb, img: tb.describe_image(img, detail=["brief"]), "detail must be one of brief, normal, detailed"),
        (lambda tb, img: tb.describe_image(img, question="a \ud800 b"), "lone surrogate '\\ud800' at character 2"),
        (lambda tb, img: tb.compare_images(None), "images must be a list of image references, not NoneType"),
        (lambda tb, img: tb.compare_images({"a": img}), "images must be a list of image references, not dict"),
        (lambda tb, img: tb.compare_images([img, img], question=["x"]), "question must be text or null, not list"),
        (lambda tb, img: tb.read_text(img, fields=7), "fields must be a list of field names, not int"),
        (lambda tb, img: tb.read_text(img, fields=[1, 2]), "field names must be strings, not int"),
        (lambda tb, img: tb.ask_images(img, None), "question must be text, not NoneType"),
        (lambda tb, img: tb.ask_images(img, b"bytes?"), "question must be text, not bytes"),
        (lambda tb, img: tb.ask_images(img, "q", output_schema=[1]), "schema must be a JSON object"),
        (lambda tb, img: tb.ask_images(None, "q"), "images must be a list of image references, not NoneType"),
    ],
    ids=[
        "question-int",
        "detail-list",
        "question-surrogate",
        "compare-none",
        "compare-dict",
        "compare-question-list",
        "fields-int",
        "fields-ints",
        "ask-question-none",
        "ask-question-bytes",
        "schema-list",
        "ask-images-none",
    ],
)
def test_wrong_argument_types_in_the_python_api_are_prompt_errors_naming_the_argument(
    toolbox: Toolbox, fake: FakeBackend, sample_images: dict[str, Path], call: Any, problem: str
) -> None:
    with pytest.raises(PromptError, match=re.escape(problem)):
        call(toolbox, sample_images["chart"])
    assert fake.requests == []


def test_images_of_a_refused_call_are_not_kept_for_handles(fake: FakeBackend, sample_images: dict[str, Path]) -> None:
    toolbox = Toolbox(fake, ImagePolicy(allowed_dirs=(sample_images["chart"].parent,)))
    fake.error = PromptError("refused after the images were decoded")
    for _ in range(3):
        with pytest.raises(PromptError):
            toolbox.compare_images([sample_images["scene_a"], sample_images["scene_b"]])
    assert toolbox.store.get(image_digest(Image.open(sample_images["scene_a"]).convert("RGB"))) is None
    fake.error = None
    result = toolbox.compare_images([sample_images["scene_a"], sample_images["scene_b"]])
    assert toolbox.describe_image(result.images[0].handle).images[0].handle == result.images[0].handle


def test_tool_errors_are_phi3v_errors(toolbox: Toolbox, fake: FakeBackend, tmp_path: Path) -> None:
    (tmp_path / "elsewhere.png").write_bytes(b"not used")
    with pytest.raises(ImageError, match="outside the allowed directories") as info:
        toolbox.describe_image(tmp_path / "elsewhere.png")
    assert isinstance(info.value, Phi3VToolsError)
    assert issubclass(PromptError, Phi3VToolsError) and issubclass(PromptError, ValueError)
    assert fake.requests == []


def test_the_backend_factory_is_called_once_on_first_use(sample_images: dict[str, Path]) -> None:
    made: list[FakeBackend] = []

    def factory() -> FakeBackend:
        made.append(FakeBackend())
        return made[-1]

    toolbox = Toolbox(factory, ImagePolicy(allowed_dirs=(sample_images["chart"].parent,)))
    assert made == []  # nothing loads at construction
    toolbox.describe_image(sample_images["chart"])
    toolbox.read_text(sample_images["cover"])
    assert len(made) == 1 and len(made[0].requests) == 2


def test_async_variants_over_the_fake_backend(
    toolbox: Toolbox, fake: FakeBackend, sample_images: dict[str, Path]
) -> None:
    pieces: list[str] = []

    async def all_four() -> list[Any]:
        return list(
            await asyncio.gather(
                toolbox.adescribe_image(sample_images["chart"], "What?", on_text=pieces.append),
                toolbox.aread_text(sample_images["cover"], ["title"], on_text=pieces.append),
                toolbox.acompare_images([sample_images["scene_a"], sample_images["scene_b"]], on_text=pieces.append),
                toolbox.aask_images(sample_images["chart"], "Why?", BarCount, on_text=pieces.append),
            )
        )

    results = asyncio.run(all_four())
    assert [type(r) for r in results] == list(TOOL_CLASSES)
    assert pieces == ["fake "] * 4
    assert results[1].fields is not None and list(results[1].fields) == ["title"]

    async def refused() -> None:
        await toolbox.acompare_images([sample_images["chart"]])

    with pytest.raises(PromptError, match="2 to 4"):
        asyncio.run(refused())


# ---------------------------------------------------------------------------------------------------------------------
# The tiny real model (random weights, so the text is nonsense, but every result must be valid)


@pytest.fixture(scope="module")
def tiny_results(tiny_toolbox: Toolbox, sample_images: dict[str, Path]) -> dict[str, Any]:
    return {
        "describe": tiny_toolbox.describe_image(sample_images["chart"], "What does it show?", detail="brief"),
        "read": tiny_toolbox.read_text(sample_images["cover"], fields=["title", "author"]),
        "compare": tiny_toolbox.compare_images([sample_images["scene_a"], sample_images["scene_b"]]),
        "ask": tiny_toolbox.ask_images(sample_images["chart"], "How many bars, and which is tallest?", BarCount),
    }


def test_all_four_tools_return_valid_results_with_the_tiny_model(
    tiny_results: dict[str, Any], tiny_toolbox: Toolbox, sample_images: dict[str, Path]
) -> None:
    describe, read, compare, ask = (tiny_results[k] for k in ("describe", "read", "compare", "ask"))
    model = tiny_toolbox.backend.model_name
    assert isinstance(describe, ImageDescription)
    _check_meta(describe, [sample_images["chart"]], model)
    jsonschema.validate(
        describe.model_dump(include=set(_DescribeAnswer.model_fields)), _DescribeAnswer.model_json_schema()
    )
    assert isinstance(read, TextReading)
    _check_meta(read, [sample_images["cover"]], model)
    assert read.fields is not None and list(read.fields) == ["title", "author"]
    assert isinstance(compare, ImageComparison)
    _check_meta(compare, [sample_images["scene_a"], sample_images["scene_b"]], model)
    assert isinstance(ask, Answer)
    _check_meta(ask, [sample_images["chart"]], model)
    BarCount.model_validate(ask.answer)
    for result in tiny_results.values():
        assert isinstance(result.to_text(), str)
        assert result.call.seconds["total"] > 0


@pytest.mark.parametrize("tool", ["describe", "read", "compare", "ask"])
def test_results_survive_a_json_round_trip(tiny_results: dict[str, Any], tool: str) -> None:
    result = tiny_results[tool]
    again = type(result).model_validate_json(result.model_dump_json())
    assert again == result
    assert type(result).model_validate(json.loads(result.model_dump_json())) == result


def test_a_chained_call_by_handle_reuses_the_image_features(
    tiny_toolbox: Toolbox, tiny_results: dict[str, Any]
) -> None:
    handle = tiny_results["describe"].images[0].handle
    chained = tiny_toolbox.ask_images(handle, "What colour are the bars?")
    assert chained.images[0] == tiny_results["describe"].images[0]  # the handle is the tools' own, on any backend
    assert chained.call.cached_images >= 1  # remote: the server's cache, as phi3v-tools serve reports it
    assert isinstance(chained.answer, str)


def test_async_variants_with_the_tiny_model_stream_text(tiny_toolbox: Toolbox, sample_images: dict[str, Path]) -> None:
    pieces: dict[str, list[str]] = {k: [] for k in ("describe", "read", "compare", "ask")}
    threads: set[int] = set()

    def collector(name: str) -> Any:
        def on_text(piece: str) -> None:
            threads.add(threading.get_ident())
            pieces[name].append(piece)

        return on_text

    async def all_four() -> list[Any]:
        return list(
            await asyncio.gather(
                tiny_toolbox.adescribe_image(sample_images["chart"], detail="brief", on_text=collector("describe")),
                tiny_toolbox.aread_text(sample_images["cover"], on_text=collector("read")),
                tiny_toolbox.acompare_images(
                    [sample_images["scene_a"], sample_images["scene_b"]], on_text=collector("compare")
                ),
                tiny_toolbox.aask_images(sample_images["chart"], "Say something.", on_text=collector("ask")),
            )
        )

    results = asyncio.run(all_four())
    assert [type(r) for r in results] == list(TOOL_CLASSES)
    for name, got in pieces.items():
        assert got and all(isinstance(p, str) for p in got), name
    assert "".join(pieces["ask"]).strip() == results[3].answer  # without a schema the pieces are the answer
    assert threads


# ---------------------------------------------------------------------------------------------------------------------
# The Python API


def test_the_python_api_uses_the_default_toolbox(
    monkeypatch: pytest.MonkeyPatch, fake: FakeBackend, sample_images: dict[str, Path]
) -> None:
    toolbox = Toolbox(fake, ImagePolicy(allowed_dirs=(sample_images["chart"].parent,)))
    monkeypatch.setattr(api, "_DEFAULT", toolbox)
    assert api.default_toolbox() is toolbox
    described = phi3v_tools.describe_image(sample_images["chart"], "What?", "brief")
    read = phi3v_tools.read_text(sample_images["cover"], ["title"])
    compared = phi3v_tools.compare_images([sample_images["scene_a"], sample_images["scene_b"]], "Which?")
    asked = phi3v_tools.ask_images(sample_images["chart"], "How many?", BarCount)
    assert [type(r) for r in (described, read, compared, asked)] == list(TOOL_CLASSES)
    assert len(fake.requests) == 4
    assert fake.requests[0].max_new_tokens == 160 and "What?" in fake.requests[0].messages[0]["content"]
    assert fake.requests[2].num_crops == 4
    assert fake.requests[3].json_schema == BarCount.model_json_schema()
    assert read.fields is not None and list(read.fields) == ["title"]
    assert all(r.call.model == "fake-phi3v" for r in (described, read, compared, asked))
    assert phi3v_tools.describe_image is api.describe_image


def test_the_handle_store_of_a_toolbox_from_settings_is_bounded_by_image_store_mb() -> None:
    toolbox = api.toolbox_from_settings(Settings(model="tiny", image_store_mb=1.5))
    assert toolbox.store.max_bytes == int(1.5 * 2**20)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_first_call_accounts_for_loading_the_model_and_every_call_for_all_its_time(
    fake: FakeBackend, sample_images: dict[str, Path], mode: str
) -> None:
    def load() -> FakeBackend:  # the model loads on the first call
        time.sleep(0.05)
        return fake

    tools = Toolbox(load, ImagePolicy(allowed_dirs=(sample_images["chart"].parent,)))
    chart = str(sample_images["chart"])
    calls = [tools.read_text(chart) if mode == "sync" else asyncio.run(tools.aread_text(chart)) for _ in range(2)]
    first, second = (c.call.seconds for c in calls)
    assert first["load"] >= 0.05 and second["load"] == 0.0
    for seconds in (first, second):
        parts = sum(v for k, v in seconds.items() if k != "total")
        assert parts == pytest.approx(seconds["total"], abs=1e-3)  # nothing unaccounted for
        assert seconds["total"] >= seconds["decode"] + seconds["load"]


def test_call_seconds_take_preprocessing_out_of_the_queue_time() -> None:
    from phi3v_tools.engine.types import Timings
    from phi3v_tools.tools import call_seconds

    t = Timings(queue_s=0.3, preprocess_s=0.1, vision_s=0.2, prefill_s=0.1, decode_s=0.5, total_s=1.25)
    seconds = call_seconds(t, wall=1.5, load_s=0.0)
    assert seconds == {
        "load": 0.0,
        "queue": 0.2,
        "preprocess": 0.1,
        "vision": 0.2,
        "prefill": 0.1,
        "decode": 0.5,
        "other": 0.4,
        "total": 1.5,
    }
    assert call_seconds(t, wall=0.0)["total"] == 1.25  # no wall time known (a remote clock): the engine's total
