"""Phi-3-vision prompt processing: chat text + images -> ``input_ids`` with runs of ``-k`` for image ``k``.

As in the original: the prompt is split on ``<|image_k|>`` tags, every text chunk is tokenized on its own
(so each starts with BOS ``<s>``), and each tag becomes as many ``-k`` ids as image ``k`` yields tokens.
Beyond the original: tags are checked (each of 1..n exactly once, in order, n = number of images) with a
message saying what is wrong, and a list of prompts is processed as one left-padded batch.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tokenizers import Tokenizer
from transformers import BatchFeature, PreTrainedTokenizerFast

from phi3v_tools.errors import CheckpointError, PromptError
from phi3v_tools.model.checkpoint import resolve_checkpoint
from phi3v_tools.model.image_processing import Phi3VImageProcessor

IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")
DEFAULT_NUM_CROPS = 1  # the original image processor's class default, when preprocessor_config.json has none

ImagesArg = Image.Image | Sequence[Image.Image] | None


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


def load_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    """The fast tokenizer from ``tokenizer.json`` + ``tokenizer_config.json`` (no class lookup, no remote code)."""
    tokenizer_file = directory / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise CheckpointError(f"{directory} has no tokenizer.json")
    settings: dict[str, Any] = {}
    config_file = directory / "tokenizer_config.json"
    if config_file.is_file():
        settings = json.loads(config_file.read_text(encoding="utf-8"))

    def token(key: str, default: str) -> str:
        value = settings.get(key, default)
        return str(value["content"] if isinstance(value, dict) else value)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_file(os.fspath(tokenizer_file)),
        bos_token=token("bos_token", "<s>"),
        eos_token=token("eos_token", "<|endoftext|>"),
        unk_token=token("unk_token", "<unk>"),
        pad_token=token("pad_token", "<|endoftext|>"),
        model_max_length=settings.get("model_max_length", 131072),
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    if settings.get("chat_template"):
        tokenizer.chat_template = settings["chat_template"]
    return tokenizer


class Phi3VProcessor:
    """Text and images -> model inputs, in the call shape of the official processor.

    ``processor(prompt, [img1, img2], return_tensors="pt")`` for one prompt, or
    ``processor([p1, p2], [[imgs of p1], [imgs of p2]], padding=True)`` for a left-padded batch.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerFast, image_processor: Phi3VImageProcessor) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor

    def __repr__(self) -> str:
        return f"Phi3VProcessor(num_crops={self.num_crops}, vocab={len(self.tokenizer)})"

    @property
    def num_crops(self) -> int:
        return self.image_processor.num_crops

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike[str],
        *,
        num_crops: int | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        trust_remote_code: bool | None = None,
        **kwargs: Any,
    ) -> Phi3VProcessor:
        """Tokenizer and image settings of a checkpoint (directory or hub id); ``num_crops`` overrides its default."""
        del trust_remote_code  # accepted for seed compatibility; nothing remote is ever run
        if kwargs:
            raise TypeError(f"unexpected arguments: {', '.join(sorted(kwargs))}")
        directory = resolve_checkpoint(path_or_id, revision=revision, weights=False, cache_dir=cache_dir)
        image_settings: dict[str, Any] = {}
        preprocessor = directory / "preprocessor_config.json"
        if preprocessor.is_file():
            image_settings = json.loads(preprocessor.read_text(encoding="utf-8"))
        crops = num_crops if num_crops is not None else int(image_settings.get("num_crops", DEFAULT_NUM_CROPS))
        image_processor = Phi3VImageProcessor(
            num_crops=crops, num_img_tokens=int(image_settings.get("num_img_tokens", 144))
        )
        return cls(load_tokenizer(directory), image_processor)

    # -- prompts ------------------------------------------------------------------------------------------------------

    def prompt_ids(self, prompt: str, tokens_per_image: Sequence[int]) -> list[int]:
        """Ids of one prompt: each chunk tokenized with its BOS, image k as ``tokens_per_image[k-1]`` copies of -k."""
        tags = check_image_tags(prompt, len(tokens_per_image))
        chunks = IMAGE_TAG.split(prompt)[::2]  # split() also returns the captured numbers at odd indices
        ids: list[int] = []
        for i, chunk in enumerate(chunks):
            ids.extend(self.tokenizer(chunk).input_ids)
            if i < len(tags):
                ids.extend([-tags[i]] * tokens_per_image[tags[i] - 1])
        return ids

    def __call__(
        self,
        text: str | Sequence[str],
        images: ImagesArg | Sequence[ImagesArg] = None,
        return_tensors: str | None = "pt",
        padding: bool | str = False,
        num_crops: int | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """``input_ids``, ``attention_mask`` and, with images, ``pixel_values`` and ``image_sizes``."""
        kwargs.pop("truncation", None)  # never truncate: a cut image run would not match its features
        if kwargs:
            raise TypeError(f"unexpected arguments: {', '.join(sorted(kwargs))}")
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors={return_tensors!r} is not supported; use 'pt'")
        prompts, per_prompt_images = _normalize_batch(text, images)
        crops = self.num_crops if num_crops is None else num_crops
        rows, pixel_values, image_sizes = [], [], []
        for prompt, prompt_images in zip(prompts, per_prompt_images, strict=True):
            processed = self.image_processor(prompt_images, num_crops=crops)
            sizes = processed["image_sizes"].tolist()
            from phi3v_tools.model.image_processing import num_image_tokens_for_grid

            tokens = [num_image_tokens_for_grid(h // 336, w // 336) for h, w in sizes]
            rows.append(self.prompt_ids(prompt, tokens))
            if prompt_images:
                pixel_values.append(processed["pixel_values"])
                image_sizes.append(processed["image_sizes"])
        input_ids, attention_mask = self._pad(rows, padding)
        data: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if pixel_values:
            data["pixel_values"] = torch.cat(pixel_values)
            data["image_sizes"] = torch.cat(image_sizes)
        return BatchFeature(data=data, tensor_type=None)

    def _pad(self, rows: list[list[int]], padding: bool | str) -> tuple[torch.Tensor, torch.Tensor]:
        longest = max(len(r) for r in rows)
        if not padding and any(len(r) != longest for r in rows):
            raise PromptError("the prompts have different lengths; pass padding=True to left-pad them into a batch")
        if padding not in (True, False, "longest"):
            raise ValueError(f"padding={padding!r} is not supported; use True (left-pad to the longest prompt)")
        pad_id = int(self.tokenizer.pad_token_id)
        ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            if row:
                ids[i, longest - len(row) :] = torch.tensor(row, dtype=torch.long)
                mask[i, longest - len(row) :] = 1
        return ids, mask

    # -- tokenizer passthroughs ---------------------------------------------------------------------------------------

    def batch_decode(self, sequences: Any, **kwargs: Any) -> list[str]:
        """Decode rows of ids; image placeholders (negative ids) are dropped."""
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.tolist()
        return list(self.tokenizer.batch_decode([[i for i in row if i >= 0] for row in sequences], **kwargs))

    def decode(self, ids: Any, **kwargs: Any) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return str(self.tokenizer.decode([i for i in ids if i >= 0], **kwargs))

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        """The chat prompt as text (``tokenize=False``), with the assistant's turn opened by default."""
        kwargs.setdefault("add_generation_prompt", True)
        return str(self.tokenizer.apply_chat_template(messages, tokenize=False, **kwargs))


def _normalize_batch(text: str | Sequence[str], images: Any) -> tuple[list[str], list[list[Image.Image]]]:
    """(prompts, images of each prompt) from the single-prompt or batch call shapes."""
    if isinstance(text, str):
        if images is None:
            return [text], [[]]
        if isinstance(images, Image.Image):
            return [text], [[images]]
        return [text], [_image_list(images, "images")]
    prompts = list(text)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise PromptError("text must be a string or a non-empty list of strings")
    if images is None:
        return prompts, [[] for _ in prompts]
    images = list(images)
    if len(images) != len(prompts):
        raise PromptError(
            f"{len(prompts)} prompts but {len(images)} image lists; for a batch pass one list of images per prompt, "
            "e.g. processor([p1, p2], [[img_a], [img_b, img_c]], padding=True)"
        )
    per_prompt: list[list[Image.Image]] = []
    for i, item in enumerate(images):
        if item is None:
            per_prompt.append([])
        elif isinstance(item, Image.Image):
            per_prompt.append([item])
        else:
            per_prompt.append(_image_list(item, f"images[{i}]"))
    return prompts, per_prompt


def _image_list(images: Any, where: str) -> list[Image.Image]:
    items = list(images)
    for i, item in enumerate(items):
        if not isinstance(item, Image.Image):
            raise PromptError(f"{where}[{i}] is a {type(item).__name__}, not a PIL image")
    return items
