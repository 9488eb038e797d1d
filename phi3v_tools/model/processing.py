"""Phi-3-vision prompt processing: chat text + images -> ``input_ids`` with runs of ``-k`` for image ``k``.

As in the original: the prompt is split on ``<|image_k|>`` tags, every text chunk is tokenized on its own
(so each starts with BOS ``<s>``), and each tag becomes as many ``-k`` ids as image ``k`` yields tokens.
Beyond the original: tags are checked (each of 1..n exactly once, in order, n = number of images) with a
message saying what is wrong, and a list of prompts is processed as one left-padded batch.

:meth:`Phi3VProcessor.chat_ids` tokenizes chat messages with their contents as *text*: a ``<|end|>`` or
``<|assistant|>`` written by a caller is the characters it is made of, never a control token, so no caller
can close its turn or write the assistant's or a system turn. For contents without such strings the ids are
exactly those of the original (the template's text tokenized whole).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tokenizers import Tokenizer
from transformers import BatchFeature, PreTrainedTokenizerFast

from phi3v_tools.errors import CheckpointError, PromptError
from phi3v_tools.model.chat_format import CHAT_ROLES, IMAGE_TAG, check_image_tags
from phi3v_tools.model.chat_format import check_text as check_text  # re-exported: it lives in model.chat_format
from phi3v_tools.model.checkpoint import resolve_checkpoint
from phi3v_tools.model.image_processing import Phi3VImageProcessor

DEFAULT_NUM_CROPS = 1  # the original image processor's class default, when preprocessor_config.json has none
# Unicode White_Space, what the tokenizer strips beside its tokens (Python's isspace() also counts U+001C..U+001F)
_WHITE_SPACE = "".join(
    map(
        chr,
        [*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F, 0x3000],
    )
)
_CONTENT = re.compile("\ue000(\\d+)\ue001")  # where message k's content goes in the rendered template

ImagesArg = Image.Image | Sequence[Image.Image] | None


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

    def chat_ids(self, messages: Sequence[Mapping[str, str]], tokens_per_image: Sequence[int]) -> list[int]:
        """Ids of a chat prompt whose message contents are tokenized as text (see the module docstring).

        The chat template is rendered with a placeholder for each content; the template's own special tokens
        are found in that, and each stretch of text between them (template text and contents together, as
        the tokenizer would see it) goes through the tokenizer's normalizer and model only, which never
        produce special or added tokens. ``<|image_k|>`` tags in contents place the images as in
        :meth:`prompt_ids`.
        """
        for i, message in enumerate(messages):
            if message.get("role") not in CHAT_ROLES:
                raise PromptError(
                    f"message {i + 1} has role {str(message.get('role'))[:40]!r}; use one of {CHAT_ROLES}"
                )
            if not isinstance(message.get("content"), str):
                raise PromptError(f"message {i + 1} has no text content")
        placeholders = [{"role": m["role"], "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
        rendered = self.apply_chat_template(placeholders)
        if [int(k) for k in _CONTENT.findall(rendered)] != list(range(len(messages))):
            raise PromptError("the chat template does not place each message's content once, in order")
        check_image_tags(_CONTENT.sub(lambda m: messages[int(m.group(1))]["content"], rendered), len(tokens_per_image))
        specials = self._added_tokens
        parts = self._special_split.split(rendered)  # text, special, text, special, ..., text
        ids = [int(self.tokenizer.bos_token_id)]
        for i in range(0, len(parts), 2):
            text = _CONTENT.sub(lambda m: messages[int(m.group(1))]["content"], parts[i])
            if i > 0 and specials[parts[i - 1]][1].rstrip:  # the token before eats the whitespace after it
                text = text.lstrip(_WHITE_SPACE)
            if i + 1 < len(parts) and specials[parts[i + 1]][1].lstrip:
                text = text.rstrip(_WHITE_SPACE)
            pieces = IMAGE_TAG.split(text)  # text, k, text, k, ..., text
            for j in range(0, len(pieces), 2):
                ids.extend(self._text_ids(pieces[j]))
                if j + 1 < len(pieces):
                    k = int(pieces[j + 1])
                    ids.extend([-k] * tokens_per_image[k - 1])
                    ids.append(int(self.tokenizer.bos_token_id))  # the next chunk starts with its BOS
            if i + 1 < len(parts):
                ids.append(specials[parts[i + 1]][0])
        return ids

    @cached_property
    def _added_tokens(self) -> dict[str, tuple[int, Any]]:
        """Every added token (special or not, as the tokenizer matches them all in text): content -> (id, token)."""
        return {token.content: (int(i), token) for i, token in self.tokenizer.added_tokens_decoder.items()}

    @cached_property
    def _special_split(self) -> re.Pattern[str]:
        names = sorted(self._added_tokens, key=len, reverse=True)
        return re.compile("(" + "|".join(re.escape(name) for name in names) + ")")

    def _text_ids(self, text: str) -> list[int]:
        """Ids of text between special tokens: normalizer, pre-tokenizer and model, never the added tokens."""
        if not text:
            return []
        backend = self.tokenizer.backend_tokenizer
        normalized = backend.normalizer.normalize_str(text) if backend.normalizer is not None else text
        pieces = backend.pre_tokenizer.pre_tokenize_str(normalized) if backend.pre_tokenizer is not None else None
        return [t.id for piece, _span in (pieces or [(normalized, None)]) for t in backend.model.tokenize(piece)]

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
