"""The OpenAI-compatible app, checked with the official ``openai`` client over a real loopback HTTP server
(uvicorn in a thread) on the tiny model, and stop sequences in the engine beneath it."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from phi3v_tools.errors import BusyError
from phi3v_tools.runner import GenerationRequest, GenerationResult, Runner, Timings
from tests.fakes import FakeBackend
from tests.openai_server import MODEL, Served

openai = pytest.importorskip("openai", reason="the conformance client: pip install -e '.[remote]'")

SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string", "maxLength": 40}, "pages": {"type": "integer"}},
    "required": ["title", "pages"],
    "additionalProperties": False,
}


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def image_message(url: str, text: str = "What is in this image?") -> list[dict[str, Any]]:
    content = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def served(tiny_runner: Runner) -> Iterator[Served]:
    with Served(tiny_runner) as running:
        yield running


# ---------------------------------------------------------------------------------------------------------------------
# Conformance with the official client


def test_the_official_client_lists_the_served_model(served: Served) -> None:
    models = served.client().models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_a_json_schema_answer_about_a_data_image_validates_and_reports_usage(
    served: Served, sample_images: dict[str, Path]
) -> None:
    completion = served.client().chat.completions.create(
        model=MODEL,
        messages=image_message(data_uri(sample_images["cover"]), "Title and page count?"),  # type: ignore[arg-type]
        response_format={"type": "json_schema", "json_schema": {"name": "book", "schema": SCHEMA}},
        max_tokens=60,
        temperature=0,
    )
    answer = json.loads(completion.choices[0].message.content or "")
    jsonschema.validate(answer, SCHEMA)
    assert completion.object == "chat.completion" and completion.model == MODEL
    assert completion.choices[0].finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens > 700  # the image's tokens are counted (757 at 4 crops)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens > 0


def test_streaming_yields_the_same_text_in_pieces_and_then_the_usage(
    served: Served, sample_images: dict[str, Path]
) -> None:
    client = served.client()
    messages = image_message(data_uri(sample_images["chart"]))
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)  # type: ignore[arg-type]
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == whole.choices[0].message.content  # greedy: the same answer
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


def test_stop_sequences_end_the_answer_before_them_also_when_streamed(served: Served) -> None:
    client = served.client()
    messages = [{"role": "user", "content": "Tell me a long story."}]
    free = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0)  # type: ignore[arg-type]
    text = free.choices[0].message.content or ""
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop) == 3 and stop.strip()
    cut = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0, stop=[stop])  # type: ignore[arg-type]
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=40,
        temperature=0,
        stop=stop,
        stream=True,
    )
    pieces = [c.choices[0].delta.content or "" for c in streamed if c.choices]
    assert "".join(pieces) == text[: text.index(stop)]  # the stop sequence was never streamed


# ---------------------------------------------------------------------------------------------------------------------
# Refusals, each beside an innocent request that must succeed


def _innocent(client: Any) -> None:
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
    )
    assert answer.choices[0].message.content is not None


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://127.0.0.1:9/secret.png", "127.0.0.1"),  # an internal address: never fetched
        ("http://169.254.169.254/latest/meta-data", "169.254.169.254"),  # cloud metadata
        ("/etc/passwd", "data: URI or an http(s) URL"),  # a server-side path
        ("file:///etc/passwd", "data: URI or an http(s) URL"),
        ("image://sha256/" + "0" * 64, "data: URI or an http(s) URL"),
        ("data:image/png;base64,bm90IGFuIGltYWdl", "not a readable image"),
    ],
)
def test_a_hostile_image_url_is_a_400_and_an_innocent_request_beside_it_succeeds(
    served: Served, url: str, fragment: str
) -> None:
    client = served.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=image_message(url), max_tokens=4)  # type: ignore[arg-type]
    error = info.value.body
    assert isinstance(error, dict) and fragment in error["message"] and error["param"] == "messages.0.content"
    _innocent(client)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"logprobs": True}, "logprobs"),
        ({"mm_processor_kwargs": {"num_crops": 99}}, "mm_processor_kwargs"),
        ({"max_tokens": 0}, None),
    ],
)
def test_an_option_that_would_change_the_answer_and_cannot_be_honoured_is_a_400(
    served: Served, extra: dict[str, Any], param: str | None
) -> None:
    client = served.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Hi"}],
            extra_body=extra if "max_tokens" not in extra else None,
            max_tokens=extra.get("max_tokens", 4),
        )
    assert isinstance(info.value.body, dict) and info.value.body.get("param") == param
    _innocent(client)


def test_unknown_fields_are_ignored_as_vllm_ignores_them(served: Served) -> None:
    answer = served.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        extra_body={"presence_penalty_v9": 1, "user": "someone"},
    )
    assert answer.choices[0].message.content is not None


def test_another_models_name_is_a_404_naming_the_served_one(served: Served) -> None:
    with pytest.raises(openai.NotFoundError, match=MODEL):
        served.client().chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "Hi"}])


def test_a_malformed_body_is_a_400_in_openais_error_shape(served: Served) -> None:
    json_type = {"content-type": "application/json"}
    for body in (b"{not json", b"[1, 2]", json.dumps({"messages": []}).encode()):
        response = httpx.post(served.url + "/v1/chat/completions", content=body, headers=json_type, timeout=30)
        assert response.status_code == 400
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == 400


def test_health_is_200_while_the_engine_serves(served: Served) -> None:
    assert httpx.get(served.url + "/health", timeout=30).json() == {"status": "ok"}


# ---------------------------------------------------------------------------------------------------------------------
# Over fakes: a full queue, a client that leaves


def test_a_full_queue_is_a_429_with_retry_after() -> None:
    fake = FakeBackend()
    fake.error = BusyError("the model is busy: 64 requests are waiting; retry shortly")
    with Served(fake) as running:
        for stream in (False, True):
            response = httpx.post(
                running.url + "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "Hi"}], "stream": stream},
                timeout=30,
            )
            assert response.status_code == 429 and response.headers["retry-after"] == "1"
            assert response.json()["error"]["type"] == "RateLimitError"


class Slow:
    """A backend that streams a piece every 20 ms until cancelled (or 10 s), and records how it ended."""

    model_name = "slow"

    def __init__(self) -> None:
        self.ended: list[str] = []

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        try:
            for _ in range(500):
                assert request.on_text is not None
                request.on_text("word ")
                await asyncio.sleep(0.02)
        except asyncio.CancelledError:
            self.ended.append("cancelled")
            raise
        self.ended.append("finished")
        return GenerationResult(text="word " * 500, timings=Timings())

    def generate_sync(self, request: GenerationRequest) -> GenerationResult:
        raise NotImplementedError


def test_a_client_that_leaves_a_stream_cancels_its_generation() -> None:
    slow = Slow()
    with Served(slow) as running:
        with httpx.stream(
            "POST",
            running.url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}], "stream": True},
            timeout=30,
        ) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: ") and "word" in line:
                    break  # one piece, then leave
        deadline = time.monotonic() + 10
        while not slow.ended and time.monotonic() < deadline:
            time.sleep(0.05)
    assert slow.ended == ["cancelled"]


# ---------------------------------------------------------------------------------------------------------------------
# Stop sequences in the engine


def test_the_engine_ends_free_text_before_a_stop_sequence_and_never_streams_it(tiny_runner: Runner) -> None:
    free = tiny_runner.generate_sync(GenerationRequest.from_text("Tell me more", max_new_tokens=30))
    stop = free.text[10:14]
    pieces: list[str] = []
    cut = tiny_runner.generate_sync(
        GenerationRequest.from_text("Tell me more", max_new_tokens=30, stop=[stop], on_text=pieces.append)
    )
    assert cut.text == free.text[: free.text.index(stop)] and cut.finish_reason == "stop"
    assert "".join(pieces) == cut.text
    assert cut.completion_tokens < free.completion_tokens


def test_stop_sequences_are_checked_at_submission(tiny_runner: Runner) -> None:
    from phi3v_tools.errors import PromptError

    bad = [["a"] * 5, [""], ["x" * 201], "abc"]
    for stop in bad:
        with pytest.raises(PromptError, match="stop"):
            tiny_runner.submit(GenerationRequest.from_text("x", stop=stop))  # type: ignore[arg-type]
    with pytest.raises(PromptError, match="JSON schema"):
        tiny_runner.submit(GenerationRequest.from_text("x", stop=["}"], json_schema={"type": "object"}))


def test_a_body_that_is_not_declared_json_is_a_415_so_a_web_pages_form_post_cannot_start_a_generation(
    served: Served,
) -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "Hi"}]})
    for kind in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"content-type": kind} if kind else {}
        response = httpx.post(served.url + "/v1/chat/completions", content=body, headers=headers, timeout=30)
        assert response.status_code == 415 and response.json()["error"]["code"] == 415


def test_too_many_images_are_refused_before_any_is_decoded(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    import phi3v_tools.serving.protocol as protocol

    decoded: list[str] = []
    monkeypatch.setattr(protocol, "load_image", lambda url, policy: decoded.append(url))
    content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}] * 9
    with pytest.raises(openai.BadRequestError, match="9 images given; this server takes at most 8") as info:
        served.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}])  # type: ignore[list-item]
    assert decoded == [] and isinstance(info.value.body, dict) and info.value.body["param"] == "messages"


@pytest.mark.parametrize(
    "extra",
    [
        {"presence_penalty": 0.5},
        {"frequency_penalty": 1},
        {"logit_bias": {"50256": -100}},
        {"top_k": 5},
        {"repetition_penalty": 1.2},
        {"min_tokens": 3},
    ],
)
def test_sampling_options_this_server_does_not_apply_are_refused_not_dropped(
    served: Served, extra: dict[str, Any]
) -> None:
    with pytest.raises(openai.BadRequestError, match="not supported") as info:
        served.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, extra_body=extra
        )
    assert isinstance(info.value.body, dict) and info.value.body["param"] == next(iter(extra))


def test_neutral_sampling_options_and_the_developer_role_are_accepted(served: Served) -> None:
    answer = served.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_tokens=4,
        presence_penalty=0,
        frequency_penalty=0,
    )
    assert answer.choices[0].message.content is not None


def test_a_stream_ends_with_done(served: Served) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}
    response = httpx.post(served.url + "/v1/chat/completions", json=body, timeout=60)
    events = [line for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and response.headers["content-type"].startswith("text/event-stream")


class Waiting(Slow):
    """Like Slow, but quiet for a while first (queued, prefilling) before any text."""

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            self.ended.append("cancelled")
            raise
        return await super().generate(request)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream-before-its-first-piece"])
def test_a_client_that_leaves_before_any_text_cancels_its_generation(stream: bool) -> None:
    waiting = Waiting()
    with Served(waiting) as running:
        body = {"messages": [{"role": "user", "content": "Hi"}], "stream": stream}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(running.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
        deadline = time.monotonic() + 10
        while not waiting.ended and time.monotonic() < deadline:
            time.sleep(0.05)
    assert waiting.ended == ["cancelled"]
