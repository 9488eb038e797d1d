"""Weight-only quantization of the language model's linear layers (``PHI3V_QUANTIZATION=int8`` or ``int4``),
applied while the official safetensors are read: no pre-quantized files, and each layer is quantized as it
arrives, so a load never holds the whole model in 16 bits.

- ``int8``: one int8 per weight, one scale per output channel (symmetric), about half of bf16's bytes.
- ``int4``: two weights per byte, a scale and a zero point per group of 128 inputs (fewer when a layer is
  narrower, as on the tiny checkpoint), about a quarter.

The vision tower, the projector, the embeddings and ``lm_head`` stay in the model's dtype: they are a
quarter of the weights, the vision tower runs once per image, and ``lm_head`` is where rounding shows most.

**Why this module and not a quantization library.** ``benchmarks/quant_kernels.py`` measures the candidates
on this project's CPU (a 2-core AVX2 EPYC, torch 2.13, one thread, one 3072 -> 8192 layer;
``results/quant_kernels.json``). At one row (a decode step), where dense fp32 takes 4.4 ms: torchao 0.18's
stable weight-only int8 takes 40-67 ms in eager mode (it is built for ``torch.compile``) and none of its
stable int4 packing formats runs on a CPU; bitsandbytes 0.50 takes 71-76 ms for int8, NF4 and FP4;
optimum-quanto 0.2.7 takes 135 ms for int8, and its int4 fails under ``torch.inference_mode``. PyTorch's own
weight-only kernels take 2.7 ms (``aten._weight_int8pack_mm``) and 3.6 ms (``aten._weight_int4pack_mm_for_cpu``);
torchao's prototype CPU int4 config calls that same int4 kernel at the same speed, but it is a prototype API,
with no int8 counterpart that is fast here. So the kernels are PyTorch's, called directly for both modes, and
what is written here is the part around them: the quantization arithmetic (a few lines each way), a module
that holds the packed weights, and the choice of path per call (the tests pin the kernels' behaviour, as
they are underscore ops of the pinned torch):

- on the CPU, with bf16 activations (which those kernels take): int4 always (its weight is kept in the
  kernel's layout), int8 up to ``PACKED_ROWS`` rows (decoding, short prompts; beyond that dequantizing once
  and a dense fp32 GEMM is faster on a CPU without native bf16);
- otherwise (int8 prefill on the CPU, and CUDA and MPS, which have no tested packed path here) the layer's
  weight is dequantized to the activations' dtype for that call and multiplied: one layer's weight at a time
  in 16 or 32 bits, never the model's, so the memory saving holds everywhere, and the speed is the dense
  layer's plus the dequantization.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from phi3v_tools.errors import DeviceError

__all__ = [
    "MODES",
    "QuantizedLinear",
    "quantizable",
    "quantize_model",
    "quantize_modules",
    "quantized_bytes",
]

MODES = ("int8", "int4")
INT4_GROUP = 128  # inputs per scale and zero point (the usual choice: llama.cpp's Q4 and GPTQ use 32-128)
PACKED_ROWS = 128  # int8 on the CPU: the packed kernel up to this many rows (at 64 it is 114 ms against 283 ms for
# dequantizing then a dense GEMM); more rows: dequantize, then GEMM (the kernel's bf16 costs more per row)
LAYERS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def _has(op: str) -> bool:
    return hasattr(torch.ops.aten, op)


def int4_group(in_features: int) -> int:
    """The largest group of 128, 64 or 32 inputs that divides ``in_features`` (the kernels need one of them)."""
    for group in (INT4_GROUP, 64, 32):
        if in_features % group == 0:
            return group
    raise DeviceError(f"int4 needs layers whose inputs divide into groups of 32; this one has {in_features}")


class QuantizedLinear(nn.Module):
    """A linear layer whose weight is int8 (per output channel) or int4 (per group), quantized from a dense one.

    ``device`` is where it will run: on the CPU an int4 weight is kept in the CPU kernel's own layout (which
    every call then uses), elsewhere as plain nibbles that each call dequantizes; int8 is one layout for all.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor

    def __init__(
        self, in_features: int, out_features: int, mode: str, bias: bool, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"quantization must be one of {', '.join(MODES)}, got {mode!r}")
        self.in_features, self.out_features, self.mode, self.dtype = in_features, out_features, mode, dtype
        self.cpu_int4 = mode == "int4" and device.type == "cpu" and _has("_weight_int4pack_mm_for_cpu")
        self.packed_int8 = mode == "int8" and _has("_weight_int8pack_mm")  # looked up once, not per call
        if mode == "int8":
            self.group = in_features
            self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scales", torch.empty(out_features, dtype=dtype))
        else:
            if self.cpu_int4 and out_features % 16:
                raise DeviceError(f"int4 needs layers with a multiple of 16 outputs; this one has {out_features}")
            self.group = int4_group(in_features)
            groups = in_features // self.group
            self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
            if self.cpu_int4:  # the kernel's (scale, zero) pairs, bf16, [groups, out, 2]
                self.register_buffer("scales", torch.empty(groups, out_features, 2, dtype=torch.bfloat16))
            else:
                self.register_buffer("scales", torch.empty(out_features, groups, dtype=dtype))
                self.register_buffer("zeros", torch.empty(out_features, groups, dtype=dtype))  # the group's minimum
        self.bias: torch.Tensor | None
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype) if bias else None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"

    # -- quantizing ---------------------------------------------------------------------------------------------------

    def quantized(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """This module's buffers for a dense ``weight`` (and ``bias``), computed where ``weight`` is."""
        weight = weight.float()
        out: dict[str, torch.Tensor]
        if self.mode == "int8":
            scales = self._stored(weight.abs().amax(dim=1).clamp(min=1e-12) / 127, self.dtype)
            q = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
            out = {"qweight": q, "scales": scales.to(self.dtype)}
        else:
            grouped = weight.view(self.out_features, -1, self.group)
            low, high = grouped.amin(dim=-1), grouped.amax(dim=-1)
            kept = torch.bfloat16 if self.cpu_int4 else self.dtype  # what the scales are stored in
            scales = self._stored((high - low).clamp(min=1e-12) / 15, kept)
            low = self._stored(low, kept)
            q = torch.round((grouped - low[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8)
            q = q.view(self.out_features, self.in_features)
            if self.cpu_int4:
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
                # The kernel reads (q - 8) * scale + zero: its zero is the group's middle, not its minimum.
                pairs = torch.stack([scales, low + 8 * scales], dim=-1).transpose(0, 1).contiguous()
                out = {"qweight": packed, "scales": pairs.to(torch.bfloat16)}
            else:
                out = {"qweight": q[:, 0::2] << 4 | q[:, 1::2], "scales": scales.to(self.dtype)}
                out["zeros"] = low.to(self.dtype)
        if bias is not None:
            out["bias"] = bias.to(self.dtype)
        return out

    @staticmethod
    def _stored(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``values`` as they will be stored (rounded to ``dtype``), in fp32: the weights are quantized against
        the scales the kernels will read, not against more precise ones."""
        return values.to(dtype).float()

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense weight the quantized one stands for, in ``dtype``."""
        if self.mode == "int8":
            return self.qweight.to(dtype).mul_(self.scales.to(dtype)[:, None])  # one full-size temporary
        if self.cpu_int4:  # the kernel on an identity: exact, and only for checks (it costs a GEMM)
            eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=self.qweight.device)
            return self._int4_cpu(eye).to(dtype).T.contiguous()
        nibbles = torch.stack([self.qweight >> 4, self.qweight & 15], dim=-1).view(self.out_features, -1, self.group)
        weight = nibbles.to(dtype).mul_(self.scales.to(dtype)[..., None]).add_(self.zeros.to(dtype)[..., None])
        return weight.view(self.out_features, self.in_features)

    # -- running ------------------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.cpu_int4 and self.qweight.device.type != "cpu":
            raise DeviceError(
                "this int4 model was quantized for the CPU (its weights are in the CPU kernel's layout); load it "
                "on the device it runs on (PHI3V_DEVICE) instead of moving it"
            )
        if self.cpu_int4 or (self.packed_int8 and x.device.type == "cpu" and rows <= PACKED_ROWS):
            flat = x.reshape(rows, self.in_features).to(torch.bfloat16)
            if self.cpu_int4:
                out = self._int4_cpu(flat)
            else:
                out = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.scales.to(torch.bfloat16))
            out = out.to(x.dtype).view(*x.shape[:-1], self.out_features)
            return out if bias is None else out + bias
        return F.linear(x, self.dequantized(x.dtype), bias)

    def _int4_cpu(self, flat: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.qweight, self.group, self.scales)


def quantizable(model: nn.Module) -> dict[str, nn.Linear]:
    """The language model's decoder linears, by module name: what a quantization mode replaces."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and ".layers." in name and name.endswith(LAYERS)
    }


def quantize_modules(
    model: nn.Module, mode: str, dtype: torch.dtype, device: torch.device
) -> dict[str, QuantizedLinear]:
    """Swap the decoder linears for :class:`QuantizedLinear` modules (on meta: the caller fills their buffers)."""
    swapped: dict[str, QuantizedLinear] = {}
    with torch.device("meta"):
        for name, linear in quantizable(model).items():
            parent, _, child = name.rpartition(".")
            bias = linear.bias is not None
            module = QuantizedLinear(linear.in_features, linear.out_features, mode, bias, dtype, device)
            setattr(model.get_submodule(parent), child, module)
            swapped[name] = module
    return swapped


def quantize_model(model: nn.Module, mode: str) -> int:
    """Quantize a loaded model's decoder linears in place, each where its weight is (the GPU suite's models are
    built in memory, not read); returns how many. The result is what loading with ``quantization=mode`` gives."""
    layers = quantizable(model)
    for name, linear in layers.items():
        weight = linear.weight.detach()
        with torch.device("meta"):
            module = QuantizedLinear(
                linear.in_features, linear.out_features, mode, linear.bias is not None, weight.dtype, weight.device
            )
        bias = None if linear.bias is None else linear.bias.detach()
        for buffer, value in module.quantized(weight, bias).items():
            setattr(module, buffer, value)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)
    return len(layers)


def quantized_bytes(shapes: list[tuple[int, int]], mode: str | None, dense_bytes: int, scale_bytes: int = 2) -> int:
    """Bytes the decoder linears of ``shapes`` ((out, in) each) take in ``mode`` (None: dense, ``dense_bytes`` per
    weight). Scales (and int4's zero points) take ``scale_bytes`` each: int8's and the plain int4 layout's are in
    the model's dtype, the CPU int4 layout's in bf16."""
    total = 0
    for out_features, in_features in shapes:
        if mode is None:
            total += out_features * in_features * dense_bytes
        elif mode == "int8":
            total += out_features * in_features + scale_bytes * out_features
        else:
            groups = in_features // int4_group(in_features)
            total += out_features * in_features // 2 + 2 * scale_bytes * out_features * groups
    return total


def describe(model: Any) -> str | None:
    """The quantization mode of a loaded model, or None."""
    modes = {m.mode for m in model.modules() if isinstance(m, QuantizedLinear)}
    return next(iter(modes)) if modes else None
