"""Weight-only int8 / int4 quantization of the language model (``PHI3V_QUANTIZATION``), on the tiny checkpoint.

Random tiny weights say nothing about quality with real weights; these tests check the arithmetic, the layouts,
the memory and that every tool runs, and they measure how far a quantized tiny model strays from the dense one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from phi3v_tools.images import ImagePolicy
from phi3v_tools.model import Phi3VForCausalLM
from phi3v_tools.model.quantize import PACKED_ROWS, QuantizedLinear, quantizable, quantized_bytes
from phi3v_tools.runner import Runner, get_runner
from phi3v_tools.settings import Settings
from phi3v_tools.tools import Toolbox

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU, ELSEWHERE = torch.device("cpu"), torch.device("cuda")  # ELSEWHERE: the layout for a device without packed path
SCHEMA = {"type": "object", "properties": {"count": {"type": "integer"}}, "required": ["count"]}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def quantized_layer(mode: str, device: torch.device, out_features: int = 256, in_features: int = 384) -> tuple:
    torch.manual_seed(0)
    dense = torch.nn.Linear(in_features, out_features, bias=True)
    layer = QuantizedLinear(in_features, out_features, mode, True, torch.float32, device)
    for name, value in layer.quantized(dense.weight.detach(), dense.bias.detach()).items():
        setattr(layer, name, value)
    return dense, layer


@pytest.mark.parametrize(("mode", "bound"), [("int8", 0.01), ("int4", 0.12)])
@pytest.mark.parametrize("device", [CPU, ELSEWHERE], ids=["cpu-layout", "plain-layout"])
def test_a_quantized_weight_stands_for_the_dense_one_within_its_rounding(
    mode: str, bound: float, device: torch.device
) -> None:
    dense, layer = quantized_layer(mode, device)
    error = relative_error(layer.dequantized(torch.float32), dense.weight)
    assert 0 < error < bound  # rounding happened, and no more than the mode's step allows


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("device", [CPU, ELSEWHERE], ids=["cpu-layout", "plain-layout"])
@pytest.mark.parametrize("rows", [1, PACKED_ROWS + 1, 300])
def test_every_path_multiplies_by_the_weight_it_stands_for(mode: str, device: torch.device, rows: int) -> None:
    """The packed kernels (a few rows on the CPU, int4 always on the CPU) and the dequantize-then-GEMM path give
    what the dequantized weight gives, to bf16 rounding of the activations."""
    dense, layer = quantized_layer(mode, device)
    x = torch.randn(rows, dense.in_features)
    with torch.inference_mode():
        expected = torch.nn.functional.linear(x, layer.dequantized(torch.float32), dense.bias)
        got = layer(x.view(1, rows, -1)).view(rows, -1)
    assert got.dtype == torch.float32
    assert relative_error(got, expected) < 0.01


def test_int4_refuses_a_layer_it_cannot_pack_with_a_clear_error() -> None:
    from phi3v_tools.errors import DeviceError

    with pytest.raises(DeviceError, match="multiple of 16 outputs"):
        QuantizedLinear(64, 40, "int4", False, torch.float32, CPU)
    with pytest.raises(DeviceError, match="groups of 32"):
        QuantizedLinear(48, 64, "int4", False, torch.float32, CPU)


@pytest.fixture(scope="module")
def quantized(tiny_dir: Path) -> Iterator[dict[str, Phi3VForCausalLM]]:
    yield {mode: Phi3VForCausalLM.from_pretrained(tiny_dir, quantization=mode) for mode in ("int8", "int4")}


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_loading_quantizes_the_decoder_linears_only_and_they_take_the_modes_bytes(
    mode: str, quantized: dict[str, Phi3VForCausalLM], tiny_model: Phi3VForCausalLM
) -> None:
    model = quantized[mode]
    dense = quantizable(tiny_model)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert set(layers) == set(dense) and len(layers) == 4 * tiny_model.config.text_config.num_hidden_layers
    assert all(m.mode == mode for m in layers.values())
    assert model.language_model.lm_head.weight.dtype == torch.float32  # kept dense
    assert all(p.dtype == torch.float32 for p in model.vision_tower.parameters())
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    held = sum(b.numel() * b.element_size() for m in layers.values() for b in m.buffers())
    shapes = [(m.out_features, m.in_features) for m in dense.values()]
    scale_bytes = 4 if mode == "int8" else 2  # int8's scales in the model's dtype, the CPU int4 layout's in bf16
    assert held == quantized_bytes(shapes, mode, 4, scale_bytes)
    fp32 = quantized_bytes(shapes, None, 4)
    assert held < fp32 / (3 if mode == "int8" else 6)  # about 1/4 and 1/8 of fp32 (scales cost more on tiny layers)


@pytest.mark.parametrize(("mode", "bound", "agreeing"), [("int8", 0.01, 0.97), ("int4", 0.1, 0.75)])
def test_a_quantized_model_stays_near_the_dense_one(
    mode: str, bound: float, agreeing: float, quantized: dict[str, Phi3VForCausalLM], tiny_model: Phi3VForCausalLM
) -> None:
    """Logit error and greedy-token agreement against the unquantized tiny model, at prefill and at decode
    (measured: int8 0.4 % and 100 %, int4 5.8 % and 91 %; benchmarks/quantization_cpu.py)."""
    torch.manual_seed(1)
    ids = torch.randint(100, 30000, (1, PACKED_ROWS + 32))
    with torch.inference_mode():
        dense = tiny_model(input_ids=ids).logits
        ours = quantized[mode](input_ids=ids).logits  # more rows than PACKED_ROWS: the prefill path
        dense_one = tiny_model(input_ids=ids[:, :1]).logits
        ours_one = quantized[mode](input_ids=ids[:, :1]).logits  # 1 row: the decode path
    assert relative_error(ours, dense) < bound
    assert relative_error(ours_one, dense_one) < 1.5 * bound  # one position varies more than 160 do
    agreement = float((ours.argmax(-1) == dense.argmax(-1)).float().mean())
    assert agreement > agreeing


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_every_tool_runs_on_a_quantized_engine(mode: str, tiny_dir: Path, sample_images: dict[str, Path]) -> None:
    runner = get_runner(Settings(model=str(tiny_dir), quantization=mode, batch_window_ms=1))
    tools = Toolbox(runner, ImagePolicy(allowed_dirs=(sample_images["chart"].parent,)))
    chart, cover, a, b = (str(sample_images[n]) for n in ("chart", "cover", "scene_a", "scene_b"))
    assert runner.info()["quantization"] == mode
    assert tools.describe_image(chart, detail="brief").description
    assert list(tools.read_text(cover, fields=["title", "author"]).fields) == ["title", "author"]
    assert tools.compare_images([a, b]).summary is not None
    assert set(tools.ask_images(chart, "How many bars?", SCHEMA).answer) == {"count"}
    assert tools.read_table(str(sample_images["table"])).call.completion_tokens > 0


def test_a_quantized_engine_is_a_model_of_its_own_not_the_dense_ones(tiny_dir: Path) -> None:
    dense = get_runner(Settings(model=str(tiny_dir)))
    int8 = get_runner(Settings(model=str(tiny_dir), quantization="int8"))
    assert int8 is not dense and get_runner(Settings(model=str(tiny_dir), quantization="int8")) is int8
    assert (dense.info()["quantization"], int8.info()["quantization"]) == (None, "int8")
    assert dense.model_id != int8.model_id  # their image features are cached apart


def test_an_engine_reports_what_its_model_holds_also_when_it_was_quantized_in_memory(
    tiny_dir: Path, tiny_processor: object
) -> None:
    from phi3v_tools.model.quantize import quantize_model

    model = Phi3VForCausalLM.from_pretrained(tiny_dir)
    quantize_model(model, "int4")
    runner = Runner(model, tiny_processor, Settings(model=str(tiny_dir)))  # type: ignore[arg-type]
    try:
        assert runner.info()["quantization"] == "int4"
    finally:
        runner.close()


def test_a_cpu_int4_model_moved_to_another_device_says_to_load_it_there(quantized: dict) -> None:
    from phi3v_tools.errors import DeviceError

    layer = next(m for m in quantized["int4"].modules() if isinstance(m, QuantizedLinear))
    moved = QuantizedLinear(layer.in_features, layer.out_features, "int4", False, torch.float32, CPU)
    moved.qweight = layer.qweight.to("meta")  # stands for a tensor on another device
    moved.scales = layer.scales
    with pytest.raises(DeviceError, match="load it on the device it runs on"):
        moved(torch.randn(1, layer.in_features))


def test_the_setting_is_checked_at_the_edge_with_one_line_naming_the_variable() -> None:
    with pytest.raises(ValueError, match="PHI3V_QUANTIZATION must be one of int8, int4"):
        Settings.from_env({"PHI3V_QUANTIZATION": "int5"})
    assert Settings.from_env({"PHI3V_QUANTIZATION": "none"}).quantization is None
    assert Settings.from_env({"PHI3V_QUANTIZATION": "INT4"}).model_config().quantization == "int4"
    assert Settings.from_env({"PHI3V_QUANTIZATION": "int8"}, quantization="none").quantization is None  # --flag


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantizing_a_loaded_model_gives_the_model_that_quantizing_while_loading_gives(
    mode: str, quantized: dict[str, Phi3VForCausalLM], tiny_dir: Path
) -> None:
    from phi3v_tools.model.quantize import quantize_model

    model = Phi3VForCausalLM.from_pretrained(tiny_dir)
    assert quantize_model(model, mode) == 4 * model.config.text_config.num_hidden_layers
    assert not quantizable(model)  # every decoder linear was replaced
    ids = torch.randint(100, 30000, (1, 24))
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, quantized[mode](input_ids=ids).logits)
