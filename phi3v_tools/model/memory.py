"""Memory planning before a load: what the model takes in each mode, what the device has, and a refusal that
names a mode that fits.

The figures come from the checkpoint's ``config.json`` alone: the model is built on the meta device (no
memory) and its parameters are counted, the decoder linears at the mode's bytes
(:func:`~phi3v_tools.model.quantize.quantized_bytes`), the rest in the model's dtype. On top of the weights,
a load needs room to run one request: the KV cache of one full context (``max_context`` positions), the
vision tower's activations for one image at ``num_crops``, and the language model's activations for one
prefill chunk. They are estimates from the shapes (they leave out the allocator's fragmentation and
PyTorch's own workspace), so the check refuses only a load that cannot fit by these counts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from phi3v_tools.errors import OutOfMemoryError
from phi3v_tools.model.config import Phi3VConfig
from phi3v_tools.model.quantize import MODES, int4_group, quantizable, quantized_bytes

__all__ = ["MemoryPlan", "available_bytes", "check_fits", "plan", "plans"]

GB = 1e9
CLIP_TOKENS = 577  # 336 / 14 = 24 x 24 patches + CLS
PREFILL_CHUNK = 2048  # the engine's default chunk (PHI3V_PREFILL_CHUNK_TOKENS may set more; the plan keeps this)


@dataclass(frozen=True)
class MemoryPlan:
    """One mode's memory on one device, in bytes."""

    mode: str  # "bfloat16", "float16", "float32", "int8" or "int4"
    weights: int
    kv_per_token: int
    context_kv: int  # one full context's KV
    activations: int  # one image's vision activations + one prefill chunk's
    dtype: str

    @property
    def to_run(self) -> int:
        """Weights and room for one request: the least a load needs."""
        return self.weights + self.context_kv + self.activations

    def as_dict(self) -> dict[str, float | str]:
        return {
            "mode": self.mode,
            "weights_gb": round(self.weights / GB, 2),
            "kv_mb_per_token": round(self.kv_per_token / 2**20, 3),
            "kv_gb_per_context": round(self.context_kv / GB, 2),
            "activations_gb": round(self.activations / GB, 2),
            "needs_gb": round(self.to_run / GB, 2),
        }


def kv_bytes_per_token(text: Any, element: int) -> int:
    """Bytes one position of the KV cache takes: keys and values, every layer, ``element`` bytes each."""
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or int(text.hidden_size) // heads)
    return 2 * int(text.num_hidden_layers) * kv_heads * head_dim * element


@dataclass(frozen=True)
class _Shapes:
    """What the plans count, read once from the meta model: the parameters outside the decoder linears, the
    linears' (out, in) shapes, and the outputs of those with a bias."""

    rest: int
    linears: tuple[tuple[int, int], ...]
    bias_outputs: int

    @classmethod
    def of(cls, config: Phi3VConfig) -> _Shapes:
        from phi3v_tools.model.checkpoint import build_empty_model

        model: torch.nn.Module = build_empty_model(config)  # meta: shapes only
        linears = quantizable(model)
        linear_params = {f"{name}.{p}" for name, m in linears.items() for p, _ in m.named_parameters()}
        return cls(
            rest=sum(p.numel() for name, p in model.named_parameters() if name not in linear_params),
            linears=tuple((m.out_features, m.in_features) for m in linears.values()),
            bias_outputs=sum(m.out_features for m in linears.values() if m.bias is not None),
        )


def plan(
    config: Phi3VConfig,
    dtype: torch.dtype,
    quantization: str | None,
    *,
    num_crops: int = 16,
    max_context: int = 4096,
    device_type: str = "cuda",
    shapes: _Shapes | None = None,
) -> MemoryPlan:
    """The memory one mode takes for ``config`` with activations in ``dtype`` on a ``device_type`` device (the
    CPU keeps int4's scales in bf16, other devices in ``dtype``)."""
    element = torch.empty((), dtype=dtype).element_size()
    counted = shapes or _Shapes.of(config)
    linears = list(counted.linears)
    scale_bytes = 2 if quantization == "int4" and device_type == "cpu" else element
    if quantization == "int4":
        for _out, inputs in linears:
            int4_group(inputs)  # raises for a layer int4 cannot take
    weights = counted.rest * element + quantized_bytes(linears, quantization, element, scale_bytes)
    weights += counted.bias_outputs * element

    text = config.text_config
    kv_per_token = kv_bytes_per_token(text, element)
    vision = config.vision_config
    crops = num_crops + 1
    width, inner, vision_heads = int(vision.hidden_size), int(vision.intermediate_size), int(vision.num_attention_heads)
    vision_act = crops * CLIP_TOKENS * (inner + 4 * width + vision_heads * CLIP_TOKENS) * element
    chunk = min(PREFILL_CHUNK, max_context)
    hidden, intermediate = int(text.hidden_size), int(text.intermediate_size)
    prefill_act = chunk * (3 * intermediate + 6 * hidden) * element
    if quantization is not None:  # a dequantized layer, one at a time, where no packed kernel runs
        prefill_act += max((o * i for o, i in linears), default=0) * element
    return MemoryPlan(
        mode=quantization or str(dtype).removeprefix("torch."),
        weights=weights,
        kv_per_token=kv_per_token,
        context_kv=kv_per_token * max_context,
        activations=vision_act + prefill_act,
        dtype=str(dtype).removeprefix("torch."),
    )


def plans(
    config: Phi3VConfig, dtype: torch.dtype, *, num_crops: int = 16, max_context: int = 4096, device_type: str = "cuda"
) -> list[MemoryPlan]:
    """The dense mode (``dtype``) and every quantization mode, smallest last (the shapes are counted once)."""
    shapes = _Shapes.of(config)
    options: dict[str, Any] = {"num_crops": num_crops, "max_context": max_context, "device_type": device_type}
    return [plan(config, dtype, mode, shapes=shapes, **options) for mode in (None, *MODES)]


def available_bytes(device: torch.device) -> int | None:
    """Memory free for the model on ``device`` now: a CUDA device's free memory, the host's available memory
    for the CPU (``MemAvailable``), None where it cannot be known (MPS shares memory with the whole system)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as info:
                for line in info:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    return None


def check_fits(
    config: Phi3VConfig,
    device: torch.device,
    dtype: torch.dtype,
    quantization: str | None,
    *,
    num_crops: int = 16,
    max_context: int = 4096,
    available: int | None = None,
) -> MemoryPlan:
    """The plan for this load; an :class:`OutOfMemoryError` naming the modes that fit when it cannot fit."""
    every = plans(config, dtype, num_crops=num_crops, max_context=max_context, device_type=device.type)
    chosen = every[0] if quantization is None else every[1 + MODES.index(quantization)]
    free = available if available is not None else available_bytes(device)
    if free is None or chosen.to_run <= free:
        return chosen
    others = [p for p in every if p.mode != chosen.mode]
    fitting = [p for p in others if p.to_run <= free and p.to_run < chosen.to_run]
    where = "this machine's available memory" if device.type == "cpu" else f"{device}'s free memory"
    message = (
        f"the model does not fit: {chosen.mode} needs about {chosen.to_run / GB:.1f} GB ({chosen.weights / GB:.1f} GB "
        f"of weights, {chosen.context_kv / GB:.1f} GB of KV cache for a {max_context}-token context, "
        f"{chosen.activations / GB:.1f} GB of activations), and {where} is {free / GB:.1f} GB. "
    )
    if fitting:
        best = fitting[0]  # the least quantized mode that fits
        message += f"PHI3V_QUANTIZATION={best.mode} needs about {best.to_run / GB:.1f} GB and fits"
    else:
        smallest = min(others + [chosen], key=lambda p: p.to_run)
        message += (
            f"The smallest mode, {smallest.mode}, needs about {smallest.to_run / GB:.1f} GB; free memory, lower "
            "PHI3V_MAX_CONTEXT, or use another device"
        )
    raise OutOfMemoryError(message)
