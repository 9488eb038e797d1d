"""Memory planning: what each mode takes, a load that cannot fit refused before it allocates, ``info --estimate``
and the KV budget from the memory that is free."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import phi3v_tools.cli
from phi3v_tools.errors import OutOfMemoryError
from phi3v_tools.model import Phi3VForCausalLM, checkpoint, memory
from phi3v_tools.model.config import Phi3VConfig

GB = 1e9


@pytest.fixture(scope="module")
def official(reference_dir: Path) -> Phi3VConfig:
    return Phi3VConfig.from_json_file(reference_dir / "phi-3-vision-128k-instruct" / "config.json")


def test_the_official_models_weights_and_kv_are_counted_from_its_config(official: Phi3VConfig) -> None:
    dense, int8, int4 = memory.plans(official, torch.bfloat16)
    assert (dense.mode, int8.mode, int4.mode) == ("bfloat16", "int8", "int4")
    assert 8.2 * GB < dense.weights < 8.35 * GB  # 4.1-4.2 billion parameters in bf16
    assert dense.kv_per_token == 2 * 32 * 32 * 96 * 2  # K and V, 32 layers, 32 heads of 96, bf16: 0.375 MiB
    assert dense.context_kv == dense.kv_per_token * 4096
    # The decoder linears (3.6 billion weights) at 1 byte and at half a byte, the rest (0.5 billion) in bf16.
    assert 4.5 * GB < int8.weights < 4.8 * GB
    assert 2.8 * GB < int4.weights < 3.1 * GB
    assert dense.to_run > 8 * GB > int8.to_run > int4.to_run  # an 8 GB card holds int8 and int4, not bf16


def test_a_mode_that_does_not_fit_is_refused_naming_the_least_quantized_mode_that_does(official: Phi3VConfig) -> None:
    cpu = torch.device("cpu")
    with pytest.raises(OutOfMemoryError, match=r"bfloat16 needs about 10\.4 GB.* PHI3V_QUANTIZATION=int8 needs about"):
        memory.check_fits(official, cpu, torch.bfloat16, None, available=int(7.5 * GB))
    with pytest.raises(OutOfMemoryError, match="PHI3V_QUANTIZATION=int4"):
        memory.check_fits(official, cpu, torch.bfloat16, "int8", available=int(6 * GB))
    with pytest.raises(OutOfMemoryError, match="The smallest mode, int4, needs about 5.2 GB"):
        memory.check_fits(official, cpu, torch.bfloat16, None, available=int(3 * GB))
    assert memory.check_fits(official, cpu, torch.bfloat16, "int8", available=int(7.5 * GB)).mode == "int8"


def test_a_load_that_cannot_fit_fails_before_it_reads_a_weight(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def read(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights were read")

    monkeypatch.setattr(memory, "available_bytes", lambda device: 1000)
    monkeypatch.setattr(checkpoint, "load_weights", read)
    with pytest.raises(OutOfMemoryError, match="does not fit.*this machine's available memory is 0.0 GB"):
        Phi3VForCausalLM.from_pretrained(tiny_dir, quantization="int8")


def test_info_estimate_shows_every_mode_without_loading_any_weight(reference_dir: Path) -> None:
    folder = reference_dir / "phi-3-vision-128k-instruct"  # configs and tokenizer only: no safetensors to load
    assert not list(folder.glob("*.safetensors"))
    args = ["info", "--estimate", "--json", "--model", str(folder), "--device", "cpu"]
    result = CliRunner().invoke(phi3v_tools.cli.main, args, env={"PHI3V_DTYPE": "bfloat16"})
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [m["mode"] for m in report["modes"]] == ["bfloat16", "int8", "int4"]
    assert report["num_crops"] == 16 and report["device"] == "cpu"  # the checkpoint's own crops
    assert report["modes"][0]["weights_gb"] == pytest.approx(8.27, abs=0.05)
    assert all(isinstance(m["fits"], bool) for m in report["modes"])
    text = CliRunner().invoke(phi3v_tools.cli.main, args[:-5] + args[-4:], env={"PHI3V_DTYPE": "bfloat16"})
    assert text.exit_code == 0, text.output
    assert "int4" in text.output and "KV/token" in text.output


def test_the_cpu_kv_budget_is_a_share_of_the_available_memory_at_most_the_fixed_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from phi3v_tools.engine import model_runner, scheduler

    monkeypatch.setattr(memory, "available_bytes", lambda device: 2**30)
    assert model_runner.kv_memory_bytes(torch.device("cpu")) == int(2**30 * scheduler.KV_GPU_FRACTION)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 64 * 2**30)
    assert model_runner.kv_memory_bytes(torch.device("cpu")) == scheduler.KV_HOST_BYTES
    monkeypatch.setattr(memory, "available_bytes", lambda device: None)
    assert model_runner.kv_memory_bytes(torch.device("mps")) == scheduler.KV_HOST_BYTES


def test_mps_defaults_to_float16_and_cuda_to_bfloat16_and_the_cpu_to_float32(official: Phi3VConfig) -> None:
    assert checkpoint.choose_dtype(None, torch.device("mps"), official) == torch.float16  # the untested Mac path
    assert checkpoint.choose_dtype(None, torch.device("cuda"), official) == torch.bfloat16
    assert checkpoint.choose_dtype(None, torch.device("cpu"), official) == torch.float32


def test_the_cpu_thread_count_is_a_checked_setting_the_engine_applies_when_it_loads(tiny_dir: Path) -> None:
    from phi3v_tools.engine.core import Engine
    from phi3v_tools.settings import Settings

    with pytest.raises(ValueError, match="PHI3V_CPU_THREADS"):
        Settings.from_env({"PHI3V_CPU_THREADS": "0"})
    before = torch.get_num_threads()
    target = 2 if before == 1 else 1
    try:
        engine = Engine.load(Settings(model=str(tiny_dir), cpu_threads=target), progress=False, warm_up=False)
        engine.close()
        assert torch.get_num_threads() == target
    finally:
        torch.set_num_threads(before)


def test_on_a_gpu_the_feature_cache_takes_at_most_a_quarter_of_the_memory_left_after_loading() -> None:
    from phi3v_tools.engine.core import default_feature_cache_mb

    assert default_feature_cache_mb("cpu", None) == 512
    assert default_feature_cache_mb("cuda", 80 * 2**30) == 2048  # a large card: the 2 GB cap
    assert default_feature_cache_mb("cuda", int(2.9 * 2**30)) == int(2.9 * 1024 / 4)  # an 8 GB card with int8
    assert default_feature_cache_mb("cuda", None) == 0
