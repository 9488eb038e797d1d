"""The chat format's torch-free parts: roles, ``<|image_k|>`` tags and text checks.

The tools and the engine's message checks use these without loading a tokenizer; the processor
(:mod:`phi3v_tools.model.processing`, which re-exports them) uses them to build prompts.
"""

from __future__ import annotations

import re

from phi3v_tools.errors import PromptError

__all__ = ["CHAT_ROLES", "IMAGE_TAG", "check_image_tags", "check_text"]

IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")
CHAT_ROLES = ("system", "user", "assistant")


def check_text(text: str, what: str) -> None:
    """PromptError unless ``text`` is valid Unicode (a lone surrogate cannot be encoded, nor tokenized)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PromptError(
            f"{what} is not valid Unicode text: a lone surrogate {text[exc.start]!r} at character {exc.start}; "
            "send UTF-8 text"
        ) from None


def check_image_tags(prompt: str, num_images: int) -> list[int]:
    """The tag numbers of ``prompt`` in order; PromptError unless they are exactly 1..num_images in order."""
    tags = [int(k) for k in IMAGE_TAG.findall(prompt)]
    if len(tags) != len(set(tags)):
        repeated = sorted({k for k in tags if tags.count(k) > 1})
        raise PromptError(
            f"<|image_{repeated[0]}|> appears more than once; reference each image exactly once "
            "(to show the same picture twice, pass it twice as two images)"
        )
    over = [k for k in tags if k < 1 or k > num_images]
    if over:
        raise PromptError(
            f"the prompt references <|image_{over[0]}|> but {num_images} image(s) were given; "
            f"tags must be <|image_1|> .. <|image_{max(num_images, 1)}|>"
        )
    if len(tags) < num_images:
        absent = sorted(set(range(1, num_images + 1)) - set(tags))
        raise PromptError(
            f"{num_images} image(s) were given but the prompt has no <|image_{absent[0]}|> tag; "
            "put one <|image_k|> tag in the prompt for each image"
        )
    if tags != sorted(tags):
        raise PromptError(f"image tags must appear in order <|image_1|>, <|image_2|>, ...; found {tags}")
    return tags
