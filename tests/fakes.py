"""A fake backend for tool and adapter tests: records requests, answers with schema-valid values instantly."""

from __future__ import annotations

import json
from typing import Any

from phi3v_tools.runner import GenerationRequest, GenerationResult, Timings
from phi3v_tools.structured import bound_schema, minimal_value


class FakeBackend:
    """Answers every request with the smallest value valid for its schema (or ``text`` without one).

    ``answers`` (a list of dicts or strings) are used first, in order; ``error`` is raised instead when set.
    """

    model_name = "fake-phi3v"

    def __init__(self, answers: list[Any] | None = None, text: str = "a fake answer") -> None:
        self.requests: list[GenerationRequest] = []
        self.answers = list(answers or [])
        self.text = text
        self.error: BaseException | None = None

    def _answer(self, request: GenerationRequest) -> GenerationResult:
        self.requests.append(request)
        if self.error is not None:
            raise self.error
        if request.on_text is not None:
            request.on_text("fake ")
        answer = self.answers.pop(0) if self.answers else None
        if request.json_schema is None:
            text = answer if isinstance(answer, str) else self.text
            parsed = None
        else:
            schema = bound_schema(request.json_schema)
            parsed = answer if answer is not None else minimal_value(schema, schema)
            text = json.dumps(parsed)
        return GenerationResult(
            text=text,
            parsed=parsed,
            prompt_tokens=100,
            completion_tokens=10,
            image_tokens=80,
            timings=Timings(total_s=0.01, decode_s=0.005),
        )

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        return self._answer(request)

    def generate_sync(self, request: GenerationRequest) -> GenerationResult:
        return self._answer(request)
