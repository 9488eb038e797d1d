"""The OpenAI chat-completions protocol, as far as this server speaks it: request and response models, and the
translation of a request into a :class:`~phi3v_tools.engine.types.GenerationRequest`. No torch, no HTTP.

Fields follow OpenAI's API reference and vLLM's server (``vllm/entrypoints/openai/protocol.py``): unknown
fields are ignored, as vLLM does; fields that would change the answer and that this server cannot honour
(``n`` > 1, ``tools``, ``logprobs``, ``audio``) are refused with a 400 naming them, rather than silently
answered otherwise. ``mm_processor_kwargs: {"num_crops": N}`` is vLLM's way to set crops per image.

Images come only as ``image_url`` content parts: ``data:`` URIs, and ``http(s)`` URLs when the server allows
URLs (fetched by :mod:`phi3v_tools.images`, public addresses only). A path, a ``file://`` URL or an
``image://`` handle is refused: a client of an HTTP server must not name the server's files.
"""

from __future__ import annotations

import re
import secrets
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from phi3v_tools.engine.types import GenerationRequest, GenerationResult
from phi3v_tools.errors import ImageError, PromptError
from phi3v_tools.images import ImagePolicy, LoadedImage, load_image
from phi3v_tools.model.chat_format import IMAGE_TAG

__all__ = [
    "ChatCompletionRequest",
    "ProtocolError",
    "completion_body",
    "chunk_body",
    "error_body",
    "to_generation_request",
]


class ProtocolError(PromptError):
    """A request this server will not run, with the field (``param``) to change; answered with a 400."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown fields are ignored, as vLLM does


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImageURL(_Lenient):
    url: str
    detail: str | None = None  # OpenAI's "low"/"high"/"auto": crops are set by mm_processor_kwargs instead


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]  # "developer": OpenAI's newer name for system
    content: str | list[ContentPart] | None = None


class JSONSchemaFormat(_Lenient):
    name: str = "answer"
    json_schema: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(_Lenient):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    # Fields refused when set to something this server cannot do (see unsupported()).
    n: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    audio: Any = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    top_k: int | None = None
    min_tokens: int | None = None

    def unsupported(self) -> ProtocolError | None:
        """The first field that would change the answer and that this server cannot honour."""
        if self.n is not None and self.n != 1:
            return ProtocolError("n > 1 is not supported: send one request per completion", "n")
        if self.tools:
            return ProtocolError("tools (function calling) are not supported by this model server", "tools")
        if self.tool_choice not in (None, "none", "auto"):
            return ProtocolError("tool_choice is not supported by this model server", "tool_choice")
        if self.logprobs or self.top_logprobs:
            return ProtocolError("logprobs are not supported by this model server", "logprobs")
        if self.audio is not None:
            return ProtocolError("audio output is not supported: Phi-3-vision answers in text", "audio")
        defaults = {
            "presence_penalty": (None, 0, 0.0),
            "frequency_penalty": (None, 0, 0.0),
            "repetition_penalty": (None, 1, 1.0),
            "top_k": (None, 0, -1),
            "min_tokens": (None, 0),
        }
        for name, neutral in defaults.items():
            if getattr(self, name) not in neutral:
                return ProtocolError(f"{name} is not supported by this model server; leave it out", name)
        if self.logit_bias:
            return ProtocolError("logit_bias is not supported by this model server; leave it out", "logit_bias")
        return None

    def stops(self) -> list[str]:
        """``stop`` as a list (the engine checks how many and how long)."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def answer_schema(self) -> dict[str, Any] | None:
        """The JSON schema the answer must follow: json_schema's, any JSON object for json_object, else None."""
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return {"type": "object"}
        if fmt.json_schema is None:
            raise ProtocolError("response_format json_schema needs a json_schema with a schema", "response_format")
        return fmt.json_schema.json_schema

    def num_crops(self) -> int | None:
        kwargs = self.mm_processor_kwargs or {}
        crops = kwargs.get("num_crops")
        if crops is None:
            return None
        if not isinstance(crops, int) or isinstance(crops, bool) or not 1 <= crops <= 16:
            raise ProtocolError(f"mm_processor_kwargs.num_crops must be 1 to 16, got {crops!r}", "mm_processor_kwargs")
        return crops


def to_generation_request(
    body: ChatCompletionRequest, policy: ImagePolicy, default_max_tokens: int, max_images: int = 8
) -> tuple[GenerationRequest, list[LoadedImage]]:
    """The engine request for ``body``: image parts become ``<|image_k|>`` tags in order, their images loaded and
    checked by the image layer (``data:`` URIs, and ``http(s)`` URLs if ``policy`` allows them). The images are
    counted before any is decoded or fetched."""
    if (problem := body.unsupported()) is not None:
        raise problem
    count = sum(isinstance(part, ImagePart) for m in body.messages if isinstance(m.content, list) for part in m.content)
    if count > max_images:
        raise ProtocolError(f"{count} images given; this server takes at most {max_images} per request", "messages")
    messages: list[dict[str, str]] = []
    images: list[LoadedImage] = []
    for i, message in enumerate(body.messages):
        parts: list[TextPart | ImagePart] = (
            list(message.content)
            if isinstance(message.content, list)
            else [TextPart(type="text", text=message.content or "")]
        )
        text: list[str] = []
        for part in parts:
            if isinstance(part, TextPart):
                if IMAGE_TAG.search(part.text):
                    raise ProtocolError(
                        "text must not contain <|image_k|> tags: send each image as an image_url part, where it "
                        "belongs in the message",
                        f"messages.{i}.content",
                    )
                text.append(part.text)
                continue
            if message.role != "user":
                raise ProtocolError("images belong in user messages", f"messages.{i}.content")
            images.append(_image(part.image_url.url, policy, f"messages.{i}.content"))
            text.append(f"<|image_{len(images)}|>\n")
        role = "system" if message.role == "developer" else message.role
        messages.append({"role": role, "content": "".join(text)})
    wanted = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    request = GenerationRequest(
        messages=messages,
        images=[image.image for image in images],
        max_new_tokens=wanted if wanted is not None else default_max_tokens,
        temperature=body.temperature if body.temperature is not None else 1.0,
        top_p=body.top_p,
        seed=body.seed,
        json_schema=body.answer_schema(),
        num_crops=body.num_crops(),
        stop=body.stops(),
    )
    request.image_digests = [image.digest for image in images]
    return request, images


_ALLOWED_IMAGE_URL = re.compile(r"^\s*(data:|https?://)", re.IGNORECASE)


def _image(url: str, policy: ImagePolicy, param: str) -> LoadedImage:
    if not _ALLOWED_IMAGE_URL.match(url):
        raise ProtocolError("an image_url must be a data: URI or an http(s) URL", param)
    if not url.lstrip()[:5].lower() == "data:" and not policy.allow_urls:
        raise ProtocolError("this server does not fetch image URLs: send the image as a data: URI", param)
    try:
        return load_image(url, policy)
    except ImageError as exc:
        raise ProtocolError(str(exc), param) from None


# ---------------------------------------------------------------------------------------------------------------------
# Responses


def completion_id() -> str:
    return f"chatcmpl-{secrets.token_hex(12)}"


def usage(result: GenerationResult) -> dict[str, int]:
    """OpenAI's usage, and one field of ours: ``cached_images``, the images whose features came from the
    server's cache (clients ignore a field they do not know; the remote backend reports it in ``call``)."""
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
        "cached_images": result.cached_images,
    }


def completion_body(result: GenerationResult, model: str, ident: str | None = None) -> dict[str, Any]:
    return {
        "id": ident or completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "finish_reason": result.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage(result),
    }


def chunk_body(
    ident: str,
    model: str,
    created: int,
    *,
    delta: dict[str, str] | None = None,
    finish_reason: str | None = None,
    result: GenerationResult | None = None,
) -> dict[str, Any]:
    """One ``chat.completion.chunk``: a delta, the last one with its finish_reason, or (``result``) the usage."""
    body: dict[str, Any] = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model}
    if result is not None:
        body["choices"] = []
        body["usage"] = usage(result)
    else:
        body["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": finish_reason, "logprobs": None}]
    return body


def error_body(message: str, kind: str, code: int | str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
