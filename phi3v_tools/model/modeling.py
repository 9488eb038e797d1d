"""Native Phi-3-vision: transformers' CLIPVisionModel + the HD image projection + transformers' Phi3ForCausalLM.

Reads top to bottom: the image projection (2x2 merge, crop layout, separators, MLP), then the model that
writes image features into the text embeddings and runs the language model. Checkpoint loading lives in
``checkpoint.py``, generation in ``generation.py``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import CLIPVisionModel, Phi3ForCausalLM
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from phi3v_tools.errors import PromptError
from phi3v_tools.model.config import Phi3VConfig
from phi3v_tools.model.image_processing import CROP_SIZE

PATCH_GRID = 24  # 336 / 14 patches per side
MERGED_GRID = 12  # after the 2 x 2 merge


class Phi3VImageProjection(nn.Module):
    """Crops' CLIP features -> one sequence of LM-width image tokens per image.

    Parameter names are the checkpoint's (``glb_GN``: the separator between the sub-crops and the global
    view; ``sub_GN``: the "newline" after each row of merged tokens; ``img_projection``: the MLP).
    """

    def __init__(self, image_dim_out: int, hidden_size: int) -> None:
        super().__init__()
        merged_dim = 4 * image_dim_out  # 2 x 2 patches concatenated
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, merged_dim))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, merged_dim))
        self.img_projection = nn.Sequential(
            nn.Linear(merged_dim, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size)
        )

    @staticmethod
    def merge_2x2(features: torch.Tensor) -> torch.Tensor:
        # features: [n, 576, d] patch tokens of n crops (CLS dropped)
        n, _, d = features.shape
        grid = features.reshape(n, MERGED_GRID, 2, MERGED_GRID, 2, d)  # n, 12, 2(dy), 12, 2(dx), d
        grid = grid.permute(0, 1, 3, 2, 4, 5)  # n, 12, 12, 2(dy), 2(dx), d
        return grid.reshape(n, MERGED_GRID, MERGED_GRID, 4 * d)  # n, 12, 12, 4d

    def add_newlines(self, grid: torch.Tensor) -> torch.Tensor:
        # grid: [rows, cols, 4d] -> [rows * (cols + 1), 4d] with sub_GN closing every row
        rows = grid.shape[0]
        newline = self.sub_GN.reshape(1, 1, -1).expand(rows, 1, -1).to(grid.dtype)
        return torch.cat([grid, newline], dim=1).reshape(-1, grid.shape[-1])

    def forward(self, crop_features: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        # crop_features: [1 + h*w, 576, d] for one image: global view first, then its tiles row-major
        merged = self.merge_2x2(crop_features)  # 1 + h*w, 12, 12, 4d
        tiles = merged[1:].reshape(grid_h, grid_w, MERGED_GRID, MERGED_GRID, -1)  # h, w, 12, 12, 4d
        tiles = tiles.permute(0, 2, 1, 3, 4).reshape(grid_h * MERGED_GRID, grid_w * MERGED_GRID, -1)  # 12h, 12w, 4d
        sub = self.add_newlines(tiles)  # 12h * (12w + 1), 4d
        glb = self.add_newlines(merged[0])  # 12 * 13, 4d
        separator = self.glb_GN.reshape(1, -1).to(sub.dtype)
        tokens = torch.cat([sub, separator, glb], dim=0)
        first: nn.Linear = self.img_projection[0]  # type: ignore[assignment]
        return self.img_projection(tokens.to(first.weight.dtype))


class Phi3VForCausalLM(nn.Module):
    """Phi-3-vision with the Hugging Face call shapes: ``model(**inputs).logits`` and ``model.generate(**inputs)``.

    ``input_ids`` mark image ``k``'s positions with runs of ``-k`` (as the official processor does); padding
    positions have ``attention_mask == 0``. Load with :meth:`from_pretrained`.
    """

    def __init__(self, config: Phi3VConfig) -> None:
        super().__init__()
        self.config = config
        vision_config = config.vision_config.__class__(**config.vision_config.to_dict())
        vision_config.num_hidden_layers = config.vision_layers_used  # never build layers whose output is unused
        vision_config._attn_implementation = config.vision_config._attn_implementation
        self.vision_tower = CLIPVisionModel(vision_config)
        self.image_projection = Phi3VImageProjection(config.image_dim_out, config.hidden_size)
        self.language_model = Phi3ForCausalLM(config.text_config)

    # -- properties in the transformers style ---------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.language_model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.lm_head.weight.dtype

    @property
    def attn_implementation(self) -> str:
        return str(self.config.text_config._attn_implementation)

    @classmethod
    def from_pretrained(cls, path_or_id: str | Any, **kwargs: Any) -> Phi3VForCausalLM:
        """Load an official checkpoint (local directory or hub id); see :func:`~phi3v_tools.model.load_model`."""
        from phi3v_tools.model.checkpoint import load_model

        return load_model(path_or_id, model_cls=cls, **kwargs)

    # -- vision -------------------------------------------------------------------------------------------------------

    def get_image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """Projected features per image: a list of [tokens_i, hidden] tensors.

        Only real crops go through CLIP (the zero crops that pad ``pixel_values`` to ``num_crops + 1`` are
        skipped: crops do not interact, so this changes nothing but the cost).
        """
        # pixel_values: [n_images, num_crops + 1, 3, 336, 336]; image_sizes: [n_images, 2] (height, width)
        grids = [(int(h) // CROP_SIZE, int(w) // CROP_SIZE) for h, w in image_sizes.tolist()]
        for (gh, gw), crops in zip(grids, pixel_values, strict=True):
            if gh * gw + 1 > crops.shape[0]:
                raise PromptError(f"image_sizes asks for {gh}x{gw} crops but pixel_values holds {crops.shape[0] - 1}")
        real = torch.cat([crops[: 1 + gh * gw] for (gh, gw), crops in zip(grids, pixel_values, strict=True)])
        real = real.to(device=self.device, dtype=self.vision_tower.embeddings.patch_embedding.weight.dtype)
        hidden = self.vision_tower(pixel_values=real).last_hidden_state[:, 1:]  # all crops, CLS dropped: N, 576, d
        features, start = [], 0
        for gh, gw in grids:
            count = 1 + gh * gw
            features.append(self.image_projection(hidden[start : start + count], gh, gw))
            start += count
        return features

    # -- text + images ------------------------------------------------------------------------------------------------

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.model.embed_tokens(input_ids.clamp(min=0))

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.model.embed_tokens

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        image_features: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Token embeddings with each image's features written over its run of ``-k`` ids.

        Images are taken in ``pixel_values`` order: all of row 0's (by tag number ``k``), then row 1's, ...
        ``image_features`` (from :meth:`get_image_features`, e.g. cached) replaces ``pixel_values``.
        """
        input_ids = input_ids.to(self.device)
        embeds = self.embed_tokens(input_ids)
        image_mask = input_ids < 0
        if not bool(image_mask.any()):
            if image_features or (pixel_values is not None and len(pixel_values) > 0):
                raise PromptError("images were given but input_ids has no image positions (runs of -k ids)")
            return embeds
        if image_features is None:
            if pixel_values is None or image_sizes is None:
                raise PromptError("input_ids has image positions but no pixel_values/image_sizes were given")
            image_features = self.get_image_features(pixel_values, image_sizes)
        offset = 0
        for row in range(input_ids.shape[0]):
            tags = sorted({-int(t) for t in input_ids[row][image_mask[row]].unique().tolist()})
            for k in tags:
                if offset + k - 1 >= len(image_features):
                    raise PromptError(
                        f"input_ids refer to {offset + len(tags)} images but only {len(image_features)} were given"
                    )
                positions = input_ids[row] == -k
                feature = image_features[offset + k - 1]
                n_positions = int(positions.sum())
                if n_positions != feature.shape[0]:
                    raise PromptError(
                        f"row {row}, image {k}: the prompt has {n_positions} image positions but the image yields "
                        f"{feature.shape[0]} features (processed with a different num_crops?)"
                    )
                embeds[row, positions] = feature.to(device=embeds.device, dtype=embeds.dtype)
            offset += len(tags)
        if offset != len(image_features):
            raise PromptError(f"{len(image_features)} images were given but input_ids refer to {offset}")
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        image_features: list[torch.Tensor] | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits for every position. Left padding is handled: positions count real tokens only."""
        if "past_key_values" in kwargs:
            cache = kwargs.pop("past_key_values")
        if kwargs:
            raise TypeError(f"unexpected arguments: {', '.join(sorted(kwargs))}")
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            inputs_embeds = self.embed(input_ids, pixel_values, image_sizes, image_features)
        if attention_mask is not None:
            attention_mask = attention_mask.to(inputs_embeds.device)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = positions_from_mask(attention_mask, inputs_embeds.shape[1], past, inputs_embeds.device)
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
        )

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Prompt ids followed by the new tokens, [batch, prompt + new]; see :func:`~phi3v_tools.model.generate`."""
        from phi3v_tools.model.generation import generate

        return generate(self, input_ids, **kwargs)


def positions_from_mask(
    attention_mask: torch.Tensor | None, length: int, past: int, device: torch.device
) -> torch.Tensor:
    """Position ids [batch, length] counting only attended tokens (left padding gets position 0)."""
    if attention_mask is None:
        return (torch.arange(length, device=device) + past).unsqueeze(0)
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, -length:]
