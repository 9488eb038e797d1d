"""A caller's JSON schema, checked once and then used safely: bounding, the prompt, completion, validation.

Torch-free and model-free, so any backend reuses it. The grammar that constrains decoding is built from the
same bounded schema by :mod:`phi3v_tools.grammar` (llguidance).

Three guarantees make "the result always validates" hold even for a model that rambles:

1. :func:`bound_schema` caps every string (``maxLength``), array (``maxItems``) and free-form object
   (``maxProperties``) and forbids undeclared keys, so the grammar itself cannot run forever;
2. the grammar is compiled with compact separators and no free whitespace;
3. if the token budget runs out first, :meth:`OutputSchema.complete` closes what is open and fills required
   fields with their smallest valid values; every answer is then validated, and one that does not validate
   is an error, never a success.

A schema is written by a caller, often a model steered by what it read, so every piece of work done for
it is bounded, and it all happens in :func:`prepare_schema` before the request is admitted:

- one linear walk checks every keyword's type (``maxLength: "abc"``, ``NaN``, ``properties`` given as a
  list...), the size (compact JSON bytes, each string, values, nesting) and every ``$ref`` (a local JSON
  pointer, ``~0``/``~1``/``%xx`` decoded, that names a schema of this document);
- the graph of in-place references (``$ref``, ``allOf``/``anyOf``/``oneOf``) must have no cycle and must
  not expand to more than ``max_expansion`` alternatives (nested unions over ``$ref`` s are exponential
  otherwise: 2^30 alternatives from 3 KB);
- the smallest valid answer of every schema position is computed once (a shortest-derivation fixpoint,
  as for a grammar): a schema with a position that has none (a required property that refers back to its
  own object) or whose smallest answer is huge is refused;
- validation (jsonschema) runs under a step budget, and ``pattern`` is matched with the grammar's own
  linear-time regex engine (llguidance's), never with Python's backtracking ``re``: both sides accept the
  same patterns, and a pattern cannot make validation take exponential time;
- completion is linear in the answer's length, with nesting capped.

Hand-written, not a library: jsonschema's own meta-schema check takes ~0.35 ms per schema node (1.4 s for
the 4000-value cap, measured here) and says nothing about cycles, expansion or satisfiability.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from phi3v_tools.errors import GenerationError, OptionalDependencyError, PromptError

DEFAULT_MAX_STRING = 2000  # characters in any string the model writes
DEFAULT_MAX_ITEMS = 64  # entries in any array or free-form object
MAX_NUMBER = 1e15  # numbers are plain decimals within +-1e15 unless the schema bounds them itself
MAX_SCHEMA_DEPTH = 32  # nesting of a caller's schema, and the longest chain of in-place references
MAX_SCHEMA_NODES = 4000  # dicts, lists and values in a caller's schema
MAX_VALUE_DEPTH = 64  # nesting of an answer
VALIDATION_STEPS = 50_000  # jsonschema keyword checks per validation (~0.1-0.3 s)

_TYPES = frozenset({"string", "number", "integer", "boolean", "null", "array", "object"})
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_SCHEMA_VALUES = ("items", "additionalProperties")
# Keywords whose meaning differs between the JSON Schema drafts, or between the grammar engine and jsonschema:
# refused, so that what constrains decoding is exactly what validates the answer.
_DISAGREEING = {
    "$id": "only the root may carry $id (a nested one changes what $ref means)",
    "$anchor": "refer to definitions with JSON pointers such as '#/$defs/name'",
    "$dynamicAnchor": "refer to definitions with JSON pointers such as '#/$defs/name'",
    "$recursiveAnchor": "refer to definitions with JSON pointers such as '#/$defs/name'",
    "additionalItems": "use prefixItems and items (JSON Schema 2020-12)",
    "dependencies": "it is not supported",
    "x-guidance": "grammar-engine options cannot be set by a caller",
}


@dataclass(frozen=True)
class SchemaLimits:
    """How large and complex a caller's schema may be (the Settings fill the first two)."""

    max_bytes: int = 16384  # compact JSON
    max_string: int = 2000  # characters in any key or string
    max_depth: int = MAX_SCHEMA_DEPTH
    max_nodes: int = MAX_SCHEMA_NODES
    max_expansion: int = 1000  # alternatives one schema position stands for, through $ref/allOf/anyOf/oneOf
    max_minimal_chars: int = 20000  # the smallest valid answer, as compact JSON


DEFAULT_LIMITS = SchemaLimits()


# ---------------------------------------------------------------------------------------------------------------------
# Checking a caller's schema


def check_schema(schema: Any, limits: SchemaLimits = DEFAULT_LIMITS) -> None:
    """Refuse, with a :class:`PromptError` naming the problem, a schema that cannot be used safely.

    Checks everything that does not need the answer-side bounds: the shape of every keyword, sizes, local
    ``$ref`` s, reference cycles and expansion. :func:`prepare_schema` does this and the rest.
    """
    _Walk(schema, limits).check()


def prepare_schema(schema: Any, limits: SchemaLimits = DEFAULT_LIMITS) -> OutputSchema:
    """A caller's schema, fully checked, bounded and analysed: ready for a request. PromptError if unusable."""
    _Walk(schema, limits).check()
    output = OutputSchema(schema, bound_schema(schema))  # same structure, with bounds added: pointers still hold
    output.analyse(limits)
    return output


def _where(path: tuple[str | int, ...]) -> str:
    shown = "/".join(str(p) for p in path) or "(root)"
    return shown if len(shown) <= 120 else f"{shown[:60]}...{shown[-40:]}"


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class _Walk:
    """One pass over a caller's schema: shapes, sizes and references; then the in-place reference graph."""

    def __init__(self, schema: Any, limits: SchemaLimits) -> None:
        self.schema = schema
        self.limits = limits
        self.schemas: dict[str, Any] = {}  # JSON pointer -> every subschema position
        self.refs: list[tuple[str, str, tuple[str | int, ...]]] = []  # (from pointer, target pointer, path)

    def check(self) -> None:
        if not isinstance(self.schema, dict):
            raise PromptError(
                f"the output schema must be a JSON object (a JSON schema), not {type(self.schema).__name__}"
            )
        self._values()
        size = len(json.dumps(self.schema, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
        if size > self.limits.max_bytes:
            raise PromptError(
                f"the output schema has {size} bytes as compact JSON; the limit is {self.limits.max_bytes} "
                "(shorten its descriptions or split the question)"
            )
        self._schema(self.schema, (), "", root=True)
        for _source, target, path in self.refs:
            if target not in self.schemas:
                raise PromptError(
                    f"the output schema's $ref at {_where(path)} points to {'#' + target!r}, which is not a "
                    "schema in this document; define it under '$defs' and refer to it as '#/$defs/name'"
                )
        self._graph()

    def _values(self) -> None:
        """Sizes, depth, string lengths and numbers of every value (iterative: depth is not trusted yet)."""
        nodes = 0
        todo: list[tuple[Any, int, tuple[str | int, ...]]] = [(self.schema, 1, ())]
        while todo:
            node, depth, path = todo.pop()
            nodes += 1
            if nodes > self.limits.max_nodes:
                raise PromptError(f"the output schema is too large: more than {self.limits.max_nodes} values")
            if depth > self.limits.max_depth:
                raise PromptError(f"the output schema is nested more than {self.limits.max_depth} levels deep")
            if isinstance(node, dict):
                for key, value in node.items():
                    self._string(key, path, "a key")
                    todo.append((value, depth + 1, (*path, key)))
            elif isinstance(node, list):
                todo.extend((value, depth + 1, (*path, i)) for i, value in enumerate(node))
            elif isinstance(node, str):
                self._string(node, path, "a string")
            elif isinstance(node, float) and not math.isfinite(node):
                raise PromptError(f"the output schema has a non-finite number ({node}) at {_where(path)}")
            elif isinstance(node, int) and not isinstance(node, bool) and abs(node) > 2**53:
                raise PromptError(
                    f"the output schema has a number beyond 2^53 at {_where(path)}: JSON tools cannot exchange it "
                    "exactly"
                )
            elif not (node is None or isinstance(node, bool | int | float)):
                raise PromptError(f"the output schema holds a {type(node).__name__} at {_where(path)}: not JSON")

    def _string(self, text: Any, path: tuple[str | int, ...], what: str) -> None:
        if not isinstance(text, str):
            raise PromptError(f"the output schema has a non-string key at {_where(path)}")
        if len(text) > self.limits.max_string:
            raise PromptError(
                f"the output schema has {what} of {len(text)} characters at {_where(path)}; the limit is "
                f"{self.limits.max_string}"
            )
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise PromptError(f"the output schema has {what} with a lone surrogate at {_where(path)}") from None

    def _schema(self, node: Any, path: tuple[str | int, ...], pointer: str, *, root: bool = False) -> None:
        """Check one subschema position (a dict or a boolean) and the positions below it."""
        self.schemas[pointer] = node
        if isinstance(node, bool):
            return
        if not isinstance(node, dict):
            raise PromptError(
                f"the output schema has a {type(node).__name__} where a schema belongs, at {_where(path)}"
            )

        def bad(key: str, wanted: str) -> PromptError:
            shown = json.dumps(node[key], ensure_ascii=False)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            return PromptError(f"the output schema's {key!r} at {_where(path)} must be {wanted}, not {shown}")

        for key in node:
            if key in _DISAGREEING and not (key == "$id" and root):
                raise PromptError(f"the output schema uses {key!r} at {_where(path)}: {_DISAGREEING[key]}")
        for key in _COUNTS:
            if key in node and not _is_count(node[key]):
                raise bad(key, "a non-negative integer")
        for key in _BOUNDS:
            if key in node and not _is_number(node[key]):
                raise bad(key, "a number")
        if "multipleOf" in node and node["multipleOf"] <= 0:
            raise bad("multipleOf", "a number above 0")
        kind = node.get("type")
        if kind is not None:
            kinds = kind if isinstance(kind, list) else [kind]
            if not kinds or not all(isinstance(k, str) and k in _TYPES for k in kinds):
                raise bad("type", f"one of {', '.join(sorted(_TYPES))} or a non-empty list of them")
        if "required" in node and not (
            isinstance(node["required"], list) and all(isinstance(k, str) for k in node["required"])
        ):
            raise bad("required", "a list of property names")
        if "enum" in node and not (isinstance(node["enum"], list) and node["enum"]):
            raise bad("enum", "a non-empty list")
        for key in ("pattern", "format", "$ref", "$schema", "title", "description", "$comment"):
            if key in node and not isinstance(node[key], str):
                raise bad(key, "a string")
        for key in _SCHEMA_MAPS:
            if key in node:
                if not isinstance(node[key], dict):
                    raise bad(key, "an object of schemas")
                for name, sub in node[key].items():
                    self._schema(sub, (*path, key, name), f"{pointer}/{_escape(key)}/{_escape(name)}")
        for key in _SCHEMA_LISTS:
            if key in node:
                if not (isinstance(node[key], list) and node[key]):
                    raise bad(key, "a non-empty list of schemas")
                for i, sub in enumerate(node[key]):
                    self._schema(sub, (*path, key, i), f"{pointer}/{key}/{i}")
        for key in _SCHEMA_VALUES:
            if key in node:
                if isinstance(node[key], list):
                    raise bad(key, "one schema (for a list of per-position schemas use prefixItems)")
                self._schema(node[key], (*path, key), f"{pointer}/{key}")
        if "pattern" in node:
            _regex(node["pattern"], f"the output schema's pattern at {_where(path)}")
        for name in node.get("patternProperties", {}):
            _regex(name, f"the output schema's patternProperties key {name[:60]!r} at {_where(path)}")
        if "$ref" in node:
            self.refs.append((pointer, _pointer(node["$ref"], path), path))

    def _graph(self) -> None:
        """No cycle of in-place references; bounded chains and expansion (each position's alternatives)."""
        edges: dict[str, list[str]] = {}
        for pointer, node in self.schemas.items():
            if isinstance(node, dict):
                out = [
                    f"{pointer}/{key}/{i}" for key in ("allOf", "anyOf", "oneOf") for i in range(len(node.get(key, ())))
                ]
                if "$ref" in node:
                    out.append(_pointer(node["$ref"], ()))
                edges[pointer] = out
        expansion: dict[str, int] = {}
        total = 0
        chain: dict[str, int] = {}
        state: dict[str, int] = {}  # 1: on the stack, 2: done
        for start in edges:
            if start in state:
                continue
            stack: list[tuple[str, Iterator[str]]] = [(start, iter(edges[start]))]
            state[start] = 1
            while stack:
                pointer, children = stack[-1]
                child = next(children, None)
                if child is None:
                    stack.pop()
                    state[pointer] = 2
                    subs = edges[pointer]
                    expansion[pointer] = 1 + sum(expansion.get(c, 1) for c in subs)
                    chain[pointer] = 1 + max((chain.get(c, 1) for c in subs), default=0)
                    total += expansion[pointer]
                    if expansion[pointer] > self.limits.max_expansion:
                        raise PromptError(
                            f"the output schema's anyOf/allOf/oneOf and $refs at {_shown_pointer(pointer)} expand to "
                            f"more than {self.limits.max_expansion} alternatives; simplify the unions"
                        )
                    if total > 20 * self.limits.max_expansion:
                        raise PromptError(
                            f"the output schema's anyOf/allOf/oneOf and $refs together expand to more than "
                            f"{20 * self.limits.max_expansion} alternatives; simplify the unions"
                        )
                    if chain[pointer] > self.limits.max_depth:
                        raise PromptError(
                            f"the output schema chains more than {self.limits.max_depth} $refs/anyOf/allOf/oneOf "
                            f"at {_shown_pointer(pointer)}"
                        )
                    continue
                if child not in edges:  # a boolean schema
                    continue
                if state.get(child) == 1:
                    raise PromptError(
                        f"the output schema refers to itself without nesting: {_shown_pointer(child)} is reached "
                        "again through $ref/allOf/anyOf/oneOf before any property or item; such a schema has no "
                        "meaning (put the recursion inside 'properties' or 'items')"
                    )
                if child not in state:
                    state[child] = 1
                    stack.append((child, iter(edges[child])))


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


def _pointer(ref: str, path: tuple[str | int, ...]) -> str:
    """The JSON pointer (escaped form, as stored in _Walk.schemas) that a local ``$ref`` names."""
    if not ref.startswith("#"):
        raise PromptError(
            f"the output schema refers to {ref[:100]!r} at {_where(path)}: only local references such as "
            "'#/$defs/name' are allowed (include the definitions in the schema)"
        )
    fragment = unquote(ref[1:])  # a URI fragment: %xx first, then the pointer's own ~0/~1
    if fragment and not fragment.startswith("/"):
        raise PromptError(
            f"the output schema refers to the anchor {ref[:100]!r} at {_where(path)}: use JSON pointers such as "
            "'#/$defs/name'"
        )
    return "/".join(_escape(part.replace("~1", "/").replace("~0", "~")) for part in fragment.split("/"))


def _shown_pointer(pointer: str) -> str:
    shown = "#" + pointer
    return shown if len(shown) <= 100 else f"{shown[:50]}...{shown[-40:]}"


def _resolve_pointer(root: Any, pointer: str) -> Any:
    node = root
    for part in pointer.split("/")[1:]:
        name = part.replace("~1", "/").replace("~0", "~")
        node = node[int(name)] if isinstance(node, list) else node[name]
    return node


# ---------------------------------------------------------------------------------------------------------------------
# Patterns: the grammar engine's linear-time regexes on both sides


class _ByteTokens:
    """A tokenizer of single bytes for llguidance, so a regex can be matched against any text."""

    eos_token_id = 256
    bos_token_id = None
    tokens = [bytes([i]) for i in range(256)] + [b"<eos>"]
    special_token_ids = [256]

    def __call__(self, text: bytes | str) -> list[int]:
        return list(text.encode("utf-8") if isinstance(text, str) else text)


_REGEX_LOCK = threading.Lock()
_REGEX_TOKENIZER: Any = None
_REGEXES: OrderedDict[str, str] = OrderedDict()  # pattern -> its compiled grammar (bounded)
PATTERN_STEPS = 300  # what one regex match costs in validation steps (~1.5 ms each), plus one per 4 characters


def _regex(pattern: str, what: str) -> Any:
    """A matcher of JSON strings whose text contains a match of ``pattern`` (JSON Schema's search semantics).

    It is the grammar engine's own compilation of ``{"type": "string", "pattern": pattern}``, so decoding
    and validation agree on every pattern, anchors and Unicode classes included. The grammar is cached; the
    matcher is new each time (copies of one matcher share its pool of regex states, which wears out).
    """
    global _REGEX_TOKENIZER
    try:
        import llguidance
        from llguidance._tokenizer import TokenizerWrapper
    except ImportError:  # a tools-only install: the only regex engine we trust with a caller's pattern is absent
        raise OptionalDependencyError("llguidance", "local", f"{what[:1].upper()}{what[1:]}", alone=True) from None

    with _REGEX_LOCK:
        if _REGEX_TOKENIZER is None:
            _REGEX_TOKENIZER = llguidance.LLTokenizer(TokenizerWrapper(_ByteTokens()))
        tokenizer = _REGEX_TOKENIZER
        grammar = _REGEXES.get(pattern)
        if grammar is not None:
            _REGEXES.move_to_end(pattern)
            return llguidance.LLMatcher(tokenizer, grammar, log_level=0)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        json.dumps({"type": "string", "pattern": pattern}), defaults={"whitespace_flexible": False}
    )
    matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
    if matcher.is_error():
        lines = matcher.get_error().splitlines()
        problem = next((line[7:] for line in lines if line.startswith("error: ")), lines[0] if lines else "")
        raise PromptError(
            f"{what} is not a regular expression the grammar engine accepts (Rust regex syntax, no look-around "
            f"or backreferences): {problem[:200]}"
        )
    with _REGEX_LOCK:
        _REGEXES[pattern] = grammar
        while len(_REGEXES) > 256:
            _REGEXES.popitem(last=False)
    return matcher


def pattern_matches(pattern: str, text: str) -> bool:
    """Whether ``text`` contains a match of ``pattern``, in time linear in ``len(text)``."""
    matcher = _regex(pattern, "the pattern")
    encoded = (
        json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f").encode("utf-8")
    )  # as the grammar writes it
    matched = bool(matcher.consume_tokens(list(encoded))) and bool(matcher.is_accepting())
    if not matched and matcher.is_error() and "doesn't satisfy the grammar" not in matcher.get_error():
        raise GenerationError(
            f"the answer could not be checked against the pattern {pattern[:60]!r}: it is too complex"
        )
    return matched


# ---------------------------------------------------------------------------------------------------------------------
# Bounding and the prompt


def bound_schema(
    schema: dict[str, Any], max_string: int = DEFAULT_MAX_STRING, max_items: int = DEFAULT_MAX_ITEMS
) -> dict[str, Any]:
    """A copy of ``schema`` in which every string, array and free-form object has an upper size bound."""
    bounded = copy.deepcopy(schema)
    combined = _combined(bounded)

    def visit(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                visit(item)
            return
        if not isinstance(node, dict):
            return
        types = node.get("type")
        types = set(types) if isinstance(types, list) else {types}
        if "string" in types and "enum" not in node and "const" not in node:
            node["maxLength"] = min(int(node.get("maxLength", max_string)), max_string)
        if "array" in types:
            node["maxItems"] = min(int(node.get("maxItems", max_items)), max_items)
        if types & {"integer", "number"}:  # plain decimals in a float-safe range: no 1e999 -> inf
            limit = MAX_NUMBER if "number" in types else int(MAX_NUMBER)
            node.setdefault("minimum", -limit)
            node.setdefault("maximum", limit)
        if "object" in types or "properties" in node:
            extra = node.get("additionalProperties")
            props = node.get("properties", {})
            if props and extra is None and id(node) not in combined:
                node["additionalProperties"] = False  # no invented keys
            elif extra is not False and set(props) <= set(node.get("required", [])):
                # llguidance bounds the key count only when every declared key is required; otherwise the
                # object stays unbounded in the grammar and truncation closing still guarantees validity.
                node["maxProperties"] = min(
                    int(node.get("maxProperties", max_items + len(props))), max_items + len(props)
                )
        for key, value in node.items():
            if key in ("properties", "$defs", "definitions", "patternProperties"):
                if isinstance(value, dict):
                    for sub in value.values():
                        visit(sub)
            elif key in ("items", "additionalProperties", "anyOf", "oneOf", "allOf", "prefixItems", "not"):
                visit(value)

    visit(bounded)
    return bounded


def _combined(schema: dict[str, Any]) -> set[int]:
    """The objects that allOf (or a $ref with sibling keywords) combines with others: closing one of them to
    its own properties would forbid the others' keys, and leave no valid answer."""
    todo: list[Any] = []
    stack: list[Any] = [schema]
    while stack:  # every dict holding allOf, or a $ref beside other assertions
        node = stack.pop()
        if isinstance(node, dict):
            own = {k: v for k, v in node.items() if k not in ("$ref", "allOf")}
            parts = len(node.get("allOf", ())) + ("$ref" in node) + _asserts(own)
            if parts > 1:  # a single allOf member or a bare $ref combines nothing
                todo.append(node)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    found: set[int] = set()
    while todo:
        node = todo.pop()
        if not isinstance(node, dict) or id(node) in found:
            continue
        found.add(id(node))
        for key in ("allOf", "anyOf", "oneOf"):
            todo.extend(node.get(key, ()))
        if isinstance(node.get("$ref"), str):
            with contextlib.suppress(PromptError, LookupError, ValueError, TypeError):  # dangling: refused elsewhere
                todo.append(_resolve_pointer(schema, _pointer(node["$ref"], ())))
    return found


def schema_prompt(schema: dict[str, Any]) -> str:
    """The instruction appended to the user's message so the model knows the shape it is writing."""
    return "Answer with one JSON object, no other text, matching this JSON schema:\n" + json.dumps(
        schema, separators=(",", ":"), ensure_ascii=False
    )


# ---------------------------------------------------------------------------------------------------------------------
# Validation, under a budget


class _Budget(threading.local):
    left: int = 0


_BUDGET = _Budget()
_VALIDATORS: dict[type, type] = {}
_VALIDATORS_LOCK = threading.Lock()


class _OutOfSteps(Exception):
    pass


def _validator_class(base: Any) -> Any:
    """``base`` with every keyword counted against the budget, and patterns matched by the grammar's engine."""
    import jsonschema

    with _VALIDATORS_LOCK:
        cls = _VALIDATORS.get(base)
        if cls is not None:
            return cls

        def counted(check: Any) -> Any:
            def keyword(validator: Any, value: Any, instance: Any, schema: Any) -> Any:
                _BUDGET.left -= 1
                if _BUDGET.left < 0:
                    raise _OutOfSteps
                yield from check(validator, value, instance, schema) or ()

            return keyword

        def matches(regex: str, text: str) -> bool:  # a match costs what hundreds of keyword checks do
            _BUDGET.left -= PATTERN_STEPS + len(text) // 4
            if _BUDGET.left < 0:
                raise _OutOfSteps
            return pattern_matches(regex, text)

        def pattern(validator: Any, value: str, instance: Any, schema: Any) -> Iterator[Any]:
            if validator.is_type(instance, "string") and not matches(value, instance):
                shown = instance if len(instance) <= 60 else instance[:57] + "..."
                yield jsonschema.ValidationError(f"{shown!r} does not match {value[:100]!r}")

        def pattern_properties(validator: Any, value: dict[str, Any], instance: Any, schema: Any) -> Iterator[Any]:
            if not validator.is_type(instance, "object"):
                return
            for regex, sub in value.items():
                for key, item in instance.items():
                    if matches(regex, key):
                        yield from validator.descend(item, sub, path=key, schema_path=regex)

        checks = dict(base.VALIDATORS)
        checks["pattern"] = pattern
        checks["patternProperties"] = pattern_properties
        checks.pop("format", None)  # an annotation, as by default; the grammar enforces the formats it knows
        cls = jsonschema.validators.extend(base, {k: counted(v) for k, v in checks.items()})
        _VALIDATORS[base] = cls
        return cls


def validate(value: Any, schema: dict[str, Any], steps: int = VALIDATION_STEPS) -> str | None:
    """None when ``value`` conforms to ``schema``, else the first error in words; at most ``steps`` checks.

    JSON Schema 2020-12 semantics whatever ``$schema`` says (the grammar engine knows only those).
    Raises :class:`GenerationError` when the budget runs out or the value nests too deeply.
    """
    import jsonschema

    if _depth(value) > MAX_VALUE_DEPTH:
        raise GenerationError(f"the answer is nested more than {MAX_VALUE_DEPTH} levels deep")
    cls = _validator_class(jsonschema.Draft202012Validator)
    _BUDGET.left = steps
    try:
        error = jsonschema.exceptions.best_match(cls(schema).iter_errors(value))
    except _OutOfSteps:
        raise GenerationError(
            f"the answer could not be checked against the schema within {steps} steps: the schema's allOf/anyOf "
            "combinations are too expensive to check; simplify them"
        ) from None
    except RecursionError:
        raise GenerationError("the answer could not be checked against the schema: it nests too deeply") from None
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "(root)"
    message = error.message if len(error.message) <= 300 else error.message[:297] + "..."
    return f"{where}: {message}"


def _depth(value: Any) -> int:
    deepest = 0
    todo = [(value, 1)]
    while todo:
        node, depth = todo.pop()
        if depth > deepest:
            deepest = depth
            if deepest > MAX_VALUE_DEPTH:
                break
        if isinstance(node, dict):
            todo.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            todo.extend((v, depth + 1) for v in node)
    return deepest


# ---------------------------------------------------------------------------------------------------------------------
# The prepared schema: views, smallest values, completion

_MISSING = object()
_NO_VALUE = math.inf  # the cost of a position that has no finite valid value
_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "deprecated", "readOnly"})


@dataclass
class OutputSchema:
    """A caller's schema after :func:`prepare_schema`: the bounded copy, and what completion needs of it.

    A *view* of a schema position is one flat dict: ``$ref`` followed and ``allOf`` merged (the merge is an
    approximation used only to complete a cut answer; validation is exact). Every view has its smallest
    valid answer's cost (compact JSON characters, or infinity) and, for a union, the alternative that
    achieves it.
    """

    schema: dict[str, Any]  # as the caller wrote it: the prompt shows this
    bounded: dict[str, Any]  # grammar, validation and completion use this
    _views: dict[int, dict[str, Any]] = field(default_factory=dict, repr=False)
    _alternatives: dict[int, list[dict[str, Any]]] = field(default_factory=dict, repr=False)
    _cost: dict[int, float] = field(default_factory=dict, repr=False)
    _keep: list[Any] = field(default_factory=list, repr=False)  # what the cached ids refer to, kept alive
    _analysed: bool = False

    @property
    def prompt(self) -> str:
        return schema_prompt(self.schema)

    # -- views ----------------------------------------------------------------------------------------------------

    def view(self, node: Any) -> dict[str, Any]:
        """The flat view of one schema position (``True`` and absent schemas are ``{}``)."""
        if not isinstance(node, dict):
            return _FALSE if node is False else _ANY
        cached = self._views.get(id(node))
        if cached is not None:
            return cached
        parts = [{k: v for k, v in node.items() if k not in ("$ref", "allOf")}]
        if "$ref" in node:
            parts.append(self.view(_resolve_pointer(self.bounded, _pointer(node["$ref"], ()))))
        parts.extend(self.view(member) for member in node.get("allOf", ()))
        merged = parts[0] if len(parts) == 1 else _merge(parts)
        self._views[id(node)] = merged
        self._keep.append(node)
        return merged

    def alternatives(self, view: dict[str, Any]) -> list[dict[str, Any]]:
        """The non-union views a (possibly nested) anyOf/oneOf stands for, siblings merged in, in order."""
        cached = self._alternatives.get(id(view))
        if cached is not None:
            return cached
        branches = view.get("anyOf") or view.get("oneOf")
        if not branches:
            result = [view]
        else:
            rest = {k: v for k, v in view.items() if k not in ("anyOf", "oneOf")}
            result = []
            for branch in branches:
                branch_view = self.view(branch)
                merged = branch_view if not _asserts(rest) else _merge([branch_view, rest])
                result.extend(self.alternatives(merged))
        self._alternatives[id(view)] = result
        self._keep.append(view)
        return result

    # -- smallest values --------------------------------------------------------------------------------------------

    def analyse(self, limits: SchemaLimits = DEFAULT_LIMITS) -> None:
        """Compute every reachable position's smallest answer; PromptError if one has none or it is too big."""
        views: list[dict[str, Any]] = []
        seen: set[int] = set()
        todo = [self.view(self.bounded)]
        while todo:  # every view reachable from the root, through values (properties, items) and unions
            view = todo.pop()
            if id(view) in seen:
                continue
            seen.add(id(view))
            views.append(view)
            if len(views) > 20 * limits.max_expansion:
                raise PromptError("the output schema's unions and $refs expand to too many alternatives; simplify them")
            alternatives = self.alternatives(view)
            if len(alternatives) > 1:
                todo.extend(alternatives)
                continue
            todo.extend(self.view(sub) for sub in _children(view))
        cap = limits.max_minimal_chars + 1
        for view in views:
            self._cost[id(view)] = _NO_VALUE
        for _ in range(MAX_VALUE_DEPTH + 1):  # each pass settles one more level of the smallest answers
            changed = False
            for view in reversed(views):
                cost = self._compute_cost(view)
                cost = cost if cost == _NO_VALUE else min(cost, cap)
                if cost < self._cost[id(view)]:
                    self._cost[id(view)] = cost
                    changed = True
            if not changed:
                break
        for view in views:
            cost = self._cost[id(view)]
            if cost == _NO_VALUE:
                raise PromptError(
                    "the output schema has a part that no answer can satisfy: "
                    + (
                        "a 'false' schema"
                        if view is _FALSE
                        else f"an {_describe(view)} needs a property or item that is not allowed, or one that refers "
                        "back to it (make that property optional or nullable), or has a minimum length or count above "
                        f"its maximum (answers are capped at {DEFAULT_MAX_STRING} characters and {DEFAULT_MAX_ITEMS} "
                        "items)"
                    )
                )
            if cost >= cap:
                raise PromptError(
                    f"the output schema's smallest valid answer for an {_describe(view)} has more than "
                    f"{limits.max_minimal_chars} characters (minItems/minLength/required fields multiply); lower them"
                )
        self._analysed = True

    def _compute_cost(self, view: dict[str, Any]) -> float:
        if view is _FALSE:
            return _NO_VALUE
        alternatives = self.alternatives(view)
        if len(alternatives) > 1:
            return min(self._cost.get(id(a), _NO_VALUE) for a in alternatives)
        if "const" in view:
            return len(json.dumps(view["const"]))
        if "enum" in view:
            return len(json.dumps(view["enum"][0]))
        kinds = _types(view)
        if not kinds or "null" in kinds:
            return 4
        kind = kinds[0]
        if kind == "string":
            if view.get("minLength", 0) > view.get("maxLength", math.inf):
                return _NO_VALUE
            return 2 + int(view.get("minLength", 0))
        if kind in ("integer", "number"):
            return 2
        if kind == "boolean":
            return 5
        if kind == "array":
            count = int(view.get("minItems", 0))
            if count > view.get("maxItems", count):
                return _NO_VALUE
            prefix = min(count, len(view.get("prefixItems", ())))
            total = 2.0 + sum(1 + self._sub_cost(_item_schema(view, i)) for i in range(prefix))
            return total + (count - prefix) * (1 + self._sub_cost(view.get("items"))) if count > prefix else total
        props = view.get("properties", {})
        total = 2.0
        for name in view.get("required", []):
            total += len(name) + 4 + self._sub_cost(props.get(name, view.get("additionalProperties")))
        return total

    def _sub_cost(self, node: Any) -> float:
        """The current cost of a value position (``None``/``True``: anything, so null)."""
        if node is None or node is True:
            return 4
        if node is False:
            return _NO_VALUE
        return self._cost.get(id(self.view(node)), _NO_VALUE)

    def minimal(self, node: Any) -> Any:
        """The smallest valid value of a schema position (for fields the model never reached)."""
        return self._minimal(self.view(node), 0)

    def _minimal(self, view: dict[str, Any], depth: int) -> Any:
        if depth > MAX_VALUE_DEPTH:
            raise GenerationError(f"the schema's smallest answer nests more than {MAX_VALUE_DEPTH} levels deep")
        alternatives = self.alternatives(view)
        if len(alternatives) > 1:
            nullable = [a for a in alternatives if "null" in _types(a) and "const" not in a and "enum" not in a]
            return self._minimal(nullable[0] if nullable else min(alternatives, key=self._cost_of), depth + 1)
        if "const" in view:
            return copy.deepcopy(view["const"])
        if "enum" in view:
            return copy.deepcopy(view["enum"][0])
        kinds = _types(view)
        if not kinds or "null" in kinds:
            return None
        kind = kinds[0]
        if kind == "string":
            return _finish_string("", view)
        if kind in ("integer", "number"):
            return fit_number(0, view, integer=kind == "integer")
        if kind == "boolean":
            return False
        if kind == "array":
            count = int(view.get("minItems", 0))
            return [self._minimal(self.view(_item_schema(view, i)), depth + 1) for i in range(count)]
        if kind == "object":
            props = view.get("properties", {})
            result = {}
            for name in view.get("required", []):
                result[name] = self._minimal(self.view(props.get(name, view.get("additionalProperties"))), depth + 1)
            return result
        return None

    def _cost_of(self, view: dict[str, Any]) -> float:
        return self._cost.get(id(view), _NO_VALUE)

    # -- completion -------------------------------------------------------------------------------------------------

    def complete(self, prefix: str) -> Any:
        """The value of a JSON text cut short, closed and completed to satisfy the schema where it can.

        Open strings are closed (an enum string by its first matching member), half-written numbers and
        literals are finished, a key without a value is dropped, and required properties that were never
        reached get their smallest valid value. Linear in ``len(prefix)``; nesting is capped.
        """
        if not self._analysed:
            self.analyse()
        value = _PartialParser(prefix.lstrip(), self).value(self.bounded, 0)
        return self.minimal(self.bounded) if value is _MISSING else value

    def validate(self, value: Any) -> str | None:
        return validate(value, self.bounded)


_ANY: dict[str, Any] = {}
_FALSE: dict[str, Any] = {"not": {}}


def _merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One view standing for all of ``parts`` (allOf): properties and required united, other keys first-wins."""
    merged: dict[str, Any] = {}
    for part in parts:
        if part is _FALSE:
            return _FALSE
        for key, value in part.items():
            if key == "properties":
                merged["properties"] = {**value, **merged.get("properties", {})}
            elif key == "required":
                merged["required"] = list(dict.fromkeys([*merged.get("required", []), *value]))
            elif key == "type" and "type" in merged:
                mine = merged["type"] if isinstance(merged["type"], list) else [merged["type"]]
                theirs = value if isinstance(value, list) else [value]
                both = [t for t in mine if t in theirs or (t == "integer" and "number" in theirs)]
                both += [t for t in theirs if t == "integer" and "number" in mine and t not in both]
                if not both:
                    return _FALSE
                merged["type"] = both
            else:
                merged.setdefault(key, value)
    return merged


def _asserts(view: dict[str, Any]) -> bool:
    return any(key not in _ANNOTATIONS for key in view)


def _children(view: dict[str, Any]) -> Iterator[Any]:
    for key in ("properties", "patternProperties"):
        yield from view.get(key, {}).values()
    for key in ("items", "additionalProperties"):
        if isinstance(view.get(key), dict):
            yield view[key]
    yield from view.get("prefixItems", ())


def _item_schema(view: dict[str, Any], index: int) -> Any:
    """The schema of item ``index`` of an array (prefixItems, then items; None when any value goes)."""
    prefix = view.get("prefixItems", ())
    return prefix[index] if index < len(prefix) else view.get("items")


def _describe(view: dict[str, Any]) -> str:
    names = list(view.get("properties", {}))[:3]
    if names:
        return f"object with properties {', '.join(repr(n[:40]) for n in names)}"
    return f"element of type {'/'.join(_types(view)) or 'any'}"


def _types(node: dict[str, Any]) -> list[str]:
    kind = node.get("type")
    if isinstance(kind, list):
        return kind
    if kind is not None:
        return [kind]
    if "properties" in node:
        return ["object"]
    if "items" in node or "prefixItems" in node:
        return ["array"]
    return []


def fit_number(value: float, node: dict[str, Any], *, integer: bool) -> int | float:
    """``value`` moved into the node's [exclusive]minimum/maximum (and made whole for integers)."""
    if not math.isfinite(value):
        value = 0
    low, high = node.get("minimum"), node.get("maximum")
    above, below = node.get("exclusiveMinimum"), node.get("exclusiveMaximum")
    if integer:
        if low is not None:
            low = math.ceil(low)
        if high is not None:
            high = math.floor(high)
        if above is not None:
            low = max(low, math.floor(above) + 1) if low is not None else math.floor(above) + 1
        if below is not None:
            high = min(high, math.ceil(below) - 1) if high is not None else math.ceil(below) - 1
        value = math.floor(value) if value >= 0 else math.ceil(value)
    else:  # a readable value strictly inside exclusive bounds: one unit in, or halfway when that is too far
        if above is not None:
            ceiling = below if below is not None else high
            step_in = above + 1 if ceiling is None or above + 1 < ceiling else (above + ceiling) / 2
            low = max(low, step_in) if low is not None else step_in
        if below is not None:
            floor_ = above if above is not None else low
            step_in = below - 1 if floor_ is None or below - 1 > floor_ else (below + floor_) / 2
            high = min(high, step_in) if high is not None else step_in
    if low is not None and value < low:
        value = low
    if high is not None and value > high:
        value = high
    return int(value) if integer else value


class _PartialParser:
    """Recursive descent over a JSON prefix; every method returns a complete value or ``_MISSING``."""

    def __init__(self, text: str, output: OutputSchema) -> None:
        self.text = text
        self.i = 0
        self.output = output

    def _peek(self) -> str:
        while self.i < len(self.text) and self.text[self.i] in " \t\r\n":
            self.i += 1
        return self.text[self.i] if self.i < len(self.text) else ""

    def value(self, node: Any, depth: int) -> Any:
        if depth > MAX_VALUE_DEPTH:
            raise GenerationError(f"the answer is nested more than {MAX_VALUE_DEPTH} levels deep")
        view = self._branch(self.output.view(node))
        c = self._peek()
        if not c:
            return _MISSING
        if c == "{":
            return self._object(view, depth)
        if c == "[":
            return self._array(view, depth)
        if c == '"':
            text, _closed = self._string()
            return _finish_string(text, view)
        return self._scalar(view)

    def _branch(self, view: dict[str, Any]) -> dict[str, Any]:
        """For anyOf/oneOf (nested too), the alternative whose type matches what the text starts with."""
        alternatives = self.output.alternatives(view)
        if len(alternatives) == 1:
            return alternatives[0]
        c = self._peek()
        wanted = {"{": "object", "[": "array", '"': "string", "t": "boolean", "f": "boolean", "n": "null"}.get(
            c, "number" if c in "-0123456789" else ""
        )
        for branch in alternatives:
            types = _types(branch)
            if wanted in types or (wanted == "number" and "integer" in types) or ("enum" in branch and c == '"'):
                return branch
        return alternatives[0]

    def _object(self, view: dict[str, Any], depth: int) -> dict[str, Any]:
        self.i += 1  # {
        props = view.get("properties", {})
        extra = view.get("additionalProperties")
        result: dict[str, Any] = {}
        while True:
            c = self._peek()
            if c == "}":
                self.i += 1
                return result
            if c == ",":
                self.i += 1
                continue
            if c != '"':
                break
            key, closed = self._string()
            if not closed or self._peek() != ":":
                break
            self.i += 1  # :
            sub = props.get(key, extra if isinstance(extra, dict) else {})
            value = self.value(sub, depth + 1)
            if value is _MISSING:
                break
            result[key] = value
        for name in view.get("required", []):  # truncated: complete the required fields
            if name not in result:
                result[name] = self.output.minimal(props.get(name, extra))
        return result

    def _array(self, view: dict[str, Any], depth: int) -> list[Any]:
        self.i += 1  # [
        result: list[Any] = []
        while True:
            c = self._peek()
            if c == "]":
                self.i += 1
                return result
            if c == ",":
                self.i += 1
                continue
            if not c:
                break
            value = self.value(_item_schema(view, len(result)), depth + 1)
            if value is _MISSING:
                break
            result.append(value)
        result.extend(self.output.minimal(_item_schema(view, i)) for i in range(len(result), view.get("minItems", 0)))
        return result

    def _string(self) -> tuple[str, bool]:
        """A string starting at the quote: (its text so far, whether it was closed)."""
        self.i += 1
        out: list[str] = []
        while self.i < len(self.text):
            c = self.text[self.i]
            if c == '"':
                self.i += 1
                return "".join(out), True
            if c == "\\":
                escape = self.text[self.i : self.i + 6]
                try:
                    length = 6 if escape[1:2] == "u" else 2
                    if len(escape) < length:
                        raise ValueError("cut escape")
                    out.append(json.loads(f'"{self.text[self.i : self.i + length]}"'))
                except (ValueError, IndexError):
                    self.i = len(self.text)
                    break
                self.i += length
                continue
            out.append(c)
            self.i += 1
        return "".join(out), False

    def _scalar(self, view: dict[str, Any]) -> Any:
        start = self.i
        while self.i < len(self.text) and self.text[self.i] not in ",]}":
            self.i += 1
        token = self.text[start : self.i].strip()[:400]  # no number needs more; a longer token is garbage
        members = [view["const"]] if "const" in view else view.get("enum")
        if members is not None:  # a cut member of a numeric (or literal) enum: the first member it starts
            written = [m for m in members if not isinstance(m, str | dict | list)]
            starting = [m for m in written if json.dumps(m).startswith(token)]
            return copy.deepcopy((starting or written or members)[0])
        for literal, value in (("true", True), ("false", False), ("null", None)):
            if token and literal.startswith(token):
                return value
        while token:
            try:
                number = json.loads(token)
                break
            except ValueError:
                token = token[:-1]  # "12." -> "12", "-" -> ""
        else:
            return self.output._minimal(view, 0)
        if not isinstance(number, int | float) or isinstance(number, bool):
            return self.output._minimal(view, 0)
        return fit_number(number, view, integer="integer" in _types(view) and "number" not in _types(view))


def _finish_string(text: str, node: dict[str, Any]) -> str:
    if "enum" in node:
        members = [m for m in node["enum"] if isinstance(m, str)]
        matching = [m for m in members if m.startswith(text)]
        return matching[0] if matching else (members[0] if members else text)
    if "maxLength" in node:
        text = text[: int(node["maxLength"])]
    return text.ljust(int(node.get("minLength", 0)), "-")


# ---------------------------------------------------------------------------------------------------------------------
# Plain functions over a schema (for callers that have no prepared schema)


def complete_json(prefix: str, schema: dict[str, Any]) -> Any:
    """:meth:`OutputSchema.complete` for an already bounded (or any trusted) ``schema``."""
    output = OutputSchema(schema, schema)
    _Walk(schema, DEFAULT_LIMITS).check()
    return output.complete(prefix)


def minimal_value(node: Any, root: dict[str, Any]) -> Any:
    """The smallest value valid for ``node``, a position of the schema ``root``."""
    output = OutputSchema(root, root)
    _Walk(root, DEFAULT_LIMITS).check()
    output.analyse()
    return output.minimal(node)
