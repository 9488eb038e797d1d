"""A tiny random Phi-3-vision checkpoint in the official layout, for tests and the offline demo.

Same file names, config keys, weight names and tokenizer special ids as the official checkpoints, with
a 2-layer 64-wide language model and a 2-layer 64-wide CLIP (declared in ``img_processor.vision_config``,
which the official configs do not have). Its answers are random text; its shapes and token counts are real.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from phi3v_tools.model.checkpoint import build_empty_model, checkpoint_name, clip_prefix
from phi3v_tools.model.config import Phi3VConfig
from phi3v_tools.model.image_processing import CLIP_MEAN, CLIP_STD
from phi3v_tools.model.modeling import Phi3VForCausalLM
from phi3v_tools.model.tiny_tokenizer import write_tokenizer_files

TINY_VISION = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 336,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "projection_dim": 64,
}


def tiny_config() -> dict[str, Any]:
    """The ``config.json`` of the tiny checkpoint: the official keys, small sizes."""
    return {
        "_name_or_path": "phi3v-tools/tiny-random-phi-3-vision",
        "architectures": ["Phi3VForCausalLM"],
        "model_type": "phi3_v",
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "embd_layer": {
            "embedding_cls": "image",
            "hd_transform_order": "sub_glb",
            "projection_cls": "mlp",
            "use_hd_transform": True,
            "with_learnable_separator": True,
        },
        "hidden_act": "silu",
        "hidden_size": 64,
        "img_processor": {
            "image_dim_out": TINY_VISION["hidden_size"],
            "model_name": "openai/clip-vit-large-patch14-336",
            "name": "clip_vision_model",
            "num_img_tokens": 144,
            "vision_config": TINY_VISION,
        },
        "initializer_range": 0.02,
        "intermediate_size": 128,
        "max_position_embeddings": 131072,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 4,
        "original_max_position_embeddings": 4096,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "type": "su",
            "short_factor": [1.0 + 0.1 * i for i in range(8)],
            "long_factor": [1.0 + 0.5 * i for i in range(8)],
        },
        "rope_theta": 10000.0,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": 32064,
    }


def official_weight_names(config: Phi3VConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint name -> shape as the official checkpoints store them (every CLIP layer, no ``wte`` alias)."""
    full: Phi3VForCausalLM = build_empty_model(dataclasses.replace(config, layer_idx=-1))  # -1: build all CLIP layers
    clip = clip_prefix(full)
    return {checkpoint_name(name, clip): tuple(param.shape) for name, param in full.named_parameters()}


def make_tiny_checkpoint(directory: str | os.PathLike[str], *, seed: int = 0, num_crops: int = 4) -> Path:
    """Write a tiny random checkpoint (config, preprocessor config, tokenizer, model.safetensors) to ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    raw = tiny_config()
    config = Phi3VConfig.from_dict(raw)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in sorted(official_weight_names(config).items()):
        if name.endswith(("norm.weight", "layer_norm1.weight", "layer_norm2.weight", "layrnorm.weight")):
            tensors[name] = torch.ones(shape)
        elif name.endswith(".bias") and "norm" in name:
            tensors[name] = torch.zeros(shape)
        else:
            tensors[name] = torch.randn(shape, generator=generator) * 0.02
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.fspath(out / "model.safetensors"), {"format": "pt"})
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    preprocessor = {
        "num_crops": num_crops,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "image_processor_type": "Phi3VImageProcessor",
        "processor_class": "Phi3VProcessor",
        "num_img_tokens": 144,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n", encoding="utf-8")
    write_tokenizer_files(out)
    return out


TINY_VERSION = 1  # bump when the tiny checkpoint's contents change, so cached copies are rebuilt


def ensure_tiny_checkpoint(cache_dir: Path) -> Path:
    """The tiny checkpoint under ``cache_dir``, written there first if absent (atomically: safe for parallel runs)."""
    target = cache_dir / f"tiny-random-phi-3-vision-v{TINY_VERSION}"
    if (target / "model.safetensors").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".tiny-", dir=cache_dir))
    make_tiny_checkpoint(scratch)
    try:
        scratch.rename(target)
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(scratch, ignore_errors=True)
    return target
