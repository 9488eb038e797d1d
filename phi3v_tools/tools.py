"""The vision tools: ``describe_image``, ``read_text``, ``compare_images`` and ``ask_images``.

Each tool is a prompt plus a pydantic result model. The model writes the fields it can know (constrained
by the JSON schema of those fields); the tool adds what only it knows (image handles, sizes, the model id,
token usage, timings). Adapters (LangChain, MCP, CLI) wrap the :class:`Toolbox` methods and nothing else.

Arguments are checked here, whoever calls (a typed adapter or plain Python): a wrong type is a
:class:`~phi3v_tools.errors.PromptError` that names the argument. A caller's text is cleaned of image
tags (the tools place the images) and then reaches the model as text, never as control tokens. Images
are remembered for their handles only when the call succeeds.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from phi3v_tools.engine.types import Backend, GenerationRequest, GenerationResult
from phi3v_tools.errors import PromptError
from phi3v_tools.images import ImagePolicy, ImageRef, ImageStore, LoadedImage, load_images
from phi3v_tools.model.chat_format import IMAGE_TAG, check_text
from phi3v_tools.structured import DEFAULT_LIMITS, SchemaLimits, check_schema

Detail = Literal["brief", "normal", "detailed"]
ImageKind = Literal["photo", "chart", "document", "screenshot", "diagram", "illustration", "other"]
MAX_NEW_TOKENS: dict[str, int] = {"brief": 160, "normal": 400, "detailed": 800}
FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_ -]{0,63}$")


# ---------------------------------------------------------------------------------------------------------------------
# Results


class ImageInfo(BaseModel):
    handle: str = Field(description="Refer to this image in later calls with this handle instead of resending it.")
    width: int = Field(description="Width in pixels.")
    height: int = Field(description="Height in pixels.")


class CallInfo(BaseModel):
    model: str = Field(description="The model that answered.")
    prompt_tokens: int = Field(description="Tokens in the prompt, images included.")
    completion_tokens: int = Field(description="Tokens the model generated.")
    cached_images: int = Field(description="Images whose features were reused from an earlier call.")
    truncated: bool = Field(description="True when the answer hit its length limit and was closed early.")
    seconds: dict[str, float] = Field(description="Time spent: queue, preprocess, vision, prefill, decode, total.")


class _Answer(BaseModel):
    """Fields the model writes (its JSON schema constrains generation)."""

    model_config = ConfigDict(extra="forbid")


class _WithMeta(BaseModel):
    images: list[ImageInfo] = Field(description="The input images, in order, with handles for later calls.")
    call: CallInfo = Field(description="Model, token usage and timings of this call.")


class _DescribeAnswer(_Answer):
    description: str = Field(description="What the image shows, focused on the question when one was asked.")
    objects: list[str] = Field(description="The main objects or elements in the image.", max_length=20)
    kind: ImageKind = Field(description="The kind of image.")
    visible_text: str | None = Field(description="Text visible in the image, or null when there is none.")


class ImageDescription(_WithMeta, _DescribeAnswer):
    """The result of describe_image."""

    def to_text(self) -> str:
        text = f"{self.description}\n(kind: {self.kind}"
        if self.objects:
            text += f"; objects: {', '.join(self.objects)}"
        return text + ")" + (f"\nVisible text: {self.visible_text}" if self.visible_text else "")


class _ReadAnswer(_Answer):
    text: str = Field(description="All text in the image, in reading order.")
    lines: list[str] = Field(description="The text, one entry per line.", max_length=200)


class TextReading(_WithMeta, _ReadAnswer):
    """The result of read_text."""

    fields: dict[str, str | None] | None = Field(
        default=None, description="The requested fields: the value read from the image, or null when absent."
    )

    def to_text(self) -> str:
        text = self.text.strip() or "(no text found in the image)"
        if self.fields is None:
            return text
        found = "; ".join(f"{k}: {v if v is not None else '(not found)'}" for k, v in self.fields.items())
        return f"{found}\n\n{text}"


class _CompareAnswer(_Answer):
    summary: str = Field(description="How the images relate, answering the question when one was asked.")
    similarities: list[str] = Field(description="What the images have in common.", max_length=20)
    differences: list[str] = Field(description="How the images differ.", max_length=20)


class ImageComparison(_WithMeta, _CompareAnswer):
    """The result of compare_images."""

    def to_text(self) -> str:
        parts = [self.summary.strip() or "(no summary)"]
        if self.similarities:
            parts.append("Similar: " + "; ".join(self.similarities))
        if self.differences:
            parts.append("Different: " + "; ".join(self.differences))
        return "\n".join(parts)


class Answer(_WithMeta):
    """The result of ask_images: free text, or a value conforming to the caller's schema."""

    answer: Any = Field(description="The answer: text, or a JSON value matching output_schema when one was given.")

    def to_text(self) -> str:
        return self.answer if isinstance(self.answer, str) else _compact_json(self.answer)


def _compact_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


# ---------------------------------------------------------------------------------------------------------------------
# The toolbox


R = TypeVar("R", bound=_WithMeta)
ProgressCallback = Callable[[str], None]


class Toolbox:
    """The four tools over one backend, one image policy and one store of image handles."""

    def __init__(
        self,
        backend: Backend | Callable[[], Backend],
        policy: ImagePolicy | None = None,
        *,
        store: ImageStore | None = None,
        max_compare: int = 4,
        multi_image_num_crops: int = 4,
        schema_limits: SchemaLimits = DEFAULT_LIMITS,
    ) -> None:
        self._backend = backend
        self.policy = policy or ImagePolicy()
        self.store = store if store is not None else ImageStore()  # an empty store is falsy (len 0)
        self.max_compare = max_compare
        self.multi_image_num_crops = multi_image_num_crops
        self.schema_limits = schema_limits  # a caller's output schema is checked with these before any image loads

    @property
    def backend(self) -> Backend:
        """The backend, created on first use when a factory was given (the model loads lazily)."""
        if callable(self._backend) and not hasattr(self._backend, "generate"):
            self._backend = self._backend()
        return self._backend  # type: ignore[return-value]

    # -- requests (shared by the sync and async paths) -----------------------------------------------------------------

    def _images(self, refs: ImageRef | Sequence[ImageRef], least: int, most: int) -> list[LoadedImage]:
        if isinstance(refs, str | bytes | os.PathLike | Image.Image):
            refs = [refs]
        if not isinstance(refs, list | tuple):
            raise PromptError(f"images must be a list of image references, not {type(refs).__name__}")
        if not least <= len(refs) <= most:
            wanted = f"{least}" if least == most else f"{least} to {most}"
            raise PromptError(f"{len(refs)} image{'' if len(refs) == 1 else 's'} given; this tool takes {wanted}")
        # Handles are looked up in the store; new images join it only when the call succeeds (see result()).
        return load_images(refs, self.policy, _LookUpOnly(self.store))  # type: ignore[arg-type]

    def describe_request(
        self, image: ImageRef, question: str | None = None, detail: Detail = "normal"
    ) -> tuple[GenerationRequest, list[LoadedImage], type[ImageDescription]]:
        if not isinstance(detail, str) or detail not in MAX_NEW_TOKENS:
            raise PromptError(f"detail must be one of {', '.join(MAX_NEW_TOKENS)}, not {_shown(detail)}")
        question = _text_argument("question", question, optional=True)
        images = self._images([image], 1, 1)
        length = {"brief": "in one or two sentences", "normal": "in a short paragraph", "detailed": "in detail"}
        prompt = f"Describe this image {length[detail]}."
        if question:
            prompt = f"{_clean(question)}\nAnswer {length[detail]}, focused on that question."
        prompt += " Also say what kind of image it is, list its main objects, and copy any visible text."
        return self._request(prompt, images, _DescribeAnswer, MAX_NEW_TOKENS[detail]), images, ImageDescription

    def read_text_request(
        self, image: ImageRef, fields: Sequence[str] | None = None
    ) -> tuple[GenerationRequest, list[LoadedImage], type[TextReading]]:
        names = (
            None if fields is None or (isinstance(fields, str | list | tuple) and not fields) else _field_names(fields)
        )
        images = self._images([image], 1, 1)
        prompt = "Transcribe all the text in this image in reading order, one entry per line."
        schema = _ReadAnswer.model_json_schema()
        if names:
            schema["properties"]["fields"] = {
                "type": "object",
                "properties": {name: {"anyOf": [{"type": "string"}, {"type": "null"}]} for name in names},
                "required": names,
                "additionalProperties": False,
                "description": "The requested fields; null for a field that is not in the image.",
            }
            schema["required"] = [*schema["required"], "fields"]
            prompt += f" Also extract these fields: {', '.join(names)}. Use null for a field that is not there."
        request = GenerationRequest.from_text(prompt, [i.image for i in images], json_schema=schema)
        request.image_digests = [i.digest for i in images]
        request.max_new_tokens = 800
        return request, images, TextReading

    def compare_request(
        self, images_in: Sequence[ImageRef], question: str | None = None
    ) -> tuple[GenerationRequest, list[LoadedImage], type[ImageComparison]]:
        question = _text_argument("question", question, optional=True)
        images = self._images(images_in, 2, self.max_compare)
        prompt = "Compare these images." if not question else f"Compare these images: {_clean(question)}"
        prompt += " Summarize how they relate, then list their similarities and their differences."
        request = self._request(prompt, images, _CompareAnswer, 500)
        request.num_crops = self.multi_image_num_crops  # several images: keep the prompt short (Phi-3.5 advice)
        return request, images, ImageComparison

    def ask_request(
        self,
        images_in: ImageRef | Sequence[ImageRef],
        question: str,
        output_schema: dict[str, Any] | type[BaseModel] | None = None,
        max_new_tokens: int = 500,
    ) -> tuple[GenerationRequest, list[LoadedImage], type[Answer]]:
        question = _clean(_text_argument("question", question, optional=False) or "")
        if not question:
            raise PromptError("ask_images needs a question (image tags alone are not one)")
        schema = None
        if isinstance(output_schema, type) and issubclass(output_schema, BaseModel):
            schema = output_schema.model_json_schema()
        elif output_schema is not None:
            check_schema(output_schema, self.schema_limits)  # before any image is fetched or decoded
            schema = dict(output_schema)
        images = self._images(images_in, 1, self.max_compare)
        request = GenerationRequest.from_text(
            _clean(question), [i.image for i in images], json_schema=schema, max_new_tokens=max_new_tokens
        )
        request.image_digests = [i.digest for i in images]
        if len(images) > 1:
            request.num_crops = self.multi_image_num_crops
        return request, images, Answer

    def _request(
        self, prompt: str, images: list[LoadedImage], answer: type[_Answer], max_new_tokens: int
    ) -> GenerationRequest:
        request = GenerationRequest.from_text(
            prompt, [i.image for i in images], json_schema=answer.model_json_schema(), max_new_tokens=max_new_tokens
        )
        request.image_digests = [i.digest for i in images]
        return request

    def result(self, cls: type[R], images: list[LoadedImage], generated: GenerationResult) -> R:
        """The tool's result model from the model's answer plus what the tool knows."""
        t = generated.timings
        call = CallInfo(
            model=self.backend.model_name,
            prompt_tokens=generated.prompt_tokens,
            completion_tokens=generated.completion_tokens,
            cached_images=generated.cached_images,
            truncated=generated.truncated,
            seconds={
                "queue": round(t.queue_s, 4),
                "preprocess": round(t.preprocess_s, 4),
                "vision": round(t.vision_s, 4),
                "prefill": round(t.prefill_s, 4),
                "decode": round(t.decode_s, 4),
                "total": round(t.total_s, 4),
            },
        )
        for image in images:  # the call succeeded: its images can be referred to by handle from now on
            self.store.add(image)
        infos = [ImageInfo(handle=i.handle, width=i.width, height=i.height) for i in images]
        if cls is Answer:
            answer = generated.parsed if generated.parsed is not None else generated.text.strip()
            return cls.model_validate({"answer": answer, "images": infos, "call": call})
        return cls.model_validate({**(generated.parsed or {}), "images": infos, "call": call})

    # -- the tools --------------------------------------------------------------------------------------------------

    def describe_image(
        self, image: ImageRef, question: str | None = None, detail: Detail = "normal"
    ) -> ImageDescription:
        """What an image shows (focused on ``question`` if given): description, objects, kind, visible text."""
        return self._run(*self.describe_request(image, question, detail))

    def read_text(self, image: ImageRef, fields: Sequence[str] | None = None) -> TextReading:
        """The text in an image (OCR), and optionally named fields such as title and author."""
        return self._run(*self.read_text_request(image, fields))

    def compare_images(self, images: Sequence[ImageRef], question: str | None = None) -> ImageComparison:
        """How 2 to ``max_compare`` images relate: summary, similarities, differences."""
        return self._run(*self.compare_request(images, question))

    def ask_images(
        self,
        images: ImageRef | Sequence[ImageRef],
        question: str,
        output_schema: dict[str, Any] | type[BaseModel] | None = None,
    ) -> Answer:
        """Any question about 1 to ``max_compare`` images; with ``output_schema`` the answer conforms to it."""
        return self._run(*self.ask_request(images, question, output_schema))

    async def adescribe_image(
        self,
        image: ImageRef,
        question: str | None = None,
        detail: Detail = "normal",
        *,
        on_text: ProgressCallback | None = None,
    ) -> ImageDescription:
        return await self._arun(*await asyncio.to_thread(self.describe_request, image, question, detail), on_text)

    async def aread_text(
        self, image: ImageRef, fields: Sequence[str] | None = None, *, on_text: ProgressCallback | None = None
    ) -> TextReading:
        return await self._arun(*await asyncio.to_thread(self.read_text_request, image, fields), on_text)

    async def acompare_images(
        self, images: Sequence[ImageRef], question: str | None = None, *, on_text: ProgressCallback | None = None
    ) -> ImageComparison:
        return await self._arun(*await asyncio.to_thread(self.compare_request, images, question), on_text)

    async def aask_images(
        self,
        images: ImageRef | Sequence[ImageRef],
        question: str,
        output_schema: dict[str, Any] | type[BaseModel] | None = None,
        *,
        on_text: ProgressCallback | None = None,
    ) -> Answer:
        return await self._arun(*await asyncio.to_thread(self.ask_request, images, question, output_schema), on_text)

    def _run(self, request: GenerationRequest, images: list[LoadedImage], cls: type[R]) -> R:
        return self.result(cls, images, self.backend.generate_sync(request))

    async def _arun(
        self, request: GenerationRequest, images: list[LoadedImage], cls: type[R], on_text: ProgressCallback | None
    ) -> R:
        request.on_text = on_text
        backend = await asyncio.to_thread(lambda: self.backend)  # a first call may load the model: not on the loop
        return self.result(cls, images, await backend.generate(request))


class _LookUpOnly:
    """An image store that answers handle look-ups and remembers nothing (the call has not succeeded yet)."""

    def __init__(self, store: ImageStore) -> None:
        self._store = store

    def get(self, digest: str) -> LoadedImage | None:
        return self._store.get(digest)

    def add(self, loaded: LoadedImage) -> None:
        pass


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _text_argument(name: str, value: Any, *, optional: bool) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise PromptError(f"{name} must be {'text or null' if optional else 'text'}, not {type(value).__name__}")
    check_text(value, name)
    return value


def _clean(text: str) -> str:
    """User text with image tags removed (the tools place the images themselves).

    Each tag becomes a space, in one pass: a space cannot be part of a tag, so no tag can be left over or
    formed by the removal (removing ``<|image_1|>`` from ``<|ima<|image_1|>ge_1|>`` would form one).
    """
    if len(text) > 16000:  # no need to clean what is refused anyway
        raise PromptError(f"the question has {len(text)} characters; keep it under 4000")
    cleaned = IMAGE_TAG.sub(" ", text).strip()
    if len(cleaned) > 4000:
        raise PromptError(f"the question has {len(cleaned)} characters; keep it under 4000")
    return cleaned


def _field_names(fields: Sequence[str]) -> list[str]:
    if isinstance(fields, str):
        fields = fields.split(",")
    if not isinstance(fields, list | tuple):
        raise PromptError(f"fields must be a list of field names, not {type(fields).__name__}")
    names = []
    for raw in fields:
        if not isinstance(raw, str):
            raise PromptError(f"field names must be strings, not {type(raw).__name__}")
        name = raw.strip()
        if not FIELD_NAME.match(name):
            shown = repr(raw) if len(raw) <= 80 else f"{raw[:60]!r}... ({len(raw)} characters)"
            raise PromptError(
                f"field name {shown} is not allowed: use letters, digits, spaces, '_' or '-', at most 64 characters"
            )
        if name not in names:
            names.append(name)
    if not names or len(names) > 20:
        raise PromptError(f"give 1 to 20 field names, got {len(names)}")
    return names
