"""Finding and loading checkpoints: official weight names, strict and explicit loading errors, shards, no remote
code, offline hub ids, and the device / dtype / attention choices.

The official-name tests run on the meta device against the shared reference index (skipped without it); every
other test uses copies of the package's own tiny checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from phi3v_tools.errors import CheckpointError, ModelNotFoundError
from phi3v_tools.model import Phi3VForCausalLM, Phi3VProcessor
from phi3v_tools.model.checkpoint import (
    EMBEDDING_ALIAS,
    build_empty_model,
    choose_attn_implementation,
    choose_device,
    choose_dtype,
    plan_loading,
    weight_files,
)
from phi3v_tools.model.config import Phi3VConfig
from phi3v_tools.model.tiny import official_weight_names

OFFICIAL_PARAMETERS = 4_146_621_440  # SPEC section 2: recomputed from the 3-vision index's shapes
OFFICIAL_TOTAL_SIZE = 8_293_242_880  # the 3-vision index's metadata.total_size (bf16: 2 bytes per parameter)
CLIP_LAYER_23 = "model.vision_embed_tokens.img_processor.vision_model.encoder.layers.23."
CHECKPOINTS = ["phi-3-vision-128k-instruct", "phi-3.5-vision-instruct"]


# ---------------------------------------------------------------------------------------------------------------------
# Helpers


def _index(reference_dir: Path) -> dict[str, Any]:
    """The 3-vision index; SPEC section 2: 3.5 ships none, and its key set is the same."""
    return json.loads((reference_dir / "phi-3-vision-128k-instruct" / "model.safetensors.index.json").read_text())


def _copy_tiny(tiny_dir: Path, tmp_path: Path, name: str = "ckpt") -> Path:
    return Path(shutil.copytree(tiny_dir, tmp_path / name))


def _rewrite_weights(directory: Path, edit: Any) -> None:
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, os.fspath(directory / "model.safetensors"), {"format": "pt"})


def _edit_config(directory: Path, **changes: Any) -> None:
    path = directory / "config.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


@pytest.fixture(scope="module")
def image_inputs(tiny_processor: Phi3VProcessor) -> Any:
    """One text + image prompt (a 500 x 300 noise picture, num_crops=1 to keep the CPU time small)."""
    generator = torch.Generator().manual_seed(1)
    pixels = (torch.rand(300, 500, 3, generator=generator) * 255).to(torch.uint8).numpy()
    prompt = "<|user|>\n<|image_1|>\nWhat is shown in this image?<|end|>\n<|assistant|>\n"
    inputs = tiny_processor(prompt, [Image.fromarray(pixels)], return_tensors="pt", num_crops=1)
    assert (inputs["input_ids"] < 0).any()
    return inputs


@pytest.fixture(scope="module")
def reference_logits(tiny_model: Phi3VForCausalLM, image_inputs: Any) -> torch.Tensor:
    """The single-file tiny checkpoint's logits (fp32, sdpa) on ``image_inputs``."""
    assert tiny_model.attn_implementation == "sdpa"
    return _logits(tiny_model, image_inputs)


def _logits(model: Phi3VForCausalLM, inputs: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


# ---------------------------------------------------------------------------------------------------------------------
# Official weight names (meta device, no weights needed)


def test_official_index_has_592_tensors_whose_bf16_sizes_add_up_to_its_total_size(reference_dir: Path) -> None:
    index = _index(reference_dir)
    config = Phi3VConfig.from_json_file(reference_dir / "phi-3-vision-128k-instruct" / "config.json")
    shapes = official_weight_names(config)
    assert len(index["weight_map"]) == 592
    bf16_bytes = sum(2 * torch.Size(shapes[name]).numel() for name in index["weight_map"])
    assert bf16_bytes == index["metadata"]["total_size"] == OFFICIAL_TOTAL_SIZE


def test_official_weight_names_of_the_official_config_are_exactly_the_index_names(reference_dir: Path) -> None:
    config = Phi3VConfig.from_json_file(reference_dir / "phi-3-vision-128k-instruct" / "config.json")
    names = official_weight_names(config)
    index_names = list(_index(reference_dir)["weight_map"])
    assert len(names) == len(index_names) == 592
    assert set(names) == set(index_names)


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_official_names_load_with_nothing_missing_or_unexpected_and_only_clip_layer_23_skipped(
    checkpoint: str, reference_dir: Path
) -> None:
    names = list(_index(reference_dir)["weight_map"])
    config = Phi3VConfig.from_json_file(reference_dir / checkpoint / "config.json")
    model = build_empty_model(config)
    assert all(p.is_meta for p in model.parameters())

    mapping, skipped, unexpected, missing = plan_loading(names, model)

    assert unexpected == []
    assert missing == []
    expected_skipped = {n for n in names if n.startswith(CLIP_LAYER_23)}
    assert len(expected_skipped) == 16  # q, k, v, out (weight + bias), two layer norms, fc1, fc2 (weight + bias)
    assert set(skipped) == expected_skipped
    assert len(mapping) + len(skipped) == len(names) == 592
    assert sorted(mapping.values()) == sorted(name for name, _ in model.named_parameters())


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_built_parameters_plus_skipped_tensors_count_the_official_4_146_621_440(
    checkpoint: str, reference_dir: Path
) -> None:
    names = list(_index(reference_dir)["weight_map"])
    config = Phi3VConfig.from_json_file(reference_dir / checkpoint / "config.json")
    model = build_empty_model(config)
    _, skipped, _, _ = plan_loading(names, model)
    shapes = official_weight_names(config)  # built with all 24 CLIP layers
    built = sum(p.numel() for p in model.parameters())
    skipped_size = sum(torch.Size(shapes[name]).numel() for name in skipped)
    # one CLIP ViT-L layer: q/k/v/out 1024x1024 + biases, fc1 4096x1024 + bias, fc2 1024x4096 + bias, two norms
    assert skipped_size == 4 * (1024 * 1024 + 1024) + (4096 * 1024 + 4096) + (1024 * 4096 + 1024) + 2 * 2 * 1024
    assert built + skipped_size == OFFICIAL_PARAMETERS


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_official_config_builds_longrope_with_the_checkpoints_factors_and_a_23_layer_clip(
    checkpoint: str, reference_dir: Path
) -> None:
    raw = json.loads((reference_dir / checkpoint / "config.json").read_text())
    config = Phi3VConfig.from_json_file(reference_dir / checkpoint / "config.json")
    rope = config.text_config.rope_parameters
    assert rope["rope_type"] == "longrope"
    assert rope["short_factor"] == raw["rope_scaling"]["short_factor"]
    assert rope["long_factor"] == raw["rope_scaling"]["long_factor"]
    assert len(rope["short_factor"]) == len(rope["long_factor"]) == 48
    assert rope["original_max_position_embeddings"] == 4096
    assert config.original_max_position_embeddings == 4096
    assert config.max_position_embeddings == 131072

    model = build_empty_model(config)
    assert int(config.vision_config.num_hidden_layers) == 24  # the tower as the checkpoint stores it
    assert len(model.vision_tower.encoder.layers) == 23  # layer 23's output is never used
    assert model.vision_tower.config.num_hidden_layers == 23


# ---------------------------------------------------------------------------------------------------------------------
# Loading errors name the tensors


def test_a_missing_tensor_is_a_checkpoint_error_naming_it(tiny_dir: Path, tmp_path: Path) -> None:
    ckpt = _copy_tiny(tiny_dir, tmp_path)
    _rewrite_weights(ckpt, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match="missing") as info:
        Phi3VForCausalLM.from_pretrained(ckpt)
    assert "lm_head.weight" in str(info.value)


def test_a_missing_vision_tensor_is_named_as_the_checkpoint_names_it(tiny_dir: Path, tmp_path: Path) -> None:
    ckpt = _copy_tiny(tiny_dir, tmp_path)
    _rewrite_weights(ckpt, lambda t: t.pop("model.vision_embed_tokens.glb_GN"))
    with pytest.raises(CheckpointError, match="missing from the checkpoint") as info:
        Phi3VForCausalLM.from_pretrained(ckpt)
    assert "model.vision_embed_tokens.glb_GN" in str(info.value)


def test_an_extra_tensor_is_a_checkpoint_error_naming_it(tiny_dir: Path, tmp_path: Path) -> None:
    ckpt = _copy_tiny(tiny_dir, tmp_path)
    _rewrite_weights(ckpt, lambda t: t.update({"model.extra.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=re.escape("model.extra.weight")):
        Phi3VForCausalLM.from_pretrained(ckpt)


def test_a_wrongly_shaped_tensor_is_a_checkpoint_error_naming_it_and_both_shapes(
    tiny_dir: Path, tmp_path: Path
) -> None:
    ckpt = _copy_tiny(tiny_dir, tmp_path)
    _rewrite_weights(ckpt, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(CheckpointError) as info:
        Phi3VForCausalLM.from_pretrained(ckpt)
    message = str(info.value)
    assert "model.norm.weight" in message
    assert "(65,)" in message
    assert "(64,)" in message


def test_an_embedding_alias_equal_to_embed_tokens_loads(
    tiny_dir: Path, tmp_path: Path, tiny_model: Phi3VForCausalLM
) -> None:
    ckpt = _copy_tiny(tiny_dir, tmp_path)
    _rewrite_weights(ckpt, lambda t: t.update({EMBEDDING_ALIAS: t["model.embed_tokens.weight"].clone()}))
    model = Phi3VForCausalLM.from_pretrained(ckpt)
    assert torch.equal(
        model.language_model.model.embed_tokens.weight, tiny_model.language_model.model.embed_tokens.weight
    )
    assert EMBEDDING_ALIAS == "model.vision_embed_tokens.wte.weight"


def test_an_embedding_alias_that_differs_from_embed_tokens_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    ckpt = _copy_tiny(tiny_dir, tmp_path)

    def add_differing_alias(tensors: dict[str, torch.Tensor]) -> None:
        alias = tensors["model.embed_tokens.weight"].clone()
        alias[5, 0] += 1.0
        tensors[EMBEDDING_ALIAS] = alias

    _rewrite_weights(ckpt, add_differing_alias)
    with pytest.raises(CheckpointError, match=re.escape(EMBEDDING_ALIAS)):
        Phi3VForCausalLM.from_pretrained(ckpt)


# ---------------------------------------------------------------------------------------------------------------------
# Sharded checkpoints


def _shard(ckpt: Path) -> dict[str, str]:
    """Split model.safetensors into two shards with an official-format index; returns the weight map."""
    tensors = load_file(ckpt / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map: dict[str, str] = {}
    for file, part in zip(files, (names[:half], names[half:]), strict=True):
        save_file({n: tensors[n] for n in part}, os.fspath(ckpt / file), {"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (ckpt / "model.safetensors").unlink()
    return weight_map


def test_a_sharded_checkpoint_gives_the_same_logits_as_the_single_file(
    tiny_dir: Path, tmp_path: Path, reference_logits: torch.Tensor, image_inputs: Any
) -> None:
    ckpt = _copy_tiny(tiny_dir, tmp_path)
    _shard(ckpt)
    assert [f.name for f in weight_files(ckpt)] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    sharded = Phi3VForCausalLM.from_pretrained(ckpt)
    assert torch.equal(_logits(sharded, image_inputs), reference_logits)


def test_an_index_naming_a_missing_shard_is_a_checkpoint_error_naming_the_file(tiny_dir: Path, tmp_path: Path) -> None:
    ckpt = _copy_tiny(tiny_dir, tmp_path)
    _shard(ckpt)
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        Phi3VForCausalLM.from_pretrained(ckpt)


def test_an_unreadable_index_is_a_checkpoint_error(tiny_dir: Path, tmp_path: Path) -> None:
    ckpt = _copy_tiny(tiny_dir, tmp_path)
    _shard(ckpt)
    (ckpt / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        Phi3VForCausalLM.from_pretrained(ckpt)


# ---------------------------------------------------------------------------------------------------------------------
# No remote code, ever


def test_checkpoint_code_named_by_auto_map_never_runs(
    tiny_dir: Path,
    tmp_path: Path,
    reference_logits: torch.Tensor,
    image_inputs: Any,
    tiny_processor: Phi3VProcessor,
) -> None:
    ckpt = _copy_tiny(tiny_dir, tmp_path)
    marker = tmp_path / "remote-code-ran"
    payload = f"from pathlib import Path\nPath({os.fspath(marker)!r}).write_text(__name__)\n"
    modules = ["modeling_phi3_v", "configuration_phi3_v", "processing_phi3_v", "image_processing_phi3_v"]
    for module in modules:
        (ckpt / f"{module}.py").write_text(payload)
    _edit_config(
        ckpt,
        auto_map={
            "AutoConfig": "configuration_phi3_v.Phi3VConfig",
            "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM",
        },
    )
    preprocessor = json.loads((ckpt / "preprocessor_config.json").read_text())
    preprocessor["auto_map"] = {
        "AutoProcessor": "processing_phi3_v.Phi3VProcessor",
        "AutoImageProcessor": "image_processing_phi3_v.Phi3VImageProcessor",
    }
    (ckpt / "preprocessor_config.json").write_text(json.dumps(preprocessor))

    models = [Phi3VForCausalLM.from_pretrained(ckpt), Phi3VForCausalLM.from_pretrained(ckpt, trust_remote_code=True)]
    processors = [Phi3VProcessor.from_pretrained(ckpt), Phi3VProcessor.from_pretrained(ckpt, trust_remote_code=True)]

    assert not marker.exists()
    assert not any(module in sys.modules for module in modules)
    runpy.run_path(os.fspath(ckpt / "modeling_phi3_v.py"))  # the trap works: running the file leaves the marker
    assert marker.read_text() == "<run_path>"
    for model in models:
        assert type(model) is Phi3VForCausalLM
        assert torch.equal(_logits(model, image_inputs), reference_logits)
    for processor in processors:
        assert type(processor) is Phi3VProcessor
        assert processor.num_crops == tiny_processor.num_crops
        prompt = "<|user|>\nhi<|end|>\n"
        assert torch.equal(processor(prompt)["input_ids"], tiny_processor(prompt)["input_ids"])


def test_the_official_flash_attention_entry_in_config_json_is_ignored_on_cpu(tiny_dir: Path, tmp_path: Path) -> None:
    # SPEC section 1: both official configs hard-code "_attn_implementation": "flash_attention_2".
    ckpt = _copy_tiny(tiny_dir, tmp_path)
    _edit_config(ckpt, _attn_implementation="flash_attention_2", transformers_version="4.38.1")
    model = Phi3VForCausalLM.from_pretrained(ckpt)
    assert model.attn_implementation == "sdpa"


# ---------------------------------------------------------------------------------------------------------------------
# Corrupt, incomplete or unsupported checkpoints


def test_a_directory_without_config_json_is_a_checkpoint_error(tiny_dir: Path, tmp_path: Path) -> None:
    ckpt = _copy_tiny(tiny_dir, tmp_path)
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        Phi3VForCausalLM.from_pretrained(ckpt)
    with pytest.raises(CheckpointError, match="config.json"):
        Phi3VProcessor.from_pretrained(ckpt)


def test_a_config_json_that_is_not_json_is_a_checkpoint_error(tiny_dir: Path, tmp_path: Path) -> None:
    ckpt = _copy_tiny(tiny_dir, tmp_path)
    (ckpt / "config.json").write_text("{'model_type': phi3_v")
    with pytest.raises(CheckpointError, match="config.json"):
        Phi3VForCausalLM.from_pretrained(ckpt)


@pytest.mark.parametrize(
    "content", [b"this is not a safetensors file", b"", b"truncate"], ids=["garbage", "empty", "cut"]
)
def test_a_corrupt_model_safetensors_is_a_checkpoint_error(content: bytes, tiny_dir: Path, tmp_path: Path) -> None:
    ckpt = _copy_tiny(tiny_dir, tmp_path)
    weights = ckpt / "model.safetensors"
    if content == b"truncate":
        content = weights.read_bytes()[: weights.stat().st_size // 2]
    weights.write_bytes(content)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Phi3VForCausalLM.from_pretrained(ckpt)


def test_a_checkpoint_without_weight_files_is_a_checkpoint_error(tiny_dir: Path, tmp_path: Path) -> None:
    ckpt = _copy_tiny(tiny_dir, tmp_path)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Phi3VForCausalLM.from_pretrained(ckpt)


@pytest.mark.parametrize("path", ["/nonexistent/dir", "./missing", "missing", "~/no/such/phi3v"])
def test_a_nonexistent_local_path_is_model_not_found_pointing_at_phi3v_model(path: str) -> None:
    with pytest.raises(ModelNotFoundError, match="PHI3V_MODEL"):
        Phi3VForCausalLM.from_pretrained(path)
    with pytest.raises(ModelNotFoundError, match="PHI3V_MODEL"):
        Phi3VProcessor.from_pretrained(path)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"model_type": "llama"}, "model_type"),
        (
            {
                "embd_layer": {
                    "embedding_cls": "image",
                    "hd_transform_order": "glb_sub",
                    "projection_cls": "mlp",
                    "use_hd_transform": True,
                    "with_learnable_separator": True,
                }
            },
            "embd_layer.hd_transform_order",
        ),
        ({"rope_scaling": {"type": "yarn", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8}}, "rope_scaling"),
    ],
    ids=["model_type", "hd_transform_order", "rope_type"],
)
def test_an_unsupported_config_is_a_checkpoint_error_naming_the_field(
    changes: dict[str, Any], field: str, tiny_dir: Path, tmp_path: Path
) -> None:
    ckpt = _copy_tiny(tiny_dir, tmp_path)
    _edit_config(ckpt, **changes)
    with pytest.raises(CheckpointError, match=re.escape(field)):
        Phi3VForCausalLM.from_pretrained(ckpt)


# ---------------------------------------------------------------------------------------------------------------------
# Hub ids while offline


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Any]:
    """Offline hub with an empty cache under tmp_path, and every socket connection refused (and recorded)."""
    import huggingface_hub.constants

    # huggingface_hub 2.x reads HF_HUB_OFFLINE / HF_HOME into constants at import time, so setting the variables
    # now has no effect on it by itself: patch the constants it consults at call time as well.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", os.fspath(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", os.fspath(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", os.fspath(tmp_path / "hf" / "hub"))
    attempts: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        attempts.append(args)
        raise OSError("network access is blocked in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def test_a_hub_id_offline_without_a_cached_copy_is_model_not_found_pointing_at_phi3v_model(
    no_network: list[Any], tmp_path: Path
) -> None:
    with pytest.raises(ModelNotFoundError, match="PHI3V_MODEL") as info:
        Phi3VForCausalLM.from_pretrained("microsoft/Phi-3-vision-128k-instruct")
    assert "microsoft/Phi-3-vision-128k-instruct" in str(info.value)
    with pytest.raises(ModelNotFoundError, match="PHI3V_MODEL"):
        Phi3VProcessor.from_pretrained("microsoft/Phi-3-vision-128k-instruct")
    assert no_network == []  # offline mode was honoured: not even a connection attempt


# ---------------------------------------------------------------------------------------------------------------------
# Device, dtype and attention choices


def test_choose_device_defaults_to_cpu_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device(None) == torch.device("cpu")
    assert choose_device("auto") == torch.device("cpu")


def test_choose_device_takes_one_device_as_a_string_a_dict_or_an_index() -> None:
    assert choose_device("cpu") == torch.device("cpu")
    assert choose_device({"": "cpu"}) == torch.device("cpu")
    assert choose_device(device_map="cuda:0", device="cpu") == torch.device("cpu")  # device wins
    assert choose_device(1) == torch.device("cuda", 1)


def test_choose_device_refuses_a_device_map_over_several_devices() -> None:
    with pytest.raises(ValueError, match="one device"):
        choose_device({"vision_tower": "cuda:0", "language_model": "cuda:1"})


def test_choose_dtype_defaults_to_fp32_on_cpu_and_bf16_on_cuda(tiny_dir: Path) -> None:
    config = Phi3VConfig.from_json_file(tiny_dir / "config.json")
    assert choose_dtype(None, torch.device("cpu"), config) == torch.float32
    assert choose_dtype(None, torch.device("cuda", 0), config) == torch.bfloat16


def test_choose_dtype_auto_is_the_checkpoints_own_dtype(tiny_dir: Path) -> None:
    raw = json.loads((tiny_dir / "config.json").read_text())
    assert choose_dtype("auto", torch.device("cpu"), Phi3VConfig.from_dict(raw)) == torch.float32
    official_like = Phi3VConfig.from_dict({**raw, "torch_dtype": "bfloat16"})  # as in both official configs
    assert choose_dtype("auto", torch.device("cpu"), official_like) == torch.bfloat16
    assert choose_dtype("auto", torch.device("cuda", 0), official_like) == torch.bfloat16


def test_choose_dtype_auto_reads_bf16_from_the_official_config(reference_dir: Path) -> None:
    official = Phi3VConfig.from_json_file(reference_dir / "phi-3-vision-128k-instruct" / "config.json")
    assert choose_dtype("auto", torch.device("cpu"), official) == torch.bfloat16


def test_choose_dtype_accepts_names_and_dtypes_and_refuses_anything_else(tiny_dir: Path) -> None:
    config = Phi3VConfig.from_json_file(tiny_dir / "config.json")
    cpu = torch.device("cpu")
    assert choose_dtype("bfloat16", cpu, config) == torch.bfloat16
    assert choose_dtype("float16", cpu, config) == torch.float16
    assert choose_dtype(torch.bfloat16, cpu, config) == torch.bfloat16
    for bad in ["garbage", "Tensor", "", 16]:
        with pytest.raises(ValueError):
            choose_dtype(bad, cpu, config)


def test_choose_attn_implementation_is_sdpa_on_cpu_and_refuses_flash_and_unknown_names() -> None:
    cpu = torch.device("cpu")
    assert choose_attn_implementation(None, cpu) == "sdpa"
    assert choose_attn_implementation("eager", cpu) == "eager"
    assert choose_attn_implementation("sdpa", cpu) == "sdpa"
    with pytest.raises(ValueError, match="CUDA"):
        choose_attn_implementation("flash_attention_2", cpu)
    with pytest.raises(ValueError, match="bogus"):
        choose_attn_implementation("bogus", cpu)


def test_loading_in_bf16_gives_bf16_parameters_fp32_rotary_buffers_and_finite_logits(
    tiny_dir: Path, image_inputs: Any
) -> None:
    model = Phi3VForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.dtype == torch.bfloat16
    rotary = {name: buf for name, buf in model.named_buffers() if "inv_freq" in name}
    assert rotary
    assert {buf.dtype for buf in rotary.values()} == {torch.float32}
    logits = _logits(model, image_inputs)
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(logits).all()


def test_eager_attention_matches_sdpa(tiny_dir: Path, reference_logits: torch.Tensor, image_inputs: Any) -> None:
    eager = Phi3VForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager")
    assert eager.attn_implementation == "eager"
    torch.testing.assert_close(_logits(eager, image_inputs), reference_logits, atol=1e-5, rtol=0)


def test_a_loaded_model_moves_to_cpu_and_still_runs(
    tiny_dir: Path, reference_logits: torch.Tensor, image_inputs: Any
) -> None:
    model = Phi3VForCausalLM.from_pretrained(tiny_dir)
    moved = model.to("cpu")
    assert moved is model
    assert model.device == torch.device("cpu")
    assert {buf.dtype for name, buf in model.named_buffers() if "inv_freq" in name} == {torch.float32}
    assert torch.equal(_logits(model, image_inputs), reference_logits)


def test_from_pretrained_accepts_the_seed_notebook_arguments(
    tiny_dir: Path, reference_logits: torch.Tensor, image_inputs: Any
) -> None:
    model = Phi3VForCausalLM.from_pretrained(
        tiny_dir, device_map="cpu", trust_remote_code=True, torch_dtype="auto", _attn_implementation="eager"
    )
    assert model.attn_implementation == "eager"
    assert model.dtype == torch.float32  # the tiny checkpoint's torch_dtype
    assert model.device == torch.device("cpu")
    torch.testing.assert_close(_logits(model, image_inputs), reference_logits, atol=1e-5, rtol=0)


def test_from_pretrained_refuses_unknown_arguments(tiny_dir: Path) -> None:
    with pytest.raises(TypeError, match="load_in_8bit"):
        Phi3VForCausalLM.from_pretrained(tiny_dir, load_in_8bit=True)


def test_a_misspelt_model_name_suggests_the_known_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from phi3v_tools.errors import ModelNotFoundError
    from phi3v_tools.model.checkpoint import resolve_checkpoint
    from phi3v_tools.model.names import did_you_mean

    monkeypatch.chdir(tmp_path)  # no directory called tiyn here
    with pytest.raises(ModelNotFoundError, match="Did you mean 'tiny'\\?"):
        resolve_checkpoint("tiyn")
    assert did_you_mean("microsoft/phi-3.5-vison-instruct") == " Did you mean 'microsoft/Phi-3.5-vision-instruct'?"
    assert did_you_mean("gpt2") == "" and did_you_mean("tiny") == ""


def test_a_device_this_pytorch_cannot_use_is_one_clear_error_before_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    from phi3v_tools.errors import DeviceError
    from phi3v_tools.model.checkpoint import check_device

    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(DeviceError, match=r"built without CUDA; install a CUDA build of PyTorch .*PHI3V_DEVICE=cpu"):
        check_device(torch.device("cuda"))
    monkeypatch.setattr(torch.version, "cuda", "12.8")  # a CUDA build, on a machine without a visible GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="sees no CUDA GPU"):
        check_device(torch.device("cuda:0"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(DeviceError, match=r"sees 2 CUDA GPUs \(cuda:0 to cuda:1\)"):
        check_device(torch.device("cuda:2"))
    check_device(torch.device("cuda:1"))
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="'mps'"):
        check_device(torch.device("mps"))
    check_device(torch.device("cpu"))
    with pytest.raises(DeviceError, match="flash_attention_2 runs on CUDA only"):
        choose_attn_implementation("flash_attention_2", torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where CUDA cannot be used")
@pytest.mark.parametrize("command", [["-m", "phi3v_tools.cli", "describe", "x.png"], ["-m", "phi3v_mcp"]])
def test_asking_for_cuda_without_it_is_one_line_and_exit_1_not_a_traceback(
    command: list[str], tiny_dir: Path, tmp_path: Path
) -> None:
    from PIL import Image

    Image.new("RGB", (32, 32), "white").save(tmp_path / "x.png")
    env = {**os.environ, "PHI3V_MODEL": str(tiny_dir), "PHI3V_DEVICE": "cuda", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "device 'cuda' was asked for" in lines[0], done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_a_sharded_checkpoint_is_read_one_shard_at_a_time_into_the_same_model(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quantization: str | None
) -> None:
    """A laptop loading the real model (two shards of 5 and 3.4 GB) holds the model and one shard's pages."""
    from phi3v_tools.model import checkpoint as loading

    tensors = load_file(tiny_dir / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, tmp_path / file, {"format": "pt"})
    weight_map = {n: file for file, part in shards.items() for n in part}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}), encoding="utf-8")
    for other in tiny_dir.iterdir():
        if other.name != "model.safetensors":
            shutil.copy(other, tmp_path / other.name)

    real_open, open_now, most = loading._open, [0], [0]

    class Counted:
        def __init__(self, file: Path) -> None:
            self.handle = real_open(file)

        def __enter__(self) -> Any:
            open_now[0] += 1
            most[0] = max(most[0], open_now[0])
            return self.handle.__enter__()

        def __exit__(self, *exc: object) -> None:
            open_now[0] -= 1
            self.handle.__exit__(*exc)

    monkeypatch.setattr(loading, "_open", Counted)
    sharded = Phi3VForCausalLM.from_pretrained(tmp_path, quantization=quantization)
    single = Phi3VForCausalLM.from_pretrained(tiny_dir, quantization=quantization)
    assert most[0] == 1
    ids = torch.randint(100, 30000, (1, 16))
    with torch.inference_mode():
        assert torch.equal(sharded(input_ids=ids).logits, single(input_ids=ids).logits)
