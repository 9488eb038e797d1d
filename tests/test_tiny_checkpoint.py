"""The package's tiny random checkpoint has the official layout: files, config keys, weight names, special tokens
and chat template; it is reproducible from its seed, cached once, and reachable from the CLI."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import jinja2
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

import phi3v_tools.cli
from phi3v_tools.model import Phi3VForCausalLM, Phi3VProcessor, make_tiny_checkpoint
from phi3v_tools.model.checkpoint import build_empty_model, clip_prefix, map_checkpoint_name, plan_loading
from phi3v_tools.model.config import Phi3VConfig
from phi3v_tools.model.tiny import ensure_tiny_checkpoint, official_weight_names

CHECKPOINT_FILES = {
    "config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "model.safetensors",
}
# The keys of Phi-3-vision-128k-instruct's config.json (SPEC section 1), for machines without the reference data.
OFFICIAL_CONFIG_KEYS = {
    "_attn_implementation",
    "_name_or_path",
    "architectures",
    "attention_dropout",
    "auto_map",
    "bos_token_id",
    "embd_layer",
    "eos_token_id",
    "hidden_act",
    "hidden_size",
    "img_processor",
    "initializer_range",
    "intermediate_size",
    "max_position_embeddings",
    "model_type",
    "num_attention_heads",
    "num_hidden_layers",
    "num_key_value_heads",
    "original_max_position_embeddings",
    "rms_norm_eps",
    "rope_scaling",
    "rope_theta",
    "sliding_window",
    "tie_word_embeddings",
    "torch_dtype",
    "transformers_version",
    "use_cache",
    "vocab_size",
}
# Official keys the tiny config leaves out: the remote-code pointer and two keys that only record how the
# original was saved (the loader ignores both; see test_checkpoint's flash-attention test).
OMITTED_CONFIG_KEYS = {"auto_map", "_attn_implementation", "transformers_version"}
OFFICIAL_SPECIAL_IDS = {
    "<unk>": 0,
    "<s>": 1,
    "</s>": 2,
    "<|endoftext|>": 32000,
    "<|assistant|>": 32001,
    "<|system|>": 32006,
    "<|end|>": 32007,
    "<|user|>": 32010,
    "<|image|>": 32044,
}
CHAT_CASES = [
    [{"role": "user", "content": "<|image_1|>\nWhat is shown in this image?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "<|image_1|>\n<|image_2|>\nWhat differs?"},
        {"role": "assistant", "content": "The ball."},
        {"role": "user", "content": "Where is it?"},
    ],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! {braces} and\nnewlines"}],
]


def _weight_names(directory: Path) -> list[str]:
    with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
        return list(handle.keys())


def _layer_pattern(name: str) -> str:
    return re.sub(r"\.layers\.\d+\.", ".layers.N.", name)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No PHI3V_* settings from the environment leak into CLI runs; the tiny cache goes to tmp_path."""
    for name in list(os.environ):
        if name.startswith("PHI3V_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PHI3V_CACHE_DIR", str(tmp_path / "cache"))


# ---------------------------------------------------------------------------------------------------------------------
# Layout


def test_make_tiny_checkpoint_writes_the_official_file_set(tiny_dir: Path) -> None:
    assert {p.name for p in tiny_dir.iterdir()} == CHECKPOINT_FILES
    for name in CHECKPOINT_FILES - {"model.safetensors"}:
        json.loads((tiny_dir / name).read_text())  # every JSON file parses


def test_tiny_config_has_the_official_keys_but_no_auto_map(tiny_dir: Path) -> None:
    raw = json.loads((tiny_dir / "config.json").read_text())
    assert "auto_map" not in raw
    assert set(raw) == OFFICIAL_CONFIG_KEYS - OMITTED_CONFIG_KEYS
    assert raw["model_type"] == "phi3_v"
    assert raw["architectures"] == ["Phi3VForCausalLM"]
    assert raw["rope_scaling"]["type"] == "su"
    assert raw["embd_layer"]["hd_transform_order"] == "sub_glb"


def test_the_hard_coded_official_keys_are_those_of_the_reference_configs(reference_dir: Path) -> None:
    for checkpoint in ["phi-3-vision-128k-instruct", "tiny-random"]:
        assert set(json.loads((reference_dir / checkpoint / "config.json").read_text())) == OFFICIAL_CONFIG_KEYS


def test_tiny_weight_names_are_the_official_names_of_its_config(tiny_dir: Path) -> None:
    names = _weight_names(tiny_dir)
    config = Phi3VConfig.from_json_file(tiny_dir / "config.json")
    expected = official_weight_names(config)
    assert set(names) == set(expected)
    with safe_open(str(tiny_dir / "model.safetensors"), framework="pt") as handle:
        assert {n: tuple(handle.get_slice(n).get_shape()) for n in names} == expected

    model = build_empty_model(config)
    params = {n for n, _ in model.named_parameters()}
    clip = clip_prefix(model)
    assert all(map_checkpoint_name(n, clip) is not None for n in names)
    mapping, skipped, unexpected, missing = plan_loading(names, model)
    assert (unexpected, missing) == ([], [])
    assert set(mapping.values()) == params
    # 2 CLIP layers, layer_idx -2: the last one is stored (as officially) but never built
    assert skipped and all(".encoder.layers.1." in n for n in skipped)
    assert "model.vision_embed_tokens.wte.weight" not in names


def test_tiny_weight_names_have_the_structure_of_the_official_index(tiny_dir: Path, reference_dir: Path) -> None:
    index = json.loads((reference_dir / "phi-3-vision-128k-instruct" / "model.safetensors.index.json").read_text())
    official = {_layer_pattern(n) for n in index["weight_map"]}
    tiny = {_layer_pattern(n) for n in _weight_names(tiny_dir)}
    assert tiny == official
    assert "model.layers.N.self_attn.qkv_proj.weight" in tiny
    assert "model.vision_embed_tokens.img_processor.vision_model.encoder.layers.N.mlp.fc1.weight" in tiny


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer


def test_tiny_tokenizer_has_the_official_special_tokens_at_the_official_ids(tiny_processor: Phi3VProcessor) -> None:
    tokenizer = tiny_processor.tokenizer
    for token, token_id in OFFICIAL_SPECIAL_IDS.items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id, token
        assert tokenizer.convert_ids_to_tokens(token_id) == token
    assert len(tokenizer) == 32045
    assert tokenizer.bos_token_id == 1
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 32000
    assert tokenizer.unk_token_id == 0
    # "<|assistant|>" eats the newline after it (rstrip), as in the official tokenizer
    assert tokenizer("<|assistant|>\n").input_ids == [1, 32001]


def test_tiny_tokenizer_added_tokens_and_special_tokens_map_equal_the_official(
    tiny_dir: Path, reference_dir: Path
) -> None:
    official = reference_dir / "phi-3-vision-128k-instruct"
    assert (
        json.loads((tiny_dir / "tokenizer.json").read_text())["added_tokens"]
        == json.loads((official / "tokenizer.json").read_text())["added_tokens"]
    )
    assert json.loads((tiny_dir / "special_tokens_map.json").read_text()) == json.loads(
        (official / "special_tokens_map.json").read_text()
    )


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CHAT_CASES, ids=["one-image", "multi-turn", "assistant-last"])
def test_tiny_chat_template_renders_like_the_official_template(
    messages: list[dict[str, str]],
    add_generation_prompt: bool,
    tiny_processor: Phi3VProcessor,
    reference_dir: Path,
) -> None:
    config = json.loads((reference_dir / "phi-3-vision-128k-instruct" / "tokenizer_config.json").read_text())
    official = jinja2.Template(config["chat_template"]).render(
        messages=messages, add_generation_prompt=add_generation_prompt
    )
    ours = tiny_processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert ours == official


def test_tiny_chat_template_renders_the_spec_example(tiny_processor: Phi3VProcessor) -> None:
    messages = [{"role": "user", "content": "<|image_1|>\nWhat is shown in this image?"}]
    expected = "<|user|>\n<|image_1|>\nWhat is shown in this image?<|end|>\n<|assistant|>\n"
    assert tiny_processor.apply_chat_template(messages) == expected
    assert tiny_processor.apply_chat_template(messages, add_generation_prompt=False) == expected.removesuffix(
        "<|assistant|>\n"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Reproducibility and caching


def test_the_same_seed_writes_identical_weights_and_another_seed_different_ones(tmp_path: Path) -> None:
    first = make_tiny_checkpoint(tmp_path / "a", seed=7)
    again = make_tiny_checkpoint(tmp_path / "b", seed=7)
    other = make_tiny_checkpoint(tmp_path / "c", seed=8)
    weights = [(d / "model.safetensors").read_bytes() for d in (first, again, other)]
    assert weights[0] == weights[1]
    assert weights[0] != weights[2]
    assert len(weights[0]) == len(weights[2])  # same names and shapes, other values
    assert (first / "config.json").read_bytes() == (other / "config.json").read_bytes()


def test_ensure_tiny_checkpoint_builds_once_and_reuses_it(tmp_path: Path) -> None:
    path = ensure_tiny_checkpoint(tmp_path)
    weights = path / "model.safetensors"
    assert path.parent == tmp_path
    assert weights.is_file()
    stamp = weights.stat().st_mtime_ns
    assert ensure_tiny_checkpoint(tmp_path) == path
    assert weights.stat().st_mtime_ns == stamp
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".tiny-")] == []  # no scratch left behind


def test_the_tiny_id_loads_offline_from_the_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model = Phi3VForCausalLM.from_pretrained("tiny", cache_dir=tmp_path)
    processor = Phi3VProcessor.from_pretrained("tiny", cache_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [ensure_tiny_checkpoint(tmp_path).name]
    inputs = processor("<|user|>\nhello<|end|>\n<|assistant|>\n")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], 32064)
    assert torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------------------------------
# CLI


def test_cli_make_tiny_checkpoint_writes_a_loadable_checkpoint(tmp_path: Path, clean_env: None) -> None:
    target = tmp_path / "tiny"
    result = CliRunner().invoke(phi3v_tools.cli.main, ["make-tiny-checkpoint", str(target)])
    assert result.exit_code == 0, result.output
    assert str(target) in result.output
    assert {p.name for p in target.iterdir()} == CHECKPOINT_FILES
    model = Phi3VForCausalLM.from_pretrained(target)
    assert model.language_model.config.hidden_size == 64


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_cli_help_lists_the_commands(flag: str) -> None:
    result = CliRunner().invoke(phi3v_tools.cli.main, [flag])
    assert result.exit_code == 0, result.output
    assert "demo" in result.output
    assert "make-tiny-checkpoint" in result.output


def test_cli_demo_runs_the_three_seed_tasks_and_the_table_on_a_tiny_checkpoint(tiny_dir: Path, clean_env: None) -> None:
    result = CliRunner().invoke(
        phi3v_tools.cli.main, ["demo", "--model", str(tiny_dir), "--max-new-tokens", "4", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    for task in ("stock chart", "book cover", "two photos", "sales table"):
        assert f"## {task}:" in result.output
    assert "## sales table: Can you convert the table to markdown format?" in result.output
    assert len(re.findall(r"\d+ new,", result.output)) == 4
    assert all(int(n) <= 4 for n in re.findall(r"(\d+) new,", result.output))


def test_cli_demo_reports_a_missing_model_as_a_usage_error(tmp_path: Path, clean_env: None) -> None:
    result = CliRunner().invoke(phi3v_tools.cli.main, ["demo", "--model", str(tmp_path / "missing" / "dir")])
    assert result.exit_code == 1
    assert "PHI3V_MODEL" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
