"""Request checks and prompt building shared by every backend: plain functions, no torch, no tokenizer.

- :func:`check_request`: everything a caller controls, checked before a request is admitted;
- :func:`with_image_tags`: images referenced at the start of the last user message when no message tags them;
- :func:`with_schema_prompt`: the output schema described at the end of the last message.

A remote backend sends the same messages a local engine tokenizes, so both answer the same prompt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from phi3v_tools.errors import PromptError
from phi3v_tools.model.chat_format import CHAT_ROLES, IMAGE_TAG, check_text

if TYPE_CHECKING:
    from phi3v_tools.engine.types import GenerationRequest
    from phi3v_tools.settings import EngineLimits
    from phi3v_tools.structured import OutputSchema


def number_in(value: Any, low: float, high: float) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and low <= value <= high


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_messages(messages: Any, max_chars: int) -> None:
    """Roles, text and size of a request's messages, before anything tokenizes them."""
    if not isinstance(messages, list | tuple) or not messages:
        raise PromptError("a request needs at least one message (a list of {'role': ..., 'content': ...})")
    total = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise PromptError(f"message {i + 1} is a {type(message).__name__}, not a {{'role', 'content'}} dict")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise PromptError(f"message {i + 1} has role {str(role)[:40]!r}; use one of {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise PromptError(f"message {i + 1}'s content is a {type(content).__name__}, not text")
        total += len(content)
        if total > max_chars:
            raise PromptError(f"the messages have more than {max_chars} characters; shorten them")
        check_text(content, f"message {i + 1}")


def check_request(request: GenerationRequest, limits: EngineLimits) -> None:
    """Every option of ``request`` against ``limits``: PromptError naming the first one out of range."""
    if len(request.images) > limits.max_images:
        raise PromptError(f"{len(request.images)} images given; at most {limits.max_images} per request")
    wanted = request.max_new_tokens
    if not _whole(wanted) or not 1 <= wanted <= limits.max_new_tokens:  # type: ignore[operator]
        raise PromptError(f"max_new_tokens must be between 1 and {limits.max_new_tokens}, got {wanted!r}")
    crops = request.num_crops
    if crops is not None and (not _whole(crops) or not 1 <= crops <= 16):
        raise PromptError(f"num_crops must be between 1 and 16, got {crops!r}")
    if not number_in(request.temperature, 0, 100):
        raise PromptError(f"temperature must be a number from 0 to 100, got {request.temperature!r}")
    if request.top_p is not None and not (number_in(request.top_p, 0, 1) and request.top_p > 0):
        raise PromptError(f"top_p must be a number above 0 and at most 1, got {request.top_p!r}")
    seed = request.seed
    if seed is not None and (not _whole(seed) or not 0 <= seed < 2**63):
        raise PromptError(f"seed must be an integer from 0 to 2^63 - 1, got {seed!r}")
    if request.timeout_s is not None and not number_in(request.timeout_s, 0, 7 * 86400):
        raise PromptError(f"timeout_s must be a number of seconds from 0 to a week, got {request.timeout_s!r}")
    check_stop(request)
    if request.image_digests is not None and len(request.image_digests) != len(request.images):
        raise PromptError("image_digests must have one entry per image")
    check_messages(request.messages, limits.max_prompt_chars)


MAX_STOP = 4  # stop sequences per request, as in OpenAI's API
MAX_STOP_CHARS = 200


def check_stop(request: GenerationRequest) -> None:
    stop = request.stop
    if isinstance(stop, str) or not isinstance(stop, list | tuple):
        raise PromptError("stop must be a list of strings")
    if len(stop) > MAX_STOP or any(not isinstance(s, str) or not 1 <= len(s) <= MAX_STOP_CHARS for s in stop):
        raise PromptError(f"stop takes at most {MAX_STOP} strings of 1 to {MAX_STOP_CHARS} characters")
    if stop and request.json_schema is not None:
        raise PromptError("stop sequences cannot be used with a JSON schema: the answer ends where its JSON does")
    for s in stop:
        check_text(s, "a stop sequence")


def with_image_tags(messages: list[dict[str, str]], n_images: int) -> list[dict[str, str]]:
    """Reference the images at the start of the last user message when no message tags them."""
    if n_images == 0 or any(IMAGE_TAG.search(m.get("content", "")) for m in messages):
        return messages
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not users:
        raise PromptError("a request with images needs a user message")
    tags = "".join(f"<|image_{k}|>\n" for k in range(1, n_images + 1))
    out = [dict(m) for m in messages]
    out[users[-1]]["content"] = tags + out[users[-1]]["content"]
    return out


def with_schema_prompt(messages: list[dict[str, str]], schema: OutputSchema | None) -> list[dict[str, str]]:
    """The output schema's description appended to the last message (the grammar alone does not say why)."""
    if schema is None:
        return messages
    last = dict(messages[-1])
    last["content"] = f"{last['content']}\n\n{schema.prompt}"
    return [*messages[:-1], last]


def prompt_messages(request: GenerationRequest, schema: OutputSchema | None) -> list[dict[str, str]]:
    """The messages a model sees for ``request``: image tags placed, the schema described."""
    return with_schema_prompt(with_image_tags(request.messages, len(request.images)), schema)
