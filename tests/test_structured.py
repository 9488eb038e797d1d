"""JSON-schema-constrained generation: bounding schemas, closing truncated JSON, the llguidance grammar, and the
runner's schema requests end to end with the tiny (rambling) model."""

from __future__ import annotations

import asyncio
import copy
import enum
import json
import random
import time
from typing import Any

import pytest
import torch
from PIL import Image
from pydantic import BaseModel, Field

from phi3v_tools.errors import GenerationError, PromptError
from phi3v_tools.runner import GenerationRequest, GenerationResult, Runner
from phi3v_tools.structured import (
    DEFAULT_MAX_ITEMS,
    DEFAULT_MAX_STRING,
    SchemaLimits,
    bound_schema,
    complete_json,
    minimal_value,
    pattern_matches,
    prepare_schema,
    schema_prompt,
    validate,
)
from tests.reliability.corpus_engine import nested_unions

# ---------------------------------------------------------------------------------------------------------------------
# A small deterministic generator of JSON schemas

NAMES = ["title", "kind", "count", "score", "tags", "items", "meta", "note", "flag", "color", "size", "label", "rows"]
NAMES += ["width", "caption", "level", "owner", "z_last", "alpha", "objects"]
WORDS = ["photo", "chart", "diagram", "screenshot", "map", "table", "text", "a b", "é", "x"]

# Integer ranges that contain 0 or start at 1: every prefix of a number in range is itself in range. Ranges away from
# zero are kept apart (see test_a_cut_integer_is_completed_within_its_bounds).
INTEGER_BOUNDS: list[tuple[int | None, int | None]] = [(None, None), (-50, None), (0, None), (0, 1), (-5, 9)]
INTEGER_BOUNDS += [(0, 40), (1, 1000), (-50, 1)]
NUMBER_MINIMA: list[float | None] = [None, -1.5, 0, 1]


def random_schema(
    rng: random.Random,
    depth: int = 0,
    integer_bounds: list[tuple[int | None, int | None]] = INTEGER_BOUNDS,
) -> dict[str, Any]:
    """An object schema, nested at most 3 deep, with a random mix of required and optional properties."""
    names = rng.sample(NAMES, rng.randint(1, 4 if depth < 2 else 2))
    props = {name: _random_field(rng, depth + 1, integer_bounds) for name in names}
    schema: dict[str, Any] = {"type": "object", "properties": props}
    required = [name for name in names if rng.random() < 0.6]
    if required:
        schema["required"] = required
    return schema


def _random_field(
    rng: random.Random, depth: int, integer_bounds: list[tuple[int | None, int | None]]
) -> dict[str, Any]:
    kinds = ["string", "short_string", "integer", "number", "boolean", "enum", "strings", "numbers", "nullable"]
    if depth < 3:
        kinds += ["object", "objects"]
    kind = rng.choice(kinds)
    node: dict[str, Any]
    if kind == "string":
        return {"type": "string"}
    if kind == "short_string":  # short strings let the random walk finish some objects
        return {"type": "string", "maxLength": rng.randint(1, 12)}
    if kind == "integer":
        node = {"type": "integer"}
        low, high = rng.choice(integer_bounds)
        if low is not None:
            node["minimum"] = low
        if high is not None:
            node["maximum"] = high
        return node
    if kind == "number":
        node = {"type": "number"}
        low = rng.choice(NUMBER_MINIMA)
        if low is not None:
            node["minimum"] = low
        return node
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"type": "string", "enum": rng.sample(WORDS, rng.randint(1, 4))}
    if kind == "object":
        return random_schema(rng, depth, integer_bounds)
    if kind == "nullable":  # anyOf [T, null] with a non-union T
        inner = _random_field(rng, 3, integer_bounds)
        while "anyOf" in inner:
            inner = _random_field(rng, 3, integer_bounds)
        return {"anyOf": [inner, {"type": "null"}]}
    if kind == "strings":
        node = {"type": "array", "items": {"type": "string", "maxLength": rng.choice([3, 20, 2000])}}
    elif kind == "numbers":
        node = {"type": "array", "items": {"type": rng.choice(["integer", "number"])}}
    else:
        node = {"type": "array", "items": random_schema(rng, depth, integer_bounds)}
    if rng.random() < 0.4:
        node["minItems"] = rng.randint(1, 2)
    if rng.random() < 0.4:
        node["maxItems"] = rng.randint(node.get("minItems", 0) + 1, 5)
    return node


def drive(runner: Runner, schema: dict[str, Any], seed: int) -> tuple[bool, list[str]]:
    """Walk the real grammar with random allowed tokens until it finishes or a random budget (1-200) runs out.

    Every token-boundary prefix on the way is closed with complete_json and must validate against the bounded
    schema; a finished text must parse and validate against the schema itself. Returns (finished, failures).
    """
    rng = random.Random(seed)
    budget = rng.randint(1, 200)
    generator = torch.Generator().manual_seed(seed)
    bounded = bound_schema(schema)
    grammars = runner.grammars
    constraint = grammars.matcher(bounded)
    mask = grammars.allocate(1)
    tokens: list[int] = []
    failures: list[str] = []
    decode = runner.processor.tokenizer.decode
    while len(tokens) < budget and not constraint.finished:
        grammars.fill([constraint], mask)
        logits = torch.randn(1, grammars.vocab_size, generator=generator)
        grammars.apply(logits, mask)
        token = int(logits.argmax())
        constraint.consume(token)
        tokens.append(token)
        text = str(decode(tokens, skip_special_tokens=True))
        if constraint.finished:
            try:
                value = json.loads(text)
            except ValueError as exc:
                failures.append(f"finished text {text!r} is not JSON: {exc}")
                break
            problem = validate(value, schema) or validate(value, bounded)
            if problem is not None:
                failures.append(f"finished text {text!r}: {problem}")
            break
        try:
            value = complete_json(text, bounded)
        except Exception as exc:  # reported with its prefix like an invalid completion
            failures.append(f"prefix {text!r}: complete_json raised {type(exc).__name__}: {exc}")
            break
        problem = validate(value, bounded)
        if problem is not None:
            failures.append(f"prefix {text!r} -> {value!r}: {problem}")
            break
    return constraint.finished, failures


def picture() -> Image.Image:
    generator = torch.Generator().manual_seed(7)
    pixels = torch.randint(0, 256, (48, 64, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def ask(schema: dict[str, Any], max_new_tokens: int) -> GenerationRequest:
    return GenerationRequest.from_text(
        "Describe the image.", [picture()], json_schema=schema, max_new_tokens=max_new_tokens, num_crops=1
    )


def check_result(result: GenerationResult, schema: dict[str, Any], max_new_tokens: int) -> None:
    assert validate(result.parsed, schema) is None, (schema, result.text)
    assert json.loads(result.text) == result.parsed
    assert result.truncated == (result.finish_reason == "length")
    assert result.completion_tokens <= max_new_tokens
    if result.truncated:
        assert result.completion_tokens == max_new_tokens


class Kind(str, enum.Enum):
    PHOTO = "photo"
    CHART = "chart"


class Answer(BaseModel):
    description: str
    kind: Kind
    objects: list[str]
    note: str | None = None


class Box(BaseModel):
    label: str
    corners: list[float] = Field(max_length=4)


class Scene(BaseModel):
    caption: str = Field(max_length=50)
    boxes: list[Box]
    main: Box | None = None
    extra: dict[str, str] = {}
    note: str | None = None


# ---------------------------------------------------------------------------------------------------------------------
# bound_schema


def test_strings_get_a_max_length_and_an_existing_smaller_one_is_kept_while_a_larger_one_is_lowered() -> None:
    schema = {
        "type": "object",
        "properties": {
            "free": {"type": "string"},
            "short": {"type": "string", "maxLength": 12},
            "long": {"type": "string", "maxLength": 10**6},
            "maybe": {"type": ["string", "null"]},
            "choice": {"type": "string", "enum": ["a", "b"]},
        },
    }
    props = bound_schema(schema)["properties"]
    assert props["free"]["maxLength"] == DEFAULT_MAX_STRING == 2000
    assert props["short"]["maxLength"] == 12
    assert props["long"]["maxLength"] == 2000
    assert props["maybe"]["maxLength"] == 2000
    assert "maxLength" not in props["choice"]  # an enum is bounded by its members
    assert bound_schema({"type": "string"}, max_string=5) == {"type": "string", "maxLength": 5}


def test_arrays_get_max_items_keeping_a_smaller_one() -> None:
    assert bound_schema({"type": "array", "items": {"type": "integer"}})["maxItems"] == DEFAULT_MAX_ITEMS
    assert bound_schema({"type": "array", "maxItems": 3})["maxItems"] == 3
    assert bound_schema({"type": "array", "maxItems": 10**6}, max_items=7)["maxItems"] == 7


def test_objects_with_properties_forbid_undeclared_keys_unless_the_schema_says_otherwise() -> None:
    declared = bound_schema({"type": "object", "properties": {"a": {"type": "integer"}}})
    assert declared["additionalProperties"] is False
    assert "maxProperties" not in declared
    untyped = bound_schema({"properties": {"a": {"type": "integer"}}})
    assert untyped["additionalProperties"] is False
    allowed = bound_schema(
        {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": True}
    )
    assert allowed["additionalProperties"] is True
    assert allowed["maxProperties"] == DEFAULT_MAX_ITEMS + 1  # the declared key plus up to 64 more
    closed = bound_schema({"type": "object", "properties": {}, "additionalProperties": False})
    assert closed == {"type": "object", "properties": {}, "additionalProperties": False}


def test_free_form_objects_get_max_properties_and_their_value_schema_is_bounded() -> None:
    mapping = bound_schema({"type": "object", "additionalProperties": {"type": "string"}})
    assert mapping == {
        "type": "object",
        "additionalProperties": {"type": "string", "maxLength": DEFAULT_MAX_STRING},
        "maxProperties": DEFAULT_MAX_ITEMS,
    }
    assert bound_schema({"type": "object"})["maxProperties"] == DEFAULT_MAX_ITEMS
    assert bound_schema({"type": "object", "maxProperties": 2})["maxProperties"] == 2
    assert "additionalProperties" not in bound_schema({"type": "object"})


def test_bounding_recurses_through_properties_items_unions_and_defs() -> None:
    schema = {
        "type": "object",
        "properties": {
            "list": {"type": "array", "items": {"type": "object", "properties": {"s": {"type": "string"}}}},
            "union": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
            "one": {"oneOf": [{"type": "string"}, {"type": "null"}]},
            "all": {"allOf": [{"$ref": "#/$defs/Thing"}]},
        },
        "$defs": {"Thing": {"type": "object", "properties": {"t": {"type": "string"}}}},
    }
    bounded = bound_schema(schema, max_string=9, max_items=4)
    props = bounded["properties"]
    assert props["list"]["maxItems"] == 4
    assert props["list"]["items"]["additionalProperties"] is False
    assert props["list"]["items"]["properties"]["s"]["maxLength"] == 9
    assert props["union"]["anyOf"][0]["maxLength"] == 9
    assert props["union"]["anyOf"][1] == {"type": "array", "items": {"type": "string", "maxLength": 9}, "maxItems": 4}
    assert props["one"]["oneOf"][0]["maxLength"] == 9
    assert props["all"] == {"allOf": [{"$ref": "#/$defs/Thing"}]}
    thing = bounded["$defs"]["Thing"]
    assert thing["additionalProperties"] is False
    assert thing["properties"]["t"]["maxLength"] == 9


def test_bounding_a_pydantic_schema_with_nested_models_and_optional_fields() -> None:
    schema = Scene.model_json_schema()
    bounded = bound_schema(schema)
    assert bounded["additionalProperties"] is False
    props = bounded["properties"]
    assert props["caption"]["maxLength"] == 50  # Field(max_length=50) kept
    assert props["boxes"]["maxItems"] == DEFAULT_MAX_ITEMS
    assert props["boxes"]["items"] == {"$ref": "#/$defs/Box"}
    assert props["main"]["anyOf"] == [{"$ref": "#/$defs/Box"}, {"type": "null"}]
    assert props["extra"]["maxProperties"] == DEFAULT_MAX_ITEMS
    assert props["extra"]["additionalProperties"]["maxLength"] == DEFAULT_MAX_STRING
    assert props["note"]["anyOf"][0]["maxLength"] == DEFAULT_MAX_STRING
    box = bounded["$defs"]["Box"]
    assert box["additionalProperties"] is False
    assert box["properties"]["label"]["maxLength"] == DEFAULT_MAX_STRING
    assert box["properties"]["corners"]["maxItems"] == 4  # Field(max_length=4) on a list kept
    assert list(bounded["properties"]) == list(schema["properties"])  # order kept: the grammar follows it
    example = {"caption": "a", "boxes": [{"label": "b", "corners": [1.0]}], "main": None, "extra": {"k": "v"}}
    assert validate(example, bounded) is None
    assert validate({**example, "invented": 1}, bounded) is not None


def test_bounding_does_not_mutate_its_input() -> None:
    schema = Scene.model_json_schema()
    schema["properties"]["tags"] = {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "object"}]}}
    before = copy.deepcopy(schema)
    bounded = bound_schema(schema)
    assert schema == before
    assert bounded != schema


def test_an_object_with_optional_properties_and_extra_keys_stays_usable_after_bounding(tiny_runner: Runner) -> None:
    for extra in ({"type": "integer"}, True):
        schema = {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": extra}
        tiny_runner.grammars.grammar(schema)  # the schema as given compiles
        tiny_runner.grammars.grammar(bound_schema(schema))


# ---------------------------------------------------------------------------------------------------------------------
# complete_json on hand-written prefixes

PHOTO = {"type": "string", "enum": ["photo", "chart"]}
RECORD = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "count": {"type": "integer", "minimum": 3},
        "ratio": {"type": "number", "minimum": 1.5},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "kind": PHOTO,
        "inner": {
            "type": "object",
            "properties": {"p": {"type": "string"}, "q": {"type": "integer"}, "r": {"type": "boolean"}},
            "required": ["q", "r"],
        },
        "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "maybe_flag": {"anyOf": [{"type": "boolean"}, {"type": "null"}]},
        "score": {"type": "number"},
    },
    "required": ["name", "count", "ratio", "ok", "tags", "kind", "inner", "note"],
}
RECORD_MINIMAL = {
    "name": "",
    "count": 3,
    "ratio": 1.5,
    "ok": False,
    "tags": [],
    "kind": "photo",
    "inner": {"q": 0, "r": False},
    "note": None,
}


def obj(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required is not None:
        schema["required"] = required
    return schema


COMPLETIONS: list[tuple[str, str, dict[str, Any], Any]] = [
    ("open string value closed", '{"a":"hel', obj({"a": {"type": "string"}}), {"a": "hel"}),
    ("open key dropped", '{"a":"x","b', obj({"a": {"type": "string"}, "b": {"type": "string"}}), {"a": "x"}),
    ("cut after a comma", '{"a":"x",', obj({"a": {"type": "string"}, "b": {"type": "string"}}), {"a": "x"}),
    (
        "key without value dropped, required field filled",
        '{"a":"x","n":',
        obj({"a": {"type": "string"}, "n": {"type": "integer"}}, ["a", "n"]),
        {"a": "x", "n": 0},
    ),
    (
        "closed key without colon dropped",
        '{"a":"x","flag"',
        obj({"a": {"type": "string"}, "flag": {"type": "boolean"}}),
        {"a": "x"},
    ),
    ("partial true", '{"b":tr', obj({"b": {"type": "boolean"}}), {"b": True}),
    ("partial false", '{"b":fa', obj({"b": {"type": "boolean"}}), {"b": False}),
    ("partial null", '{"n":nu', obj({"n": {"anyOf": [{"type": "string"}, {"type": "null"}]}}), {"n": None}),
    ("one letter of null", '{"n":n', obj({"n": {"anyOf": [{"type": "integer"}, {"type": "null"}]}}), {"n": None}),
    ("number cut after the point", '{"x":12.', obj({"x": {"type": "number"}}), {"x": 12}),
    ("number cut in the exponent", '{"x":1.5e+', obj({"x": {"type": "number"}}), {"x": 1.5}),
    ("lone minus sign", '{"x":-', obj({"x": {"type": "number"}}, ["x"]), {"x": 0}),
    ("lone minus sign with a minimum", '{"x":-', obj({"x": {"type": "integer", "minimum": 4}}, ["x"]), {"x": 4}),
    ("integer cut after the point", '{"x":7.', obj({"x": {"type": "integer"}}), {"x": 7}),
    ("enum prefix", '{"k":"ph', obj({"k": PHOTO}), {"k": "photo"}),
    ("enum prefix of the second member", '{"k":"ch', obj({"k": PHOTO}), {"k": "chart"}),
    ("enum with only the quote", '{"k":"', obj({"k": PHOTO}), {"k": "photo"}),
    (
        "nullable enum prefix",
        '{"k":"cha',
        obj({"k": {"anyOf": [PHOTO, {"type": "null"}]}}, ["k"]),
        {"k": "chart"},
    ),
    (
        "nested arrays and objects closed",
        '{"a":[{"b":[[1,2],[3',
        obj({"a": {"type": "array", "items": obj({"b": {"type": "array", "items": {"type": "array"}}})}}),
        {"a": [{"b": [[1, 2], [3]]}]},
    ),
    ("array of strings cut inside an item", '["ab","c', {"type": "array", "items": {"type": "string"}}, ["ab", "c"]),
    ("array cut after a comma", "[1,2,", {"type": "array", "items": {"type": "integer"}}, [1, 2]),
    (
        "escaped characters decoded",
        r'{"s":"a\"b\\c\nd\u00e9\/',
        obj({"s": {"type": "string"}}),
        {"s": 'a"b\\c\nd\u00e9/'},
    ),
    ("cut unicode escape dropped", r'{"s":"ab\u00', obj({"s": {"type": "string"}}), {"s": "ab"}),
    ("cut backslash dropped", '{"s":"ab\\', obj({"s": {"type": "string"}}), {"s": "ab"}),
    ("string over maxLength cut to it", '{"s":"abcdef', obj({"s": {"type": "string", "maxLength": 3}}), {"s": "abc"}),
    ("empty prefix of an object", "", RECORD, RECORD_MINIMAL),
    ("only the brace", "{", RECORD, RECORD_MINIMAL),
    ("required fields after a cut string", '{"name":"Bo', RECORD, {**RECORD_MINIMAL, "name": "Bo"}),
    (
        "required fields of a cut nested object",
        '{"name":"","count":5,"ratio":2,"ok":true,"tags":["x"],"kind":"chart","inner":{"p":"y',
        RECORD,
        {
            **RECORD_MINIMAL,
            **{"count": 5, "ratio": 2, "ok": True, "tags": ["x"], "kind": "chart"},
            "inner": {"p": "y", "q": 0, "r": False},
        },
    ),
    (
        "minItems padded with minimal items",
        '{"a":[',
        obj({"a": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 2}}, ["a"]),
        {"a": [1, 1]},
    ),
    (
        "minItems padded after the items written",
        '{"a":["x","y',
        obj({"a": {"type": "array", "items": {"type": "string"}, "minItems": 3}}, ["a"]),
        {"a": ["x", "y", ""]},
    ),
    (
        "missing array with minItems filled",
        "{",
        obj({"a": {"type": "array", "items": PHOTO, "minItems": 2}}, ["a"]),
        {"a": ["photo", "photo"]},
    ),
    (
        "pydantic $ref and Optional fields",
        '{"description":"a red',
        Answer.model_json_schema(),
        {"description": "a red", "kind": "photo", "objects": []},
    ),
    ("leading whitespace ignored", '  {"a":1', obj({"a": {"type": "integer"}}), {"a": 1}),
]


@pytest.mark.parametrize(
    ("prefix", "schema", "expected"), [c[1:] for c in COMPLETIONS], ids=[c[0] for c in COMPLETIONS]
)
def test_complete_json_closes_a_cut_prefix_into_a_valid_value(
    prefix: str, schema: dict[str, Any], expected: Any
) -> None:
    result = complete_json(prefix, schema)
    assert result == expected
    assert type(result) is type(expected)
    assert validate(result, schema) is None


def test_an_empty_prefix_gives_the_minimal_value_of_the_schema() -> None:
    for schema in (RECORD, PHOTO, {"type": "integer", "minimum": -4}, {"type": "array", "minItems": 1}):
        assert complete_json("", schema) == minimal_value(schema, schema)
        assert validate(complete_json("", schema), schema) is None
    assert complete_json("", Answer.model_json_schema()) == {"description": "", "kind": "photo", "objects": []}


@pytest.mark.parametrize(
    ("node", "expected"),
    [
        ({"anyOf": [{"type": "integer"}, {"type": "null"}]}, None),
        ({"anyOf": [{"type": "null"}, {"type": "string"}]}, None),
        ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, ""),
        ({"type": ["string", "null"]}, None),
        ({"type": "string"}, ""),
        ({"type": "string", "minLength": 2}, "--"),
        ({"type": "integer"}, 0),
        ({"type": "integer", "minimum": 7}, 7),
        ({"type": "integer", "minimum": -7}, 0),
        ({"type": "integer", "minimum": -9, "maximum": -3}, -3),
        ({"type": "integer", "exclusiveMinimum": 0}, 1),
        ({"type": "number", "minimum": 0.5}, 0.5),
        ({"type": "number", "exclusiveMinimum": 2}, 3),
        ({"type": "boolean"}, False),
        ({"type": "array", "items": {"type": "string"}}, []),
        ({"type": "array", "items": {"type": "boolean"}, "minItems": 2}, [False, False]),
        ({"enum": ["b", "a"]}, "b"),
        ({"const": "fixed"}, "fixed"),
        (obj({"o": obj({"x": {"type": "integer"}, "y": {"type": "string"}}, ["y"])}, ["o"]), {"o": {"y": ""}}),
    ],
)
def test_minimal_value_is_the_smallest_valid_value(node: dict[str, Any], expected: Any) -> None:
    value = minimal_value(node, node)
    assert value == expected
    assert validate(value, node) is None


@pytest.mark.parametrize(
    ("prefix", "node"),
    [
        ('{"n":1', {"type": "integer", "minimum": 10, "maximum": 99}),
        ('{"n":-4', {"type": "integer", "minimum": -50, "maximum": -40}),
        ('{"n":0.', {"type": "number", "minimum": 0.25}),
    ],
)
def test_a_cut_integer_is_completed_within_its_bounds(prefix: str, node: dict[str, Any]) -> None:
    schema = obj({"n": node}, ["n"])
    assert validate(complete_json(prefix, schema), schema) is None


def test_a_cut_value_inside_a_nested_union_respects_the_chosen_branch() -> None:
    inner = {"anyOf": [{"type": "array", "items": {"type": "string"}, "minItems": 1}, {"type": "null"}]}
    schema = obj({"a": {"anyOf": [inner, {"type": "null"}]}}, ["a"])
    assert validate(complete_json('{"a":[', schema), schema) is None


def test_a_cut_string_is_completed_to_its_min_length() -> None:
    schema = obj({"s": {"type": "string", "minLength": 5}}, ["s"])
    assert validate(complete_json('{"s":"ab', schema), schema) is None


def test_minimal_value_respects_exclusive_maximum_and_fractional_minimum() -> None:
    for node in ({"type": "integer", "exclusiveMaximum": 0}, {"type": "integer", "minimum": 2.5}):
        assert validate(minimal_value(node, node), node) is None


def test_a_number_too_large_for_a_float_does_not_become_infinity() -> None:
    schema = obj({"x": {"type": "number"}}, ["x"])
    completed = complete_json('{"x":1e999', schema)
    json.dumps(completed, allow_nan=False)


# ---------------------------------------------------------------------------------------------------------------------
# The real grammar, cut at every point


def test_every_prefix_the_grammar_allows_completes_to_a_valid_value(tiny_runner: Runner) -> None:
    """~40 random schemas, random allowed tokens: finished texts parse and validate, every cut completes validly."""
    failures: list[str] = []
    finished = 0
    for seed in range(40):
        schema = random_schema(random.Random(1000 + seed))
        done, problems = drive(tiny_runner, schema, seed)
        finished += done
        failures += [f"seed {seed}, schema {json.dumps(schema)}: {p}" for p in problems]
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures)
    assert 5 <= finished <= 35, f"{finished} of 40 walks finished: both outcomes should be exercised"


def test_every_prefix_completes_validly_with_integer_ranges_away_from_zero(tiny_runner: Runner) -> None:
    bounds: list[tuple[int | None, int | None]] = [(10, 99), (3, 12), (250, 250), (-50, -40)]
    failures: list[str] = []
    for seed in range(30):
        schema = random_schema(random.Random(2000 + seed), integer_bounds=bounds)
        failures += drive(tiny_runner, schema, seed)[1]
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------------------------------------------------------------
# The runner, end to end with the rambling tiny model

RUNNER_SCHEMAS = [random_schema(random.Random(seed)) for seed in range(8)]


@pytest.mark.parametrize("index", range(len(RUNNER_SCHEMAS)))
def test_a_schema_request_gives_a_valid_parsed_answer_at_small_and_large_budgets(
    tiny_runner: Runner, index: int
) -> None:
    schema = RUNNER_SCHEMAS[index]
    for max_new_tokens in (8, 24, 300):
        result = tiny_runner.generate_sync(ask(schema, max_new_tokens))
        check_result(result, schema, max_new_tokens)


def test_a_pydantic_schema_request_validates_with_the_model_and_fills_what_the_budget_cut(
    tiny_runner: Runner,
) -> None:
    schema = Answer.model_json_schema()
    results = {n: tiny_runner.generate_sync(ask(schema, n)) for n in (8, 24, 300)}
    for n, result in results.items():
        check_result(result, schema, n)
        answer = Answer.model_validate(result.parsed)
        assert isinstance(answer.kind, Kind)
    short = results[8]  # 8 tokens cannot hold the whole object: cut inside the description, the rest filled
    assert short.truncated
    assert short.finish_reason == "length"
    assert short.parsed["kind"] == "photo"
    assert short.parsed["objects"] == []
    assert set(short.parsed) == {"description", "kind", "objects"}
    assert list(short.parsed) == ["description", "kind", "objects"]


def test_concurrent_requests_with_different_schemas_share_a_batch_and_each_validates_against_its_own(
    tiny_runner: Runner,
) -> None:
    budgets = [8, 300, 24, 300, 8, 300, 24, 300]
    requests = [ask(schema, n) for schema, n in zip(RUNNER_SCHEMAS, budgets, strict=True)]
    alone = [tiny_runner.generate_sync(ask(schema, n)) for schema, n in zip(RUNNER_SCHEMAS, budgets, strict=True)]

    async def together() -> list[GenerationResult]:
        return await asyncio.gather(*(tiny_runner.generate(request) for request in requests))

    batches = tiny_runner.batches
    results = asyncio.run(together())
    assert tiny_runner.batches == batches + 1  # one batch, eight different grammars
    for schema, n, result, solo in zip(RUNNER_SCHEMAS, budgets, results, alone, strict=True):
        check_result(result, schema, n)
        assert (result.text, result.finish_reason) == (solo.text, solo.finish_reason)  # companions change nothing
    assert {r.finish_reason for r in results} == {"stop", "length"}


# ---------------------------------------------------------------------------------------------------------------------
# The prompt, the grammar cache, unusable schemas


def test_the_prompt_carries_the_schema_as_compact_json_in_its_own_property_order() -> None:
    schema = {
        "type": "object",
        "properties": {"zeta": {"type": "string"}, "alpha": {"type": "integer"}, "mid": {"type": "boolean"}},
        "required": ["zeta", "alpha"],
    }
    prompt = schema_prompt(schema)
    compact = json.dumps(schema, separators=(",", ":"))
    assert compact in prompt
    assert json.dumps(schema, separators=(",", ":"), sort_keys=True) not in prompt
    assert prompt.index('"zeta"') < prompt.index('"alpha"') < prompt.index('"mid"')
    assert ": " not in prompt.split("\n", 1)[1]  # compact: no spaces after separators
    assert json.loads(prompt.split("\n", 1)[1]) == schema


def test_compiled_grammars_are_cached_per_schema_and_property_order_matters(tiny_runner: Runner) -> None:
    compiler = tiny_runner.grammars
    schema = {"type": "object", "properties": {"cache_b": {"type": "string"}, "cache_a": {"type": "integer"}}}
    before = len(compiler._grammars)
    first = compiler.grammar(schema)
    second = compiler.grammar(copy.deepcopy(schema))
    assert second is first
    assert len(compiler._grammars) == before + 1
    assert compiler._grammars[json.dumps(schema, separators=(",", ":"))] is first
    reordered = {"type": "object", "properties": {"cache_a": {"type": "integer"}, "cache_b": {"type": "string"}}}
    assert compiler.grammar(reordered) != first
    assert len(compiler._grammars) == before + 2


@pytest.mark.parametrize(
    ("schema", "detail"),
    [
        ({"type": "string", "pattern": "("}, "unclosed group"),
        ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "uniqueItems"),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/Missing"}}}, "Missing"),
    ],
    ids=["bad-pattern", "unsupported-keyword", "dangling-ref"],
)
def test_an_unusable_schema_is_refused_at_submission_with_a_prompt_error_that_names_the_problem(
    tiny_runner: Runner, schema: dict[str, Any], detail: str
) -> None:
    steps = tiny_runner.decode_steps
    with pytest.raises(PromptError, match="schema") as refused:
        tiny_runner.submit(ask(schema, 8))
    assert detail in str(refused.value)
    with pytest.raises(PromptError, match="schema"):
        tiny_runner.generate_sync(ask(schema, 8))
    assert tiny_runner.decode_steps == steps  # refused before the worker saw it


# ---------------------------------------------------------------------------------------------------------------------
# Hostile schemas: refused at once with a message that names the problem, or handled in bounded time


HOSTILE_SCHEMAS: list[tuple[str, Any, str]] = [
    (
        "ref-cycle",
        {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "properties": {"x": {"$ref": "#/$defs/a"}}},
        "refers to itself without nesting",
    ),
    ("root-refers-to-itself", {"$ref": "#"}, "refers to itself without nesting"),
    ("union-with-itself", {"anyOf": [{"$ref": "#"}, {"type": "string"}]}, "refers to itself without nesting"),
    (
        "self-recursive-required-object",
        {"type": "object", "properties": {"child": {"$ref": "#"}}, "required": ["child"]},
        "no answer can satisfy",
    ),
    ("required-but-not-allowed", obj({"a": {"type": "string"}}, ["b"]), "no answer can satisfy"),
    ("nested-anyof-over-refs-17", nested_unions(17), "expand to more than 1000 alternatives"),
    ("nested-anyof-over-refs-30", nested_unions(30), "expand to more than 1000 alternatives"),
    ("nested-allof-over-refs-20", nested_unions(20, "allOf"), "expand to more than 1000 alternatives"),
    ("max-length-as-text", {"type": "string", "maxLength": "abc"}, "'maxLength' at \\(root\\) must be a non-negative"),
    ("max-length-true", {"type": "string", "maxLength": True}, "must be a non-negative integer, not true"),
    ("nan", {"type": "number", "maximum": float("nan")}, "non-finite number \\(nan\\) at maximum"),
    ("infinity", {"type": "number", "minimum": float("-inf")}, "non-finite number"),
    ("1e400", json.loads('{"type": "number", "maximum": 1e400}'), "non-finite number \\(inf\\)"),
    ("properties-as-a-list", {"type": "object", "properties": [1, 2]}, "'properties' at \\(root\\) must be an object"),
    ("items-as-a-list", {"type": "array", "items": [{"type": "string"}]}, "use prefixItems"),
    ("type-unknown", {"type": "banana"}, "'type' at \\(root\\) must be one of"),
    ("enum-empty", {"enum": []}, "'enum' at \\(root\\) must be a non-empty list"),
    ("required-not-a-list", {"type": "object", "required": "a"}, "'required' at \\(root\\) must be a list"),
    ("min-length-huge", {"type": "string", "minLength": 10**9}, "minimum length or count above its maximum"),
    ("min-items-of-ten-million", {"type": "array", "minItems": 10**7}, "minimum length or count above its maximum"),
    ("min-items-of-10-to-the-18", {"type": "array", "minItems": 10**18}, "number beyond 2\\^53"),
    ("integer-beyond-2-to-the-53", {"type": "integer", "minimum": 10**400}, "number beyond 2\\^53"),
    ("const-beyond-2-to-the-53", {"const": 10**400}, "number beyond 2\\^53"),
    (
        "min-items-multiply",
        {
            "type": "array",
            "minItems": 60,
            "items": {"type": "array", "minItems": 60, "items": {"minItems": 9, "items": {}}},
        },
        "smallest valid answer .* more than 20000",
    ),
    ("description-of-1-mb", {"type": "string", "description": "x" * 2**20}, "string of 1048576 characters"),
    ("key-of-5000-chars", obj({"k" * 5000: {"type": "string"}}), "a key of 5000 characters"),
    (
        "schema-of-40-kb",
        obj({f"p{i}": {"type": "string", "description": "d" * 200} for i in range(200)}),
        "bytes as compact JSON; the limit is 16384",
    ),
    ("lone-surrogate", {"type": "string", "title": "\ud800"}, "lone surrogate"),
    ("nested-id", obj({"a": {"$id": "http://x.test/", "type": "string"}}), "only the root may carry \\$id"),
    ("anchor", {"$defs": {"a": {"$anchor": "n", "type": "string"}}, "$ref": "#n"}, "\\$anchor"),
    ("anchor-reference", {"$defs": {"a": {"type": "string"}}, "$ref": "#a"}, "use JSON pointers"),
    ("remote-ref", {"$ref": "https://example.com/s.json"}, "only local references"),
    ("dangling-ref", {"$ref": "#/$defs/none"}, "not a schema in this document"),
    ("ref-into-a-non-schema", {"required": ["a"], "$ref": "#/required"}, "not a schema in this document"),
    ("grammar-options", {"type": "string", "x-guidance": {"lenient": True}}, "grammar-engine options"),
    ("look-ahead-pattern", {"type": "string", "pattern": "(?=a)b"}, "look-around"),
    ("backreference-pattern", {"type": "string", "pattern": "(a)\\1"}, "backreferences are not supported"),
]


@pytest.mark.parametrize(("schema", "problem"), [c[1:] for c in HOSTILE_SCHEMAS], ids=[c[0] for c in HOSTILE_SCHEMAS])
def test_a_hostile_schema_is_refused_quickly_with_a_message_naming_the_problem(schema: Any, problem: str) -> None:
    started = time.perf_counter()
    with pytest.raises(PromptError, match=problem) as refused:
        prepare_schema(schema)
    assert time.perf_counter() - started < 2.0  # the review measured 5 s to hours for some of these
    assert len(str(refused.value)) < 600


@pytest.mark.parametrize(
    ("schema", "answer"),
    [
        (  # JSON-pointer escapes: ~1 is '/', ~0 is '~', %20 a space (a URI fragment)
            {
                "$defs": {"a/b": {"type": "string"}, "c~d": {"type": "integer"}, "e f": {"type": "boolean"}},
                "type": "object",
                "properties": {
                    "x": {"$ref": "#/$defs/a~1b"},
                    "y": {"$ref": "#/$defs/c~0d"},
                    "z": {"$ref": "#/$defs/e%20f"},
                },
                "required": ["x", "y", "z"],
            },
            {"x": "", "y": 0, "z": False},
        ),
        ({"type": "object", "properties": {"w": {"type": "string", "pattern": "\\p{L}"}}}, {}),
        (
            {
                "allOf": [
                    obj({"a": {"type": "string"}}, ["a"]),
                    {"properties": {"b": {"type": "integer"}}, "required": ["b"]},
                ]
            },
            {"a": "", "b": 0},
        ),
        (obj({"a": True, "b": {}}, ["a", "b"]), {"a": None, "b": None}),
        (
            {
                "type": "object",
                "properties": {"name": {"type": "string"}, "kids": {"type": "array", "items": {"$ref": "#"}}},
            },
            {},
        ),
        (
            {"anyOf": [{"type": "object", "properties": {"n": {"$ref": "#"}}, "required": ["n"]}, {"type": "null"}]},
            None,
        ),
    ],
    ids=[
        "pointer-escapes",
        "unicode-class-pattern",
        "allof-merged",
        "boolean-subschemas",
        "recursive-tree",
        "recursive-or-null",
    ],
)
def test_unusual_but_valid_schemas_are_accepted_with_a_valid_smallest_answer(schema: Any, answer: Any) -> None:
    prepared = prepare_schema(schema)
    assert prepared.minimal(prepared.bounded) == answer
    assert prepared.validate(answer) is None


def test_a_pattern_is_matched_in_linear_time_even_where_pythons_re_would_backtrack_for_ever() -> None:
    started = time.perf_counter()
    assert not pattern_matches("^(a+)+$", "a" * 2000 + "b")  # exponential for Python's re
    assert not pattern_matches("^(a|aa)*c$", "a" * 2000)
    assert validate("a" * 1999 + "!", {"type": "string", "pattern": "^(a+)+$"}) is not None
    assert time.perf_counter() - started < 1.0
    assert pattern_matches("^\\p{L}+$", "Ünïcödé") and not pattern_matches("^\\p{L}+$", "abc1")
    assert pattern_matches("a|^b", "xa") and not pattern_matches("a|^b", "xb")  # JSON Schema: search, anchors kept


def test_validation_that_would_take_exponential_time_stops_at_its_budget() -> None:
    """Two allOf branches that each descend into the same property: 2^depth checks for a value `depth` deep."""
    branch = {"properties": {"a": {"$ref": "#"}}}
    schema = {"allOf": [branch, copy.deepcopy(branch)]}
    value: Any = "leaf"
    for _ in range(40):
        value = {"a": value}
    prepare_schema(schema)  # the schema itself is small and fine
    started = time.perf_counter()
    with pytest.raises(GenerationError, match="could not be checked against the schema within 50000 steps"):
        validate(value, schema)
    assert time.perf_counter() - started < 2.0


def test_completion_and_validation_refuse_answers_nested_deeper_than_64_levels() -> None:
    schema = {"type": "array", "items": {"$ref": "#"}}
    with pytest.raises(GenerationError, match="nested more than 64 levels"):
        complete_json("[" * 100, schema)
    deep: Any = []
    for _ in range(100):
        deep = [deep]
    with pytest.raises(GenerationError, match="nested more than 64 levels"):
        validate(deep, schema)


def test_completion_of_a_long_cut_answer_is_fast() -> None:
    """Linear in the text: a 20,000-character cut answer of many nested objects completes in well under a second."""
    schema = {
        "type": "array",
        "items": obj({"a": {"type": "string"}, "b": {"type": "array", "items": {"type": "integer"}}}, ["a", "b"]),
    }
    text = "[" + ",".join('{"a":"' + "x" * 40 + '","b":[1,2,3]}' for _ in range(350)) + ',{"a":"cut'
    started = time.perf_counter()
    value = complete_json(text, schema)
    assert time.perf_counter() - started < 1.0
    assert len(value) == 351 and value[-1] == {"a": "cut", "b": []}


def test_the_grammar_cache_is_bounded(tiny_runner: Runner) -> None:
    compiler = tiny_runner.grammars
    for i in range(compiler.max_cached + 20):
        compiler.grammar({"type": "object", "properties": {f"bounded_{i}": {"type": "string"}}})
    assert len(compiler._grammars) == compiler.max_cached


def test_many_patterns_cannot_make_validation_slow() -> None:
    """A regex match costs hundreds of keyword checks: 1500 patternProperties against 64 keys stop at the budget."""
    schema = {"type": "object", "patternProperties": {f"^k{i}": {"type": "string"} for i in range(1500)}}
    prepare_schema(schema, SchemaLimits(max_bytes=10**6))
    started = time.perf_counter()
    with pytest.raises(GenerationError, match="within 50000 steps"):
        validate({f"k{i}": "x" for i in range(64)}, schema)
    assert time.perf_counter() - started < 1.5


def test_a_pattern_matched_thousands_of_times_keeps_giving_the_right_answer() -> None:
    """Each match gets a new matcher: copies of one share a pool of regex states that wears out (~400 uses)."""
    assert all(pattern_matches("a[ab]{14}c", "a" + "ab" * 7 + "c") for _ in range(1500))
    assert not pattern_matches("a[ab]{14}c", "a" + "ab" * 6 + "c")


def test_a_pattern_too_complex_to_check_is_an_error_not_a_mismatch() -> None:
    with pytest.raises(GenerationError, match="could not be checked against the pattern"):
        pattern_matches("[a-z]{2000}", "a" * 2000)
    assert pattern_matches("\x7f", "a\x7fb")  # DEL is escaped as the grammar writes it


@pytest.mark.parametrize(
    ("prefix", "node", "expected"),
    [
        ('{"status":20', {"enum": [200, 404]}, 200),
        ('{"status":4', {"enum": [200, 404]}, 404),
        ('{"status":', {"enum": [200, 404]}, 200),
        ('{"status":202', {"const": 2024}, 2024),
        ('{"status":tr', {"enum": [1, True]}, True),
    ],
)
def test_a_cut_member_of_a_numeric_enum_or_const_completes_to_a_member(prefix: str, node: Any, expected: Any) -> None:
    schema = obj({"status": node}, ["status"])
    completed = complete_json(prefix, schema)
    assert completed == {"status": expected} and type(completed["status"]) is type(expected)
    assert validate(completed, schema) is None
