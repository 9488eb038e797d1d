"""JSON-schema-constrained generation: bounded schemas, llguidance grammars, and closing truncated output.

Three guarantees make "the result always validates" hold even for a model that rambles:

1. :func:`bound_schema` caps every string (``maxLength``), array (``maxItems``) and free-form object
   (``maxProperties``) and forbids undeclared keys, so the grammar itself cannot run forever;
2. the grammar is compiled with compact separators and no free whitespace (llguidance);
3. if the token budget runs out first, :func:`complete_json` closes what is open (the current string,
   arrays, objects) and fills required fields with their smallest valid values; the result is marked
   truncated, and it is validated like any other: one that does not validate is an error, never a success.

llguidance was chosen over xgrammar by measurement on Phi-3's tokenizer (benchmarks/README.md): compile
~1-7 ms vs ~1-2 s, mask p50 ~150 us vs ~0.4-8 ms per token.
"""

from __future__ import annotations

import copy
import json
import math
import threading
from collections.abc import Sequence
from typing import Any

import torch

from phi3v_tools.errors import GenerationError, PromptError

DEFAULT_MAX_STRING = 2000  # characters in any string the model writes
DEFAULT_MAX_ITEMS = 64  # entries in any array or free-form object
MAX_NUMBER = 1e15  # numbers are plain decimals within +-1e15 unless the schema bounds them itself
MAX_SCHEMA_DEPTH = 32  # nesting of objects/arrays/lists in a caller's schema
MAX_SCHEMA_NODES = 4000  # dicts, lists and values in a caller's schema
_MISSING = object()


# ---------------------------------------------------------------------------------------------------------------------
# Schemas


def check_schema(schema: Any) -> None:
    """Refuse a caller's JSON schema that is not an object, too deep or large to handle, or refers elsewhere.

    Runs before anything recursive touches the schema (bounding, grammar compilation, validation), so a
    hostile schema is a :class:`PromptError` naming the problem, not a RecursionError or a fetch: only
    local ``$ref`` s (``#/$defs/...``) are allowed; nothing is ever downloaded.
    """
    if not isinstance(schema, dict):
        raise PromptError(f"the output schema must be a JSON object (a JSON schema), not {type(schema).__name__}")
    nodes = 0
    todo: list[tuple[Any, int]] = [(schema, 1)]
    while todo:
        node, depth = todo.pop()
        nodes += 1
        if nodes > MAX_SCHEMA_NODES:
            raise PromptError(f"the output schema is too large: more than {MAX_SCHEMA_NODES} values")
        if depth > MAX_SCHEMA_DEPTH:
            raise PromptError(f"the output schema is nested more than {MAX_SCHEMA_DEPTH} levels deep")
        if isinstance(node, dict):
            ref = node.get("$ref")
            if ref is not None and not (isinstance(ref, str) and ref.startswith("#")):
                raise PromptError(
                    f"the output schema refers to {str(ref)[:100]!r}: only local references such as "
                    "'#/$defs/name' are allowed (include the definitions in the schema)"
                )
            todo.extend((value, depth + 1) for value in node.values())
        elif isinstance(node, list):
            todo.extend((value, depth + 1) for value in node)


def bound_schema(
    schema: dict[str, Any], max_string: int = DEFAULT_MAX_STRING, max_items: int = DEFAULT_MAX_ITEMS
) -> dict[str, Any]:
    """A copy of ``schema`` in which every string, array and free-form object has an upper size bound."""
    bounded = copy.deepcopy(schema)

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
            if props and extra is None:
                node["additionalProperties"] = False  # no invented keys
            elif extra is not False and set(props) <= set(node.get("required", [])):
                # llguidance bounds the key count only when every declared key is required; otherwise the
                # object stays unbounded in the grammar and truncation closing still guarantees validity.
                node["maxProperties"] = min(
                    int(node.get("maxProperties", max_items + len(props))), max_items + len(props)
                )
        for key, value in node.items():
            if key in ("properties", "$defs", "definitions", "patternProperties"):
                for sub in value.values():
                    visit(sub)
            elif key in ("items", "additionalProperties", "anyOf", "oneOf", "allOf", "prefixItems", "not"):
                visit(value)

    visit(bounded)
    return bounded


def schema_prompt(schema: dict[str, Any]) -> str:
    """The instruction appended to the user's message so the model knows the shape it is writing."""
    return "Answer with one JSON object, no other text, matching this JSON schema:\n" + json.dumps(
        schema, separators=(",", ":")
    )


def validate(value: Any, schema: dict[str, Any]) -> str | None:
    """None when ``value`` conforms to ``schema``, else the first error in words."""
    import jsonschema

    validator_cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    error = jsonschema.exceptions.best_match(validator_cls(schema).iter_errors(value))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "(root)"
    return f"{where}: {error.message}"


# ---------------------------------------------------------------------------------------------------------------------
# Grammars (llguidance)


def _llguidance() -> Any:
    import llguidance  # imported on first use: its token tables are only needed for constrained requests
    import llguidance.hf
    import llguidance.torch

    return llguidance


class GrammarCompiler:
    """Compiles bounded JSON schemas for one tokenizer; compiled grammars are cached per schema."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        llg = _llguidance()
        self.vocab_size = vocab_size
        self.tokenizer = llg.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=list(stop_token_ids))
        self._grammars: dict[str, str] = {}
        self._lock = threading.Lock()
        self.executor = llg.LLExecutor()

    def grammar(self, schema: dict[str, Any]) -> str:
        key = json.dumps(schema, separators=(",", ":"))  # property order matters: the grammar follows it
        with self._lock:
            cached = self._grammars.get(key)
        if cached is not None:
            return cached
        llg = _llguidance()
        grammar = llg.LLMatcher.grammar_from_json_schema(key, defaults={"whitespace_flexible": False})
        ok, problem = self._check(grammar)
        if not ok:
            raise GenerationError(f"the JSON schema cannot be used for constrained generation: {problem}")
        with self._lock:
            self._grammars[key] = grammar
        return grammar

    def _check(self, grammar: str) -> tuple[bool, str]:
        llg = _llguidance()
        matcher = llg.LLMatcher(self.tokenizer, grammar)
        return (not matcher.is_error(), matcher.get_error() if matcher.is_error() else "")

    def matcher(self, schema: dict[str, Any]) -> JsonConstraint:
        return JsonConstraint(self, _llguidance().LLMatcher(self.tokenizer, self.grammar(schema)))

    def warm_up(self) -> None:
        """Build llguidance's lazily made tables now: the first mask inside a string otherwise takes ~2 s."""
        constraint = self.matcher({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]})
        mask = self.allocate(1)
        for token in self.tokenizer.tokenize_str('{"a":"x'):
            self.fill([constraint], mask)
            constraint.consume(token)
        self.fill([constraint], mask)

    def allocate(self, rows: int) -> torch.Tensor:
        return _llguidance().torch.allocate_token_bitmask(rows, self.vocab_size)

    def fill(self, constraints: Sequence[JsonConstraint | None], bitmask: torch.Tensor) -> None:
        """Fill ``bitmask`` rows of the constrained rows (in parallel); unconstrained rows allow everything."""
        pairs = [(c.matcher, row) for row, c in enumerate(constraints) if c is not None]
        if len(pairs) < len(constraints):
            bitmask.fill_(-1)
        if len(pairs) == 1:  # no thread pool round trip for a single row
            _llguidance().torch.fill_next_token_bitmask(pairs[0][0], bitmask, pairs[0][1])
        elif pairs:
            _llguidance().torch.fill_next_token_bitmask_par(self.executor, pairs, bitmask)

    @staticmethod
    def apply(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        """Set the logits of disallowed tokens to -inf, in place (logits: [rows, vocab], float32)."""
        _llguidance().torch.apply_token_bitmask_inplace(logits, bitmask.to(logits.device))


class JsonConstraint:
    """One row's grammar state."""

    def __init__(self, compiler: GrammarCompiler, matcher: Any) -> None:
        self.compiler = compiler
        self.matcher = matcher

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise GenerationError(f"internal: the grammar rejected token {token}: {self.matcher.get_error()}")

    @property
    def finished(self) -> bool:
        return bool(self.matcher.is_stopped())


# ---------------------------------------------------------------------------------------------------------------------
# Closing a truncated JSON prefix


def complete_json(prefix: str, schema: dict[str, Any]) -> Any:
    """The value of a JSON text cut short, closed and completed to satisfy ``schema`` where it can.

    Open strings are closed (an enum string by its first matching member), half-written numbers and
    literals are finished, a key without a value is dropped, and required properties that were never
    reached get their smallest valid value (null when allowed, "", 0, false, [], the first enum member).
    """
    parser = _PartialParser(prefix.lstrip(), schema)
    value = parser.value(schema)
    return minimal_value(schema, schema) if value is _MISSING else value


def _resolve(node: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        if not ref.startswith("#/"):
            raise GenerationError(f"only local $ref is supported, got {ref!r}")
        target: Any = root
        for part in ref[2:].split("/"):
            target = target[part]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def _alternatives(node: dict[str, Any], root: dict[str, Any]) -> list[dict[str, Any]]:
    """The non-union schemas a (possibly nested) anyOf/oneOf stands for, in order."""
    branches = node.get("anyOf") or node.get("oneOf")
    if not branches:
        return [node]
    return [alt for branch in branches for alt in _alternatives(_resolve(branch, root), root)]


def _types(node: dict[str, Any]) -> list[str]:
    kind = node.get("type")
    if isinstance(kind, list):
        return kind
    if kind is not None:
        return [kind]
    if "properties" in node:
        return ["object"]
    if "items" in node:
        return ["array"]
    return []


def minimal_value(node: dict[str, Any], root: dict[str, Any]) -> Any:
    """The smallest value valid for ``node`` (for fields the model never reached)."""
    node = _resolve(node, root)
    if "const" in node:
        return node["const"]
    if "enum" in node:
        return node["enum"][0]
    if "anyOf" in node or "oneOf" in node:
        alternatives = _alternatives(node, root)
        nullable = [b for b in alternatives if "null" in _types(b)]
        return minimal_value((nullable or alternatives)[0], root)
    types = _types(node)
    if "null" in types:
        return None
    if not types:
        return None
    kind = types[0]
    if kind == "string":
        return _finish_string("", node)
    if kind in ("integer", "number"):
        return fit_number(0, node, integer=kind == "integer")
    if kind == "boolean":
        return False
    if kind == "array":
        return [minimal_value(node.get("items", {}), root) for _ in range(int(node.get("minItems", 0)))]
    if kind == "object":
        props = node.get("properties", {})
        return {name: minimal_value(props.get(name, {}), root) for name in node.get("required", [])}
    return None


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

    def __init__(self, text: str, root: dict[str, Any]) -> None:
        self.text = text
        self.i = 0
        self.root = root

    def _peek(self) -> str:
        while self.i < len(self.text) and self.text[self.i] in " \t\r\n":
            self.i += 1
        return self.text[self.i] if self.i < len(self.text) else ""

    def value(self, node: dict[str, Any]) -> Any:
        node = self._branch(_resolve(node, self.root))
        c = self._peek()
        if not c:
            return _MISSING
        if c == "{":
            return self._object(node)
        if c == "[":
            return self._array(node)
        if c == '"':
            text, _closed = self._string()
            return _finish_string(text, node)
        return self._scalar(node)

    def _branch(self, node: dict[str, Any]) -> dict[str, Any]:
        """For anyOf/oneOf (nested too), the alternative whose type matches what the text starts with."""
        alternatives = _alternatives(node, self.root)
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

    def _object(self, node: dict[str, Any]) -> dict[str, Any]:
        self.i += 1  # {
        props = node.get("properties", {})
        extra = node.get("additionalProperties")
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
            value = self.value(sub)
            if value is _MISSING:
                break
            result[key] = value
        for name in node.get("required", []):  # truncated: complete the required fields
            if name not in result:
                result[name] = minimal_value(props.get(name, {}), self.root)
        return result

    def _array(self, node: dict[str, Any]) -> list[Any]:
        self.i += 1  # [
        items = node.get("items", {})
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
            value = self.value(items)
            if value is _MISSING:
                break
            result.append(value)
        while len(result) < int(node.get("minItems", 0)):
            result.append(minimal_value(items, self.root))
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

    def _scalar(self, node: dict[str, Any]) -> Any:
        start = self.i
        while self.i < len(self.text) and self.text[self.i] not in ",]}":
            self.i += 1
        token = self.text[start : self.i].strip()
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
            return minimal_value(node, self.root)
        if not isinstance(number, (int, float)):
            return minimal_value(node, self.root)
        return fit_number(number, node, integer="integer" in _types(node) and "number" not in _types(node))


def _finish_string(text: str, node: dict[str, Any]) -> str:
    if "enum" in node:
        members = [m for m in node["enum"] if isinstance(m, str)]
        matching = [m for m in members if m.startswith(text)]
        return matching[0] if matching else (members[0] if members else text)
    if "maxLength" in node:
        text = text[: int(node["maxLength"])]
    return text.ljust(int(node.get("minLength", 0)), "-")
