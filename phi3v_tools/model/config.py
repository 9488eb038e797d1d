"""The Phi-3-vision architecture, read from an official ``config.json``.

The official file describes the text model (Phi-3-mini fields with ``rope_scaling.type = "su"``) and,
under ``embd_layer`` / ``img_processor``, the image embedding. It names a remote configuration class in
``auto_map``; that is never imported. :class:`Phi3VConfig` turns the file into transformers' own
``Phi3Config`` and ``CLIPVisionConfig`` plus the few image-embedding facts.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from typing import Any

from transformers import CLIPVisionConfig, Phi3Config

from phi3v_tools.errors import CheckpointError

# Phi-3-vision's CLIP ViT-L/14-336, hard-coded in the original (its config.json only names it).
CLIP_VIT_L_14_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
    "num_channels": 3,
}
IMAGE_TOKEN_ID = 32044  # <|image|>: stands in for image positions where an id must be a real token
END_OF_TURN_ID = 32007  # <|end|>
END_OF_TEXT_ID = 32000  # <|endoftext|>
STOP_TOKEN_IDS = (END_OF_TURN_ID, END_OF_TEXT_ID, 2)  # config.json's eos (2) alone runs away


@dataclass
class Phi3VConfig:
    """Everything needed to build :class:`~phi3v_tools.model.Phi3VForCausalLM`."""

    text_config: Phi3Config
    vision_config: CLIPVisionConfig  # the full tower as in the checkpoint (layers beyond layer_idx are not built)
    layer_idx: int = -2  # hidden state taken from the CLIP tower: -2 = second to last layer
    num_img_tokens: int = 144
    name_or_path: str = ""
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def image_dim_out(self) -> int:
        return int(self.vision_config.hidden_size)

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def vision_layers_used(self) -> int:
        """CLIP layers actually run: up to and including the one whose output is taken."""
        total = int(self.vision_config.num_hidden_layers)
        used = total + 1 + self.layer_idx if self.layer_idx < 0 else self.layer_idx
        if not 1 <= used <= total:
            raise CheckpointError(f"img_processor.layer_idx={self.layer_idx} is outside the {total}-layer CLIP tower")
        return used

    @property
    def original_max_position_embeddings(self) -> int:
        rope: dict[str, Any] = dict(self.text_config.rope_parameters or {})
        return int(rope.get("original_max_position_embeddings", 4096))

    @property
    def max_position_embeddings(self) -> int:
        return int(self.text_config.max_position_embeddings)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str]) -> Phi3VConfig:
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"cannot read the model config {os.fspath(path)!r}: {exc}") from exc
        return cls.from_dict(raw, name_or_path=os.path.dirname(os.fspath(path)))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], name_or_path: str = "") -> Phi3VConfig:
        _check_supported(raw)
        img = raw.get("img_processor") or {}
        vision: dict[str, Any] = dict(CLIP_VIT_L_14_336)
        vision.update(img.get("vision_config") or {})
        text = Phi3Config(
            vocab_size=raw.get("vocab_size", 32064),
            hidden_size=raw.get("hidden_size", 3072),
            intermediate_size=raw.get("intermediate_size", 8192),
            num_hidden_layers=raw.get("num_hidden_layers", 32),
            num_attention_heads=raw.get("num_attention_heads", 32),
            num_key_value_heads=raw.get("num_key_value_heads") or raw.get("num_attention_heads", 32),
            hidden_act=raw.get("hidden_act", "silu"),
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            original_max_position_embeddings=raw.get("original_max_position_embeddings", 4096),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-5),
            rope_parameters=_rope_parameters(raw),
            sliding_window=_effective_sliding_window(raw),
            tie_word_embeddings=False,
            bos_token_id=raw.get("bos_token_id", 1),
            eos_token_id=list(STOP_TOKEN_IDS),
            pad_token_id=raw.get("pad_token_id", END_OF_TEXT_ID),
            embd_pdrop=0.0,
            resid_pdrop=0.0,
            attention_dropout=0.0,
        )
        return cls(
            text_config=text,
            vision_config=CLIPVisionConfig(**vision),
            layer_idx=int(img.get("layer_idx", -2)),
            num_img_tokens=int(img.get("num_img_tokens", 144)),
            name_or_path=name_or_path,
            raw=raw,
        )

    def with_attn_implementation(self, attn_implementation: str) -> Phi3VConfig:
        """A copy whose text and vision configs use ``attn_implementation`` (sdpa, eager, flash_attention_2)."""
        new = copy.deepcopy(self)
        new.text_config._attn_implementation = attn_implementation
        # CLIP has no flash-attn path worth the dependency at 577 tokens; it runs SDPA or eager.
        new.vision_config._attn_implementation = "eager" if attn_implementation == "eager" else "sdpa"
        return new


def _effective_sliding_window(raw: dict[str, Any]) -> int | None:
    """None when the window can never bind (>= the context: 131072 and 262144 in the official configs).

    Same attention either way, but without a window SDPA can take its causal fast path instead of a
    materialised mask (3x faster prefill on CPU).
    """
    window = raw.get("sliding_window")
    if window is None or window >= raw.get("max_position_embeddings", 4096):
        return None
    return int(window)


def _rope_parameters(raw: dict[str, Any]) -> dict[str, Any]:
    theta = float(raw.get("rope_theta", 10000.0))
    scaling = raw.get("rope_scaling")
    if not scaling:
        return {"rope_type": "default", "rope_theta": theta}
    kind = scaling.get("type") or scaling.get("rope_type")
    if kind not in ("su", "longrope"):
        raise CheckpointError(f"rope_scaling type {kind!r} is not supported (Phi-3-vision uses 'su' = LongRoPE)")
    original = int(raw.get("original_max_position_embeddings", 4096))
    return {
        "rope_type": "longrope",
        "rope_theta": theta,
        "short_factor": list(scaling["short_factor"]),
        "long_factor": list(scaling["long_factor"]),
        "original_max_position_embeddings": original,
        "factor": raw.get("max_position_embeddings", original) / original,
    }


def _check_supported(raw: dict[str, Any]) -> None:
    model_type = raw.get("model_type")
    if model_type not in (None, "phi3_v"):
        raise CheckpointError(f"config.json has model_type {model_type!r}; expected 'phi3_v' (Phi-3-vision)")
    embd = raw.get("embd_layer") or {}
    expected = {
        "embedding_cls": "image",
        "hd_transform_order": "sub_glb",
        "projection_cls": "mlp",
        "use_hd_transform": True,
        "with_learnable_separator": True,
    }
    for key, value in expected.items():
        if key in embd and embd[key] != value:
            raise CheckpointError(f"embd_layer.{key}={embd[key]!r} is not supported; only {value!r} is implemented")
    img = raw.get("img_processor") or {}
    if img.get("type_feature", "patch") != "patch":
        raise CheckpointError(f"img_processor.type_feature={img['type_feature']!r} is not supported; only 'patch'")
