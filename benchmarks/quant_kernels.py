"""Weight-only int8 / int4 matmul kernels on the CPU: phi3v-tools' ``QuantizedLinear`` against the libraries.

    .venv/bin/python benchmarks/quant_kernels.py [--calls 20] [--out benchmarks/results/quant_kernels.json]

What it measures, in one run on one machine with one torch thread: one Phi-3-sized linear layer (3072 inputs
-> 8192 outputs, random weights, no bias) at 1, 8 and 64 rows, the median milliseconds per call over
``--calls`` calls after a warm-up, and each output's relative error (``||y - y_fp32|| / ||y_fp32||``) against
the dense fp32 layer on the same input:

- dense fp32 and dense bf16 (``x @ W.T``): the baselines;
- phi3v-tools' ``QuantizedLinear`` in int8 and int4, called with fp32 input as the model calls it (the packed
  ATen kernels ``aten._weight_int8pack_mm`` for up to ``PACKED_ROWS`` rows and ``aten._weight_int4pack_mm_for_cpu``
  always; int8 on more rows dequantizes and runs the dense GEMM);
- torchao: ``quantize_`` with ``Int8WeightOnlyConfig()`` on an fp32 and a bf16 ``nn.Linear``, and
  ``Int4WeightOnlyConfig(group_size=128)`` with each packing format, plus the prototype CPU int4 config;
- bitsandbytes: ``Linear8bitLt(has_fp16_weights=False)`` and ``Linear4bit`` (NF4 and FP4, bf16 compute);
- optimum-quanto: ``quantize(weights=qint8 / qint4)`` then ``freeze``, called under ``torch.inference_mode()``
  (and, where that fails, once more under ``torch.no_grad()`` to tell the two failures apart).

Every library is optional: one that is not installed is recorded as skipped with the ``pip install`` line that
would add it, one that raises is recorded with the exception's type and message, and the run goes on. The
libraries are ``pip install torchao bitsandbytes optimum-quanto`` (``PYTHONPATH`` is not needed when they are
in the same environment; point it at them when they are installed elsewhere).

Why: it backs the choice made in ``phi3v_tools/model/quantize.py`` to call PyTorch's own weight-only kernels
rather than take a quantization library, which were much slower on this project's CPU in eager mode. Rerun it
when torch or a library changes, or on another CPU, before revisiting that choice. Timings on a shared machine
vary from run to run: compare ratios within one run, not figures across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from phi3v_tools.model.quantize import PACKED_ROWS, QuantizedLinear

IN_FEATURES, OUT_FEATURES = 3072, 8192
WARMUP = 2
MIN_CALLS = 3  # timed calls a case always gets, whatever --max-case-s says
PIP = {"torchao": "torchao==0.18.0", "bitsandbytes": "bitsandbytes==0.50.2", "optimum-quanto": "optimum-quanto==0.2.7"}

Forward = Callable[[torch.Tensor], torch.Tensor]


class Case:
    """One variant: ``build`` returns the call to time (built once, outside the timed region) and the dtype of
    the input it takes; ``mode`` is the grad mode the calls run in."""

    def __init__(
        self, name: str, build: Callable[[], Forward], dtype: torch.dtype, mode: str = "inference_mode"
    ) -> None:
        self.name, self.build, self.dtype, self.mode = name, build, dtype, mode


def failure(exc: BaseException, stage: str) -> dict[str, Any]:
    return {"error": {"type": type(exc).__name__, "message": str(exc)[:300], "stage": stage}}


def grad_mode(mode: str) -> contextlib.AbstractContextManager[Any]:
    return torch.inference_mode() if mode == "inference_mode" else torch.no_grad()


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    y = y.detach().float().reshape(reference.shape)
    return float((y - reference).norm() / reference.norm())


def time_calls(fn: Forward, x: torch.Tensor, calls: int, max_case_s: float) -> tuple[torch.Tensor, list[float]]:
    out = fn(x)
    for _ in range(WARMUP - 1):
        fn(x)
    times: list[float] = []
    start = time.perf_counter()
    for i in range(calls):
        if i >= MIN_CALLS and time.perf_counter() - start > max_case_s:
            break
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return out, times


def run_case(
    case: Case, inputs: dict[int, torch.Tensor], refs: dict[int, torch.Tensor], calls: int, max_case_s: float
) -> dict[str, Any]:
    result: dict[str, Any] = {"input_dtype": str(case.dtype).removeprefix("torch."), "grad_mode": case.mode}
    try:
        t0 = time.perf_counter()
        with torch.no_grad():
            fn = case.build()
        result["build_s"] = round(time.perf_counter() - t0, 3)
    except Exception as exc:
        return result | failure(exc, "build")
    result["rows"] = {}
    for rows, x in inputs.items():
        try:
            with grad_mode(case.mode):
                out, times = time_calls(fn, x.to(case.dtype), calls, max_case_s)
            result["rows"][str(rows)] = {
                "median_ms": round(statistics.median(times) * 1e3, 3),
                "min_ms": round(min(times) * 1e3, 3),
                "calls": len(times),
                "rel_error": round(relative_error(out, refs[rows]), 6),
                "output_dtype": str(out.dtype).removeprefix("torch."),
            }
        except Exception as exc:
            result["rows"][str(rows)] = failure(exc, f"call with {rows} rows")
    del fn
    return result


# -- the variants -------------------------------------------------------------------------------------------------


def dense_linear(weight: torch.Tensor, dtype: torch.dtype) -> nn.Linear:
    linear = nn.Linear(IN_FEATURES, OUT_FEATURES, bias=False, dtype=dtype)
    linear.weight.data.copy_(weight)
    return linear.requires_grad_(False)


def phi3v_cases(weight: torch.Tensor) -> list[Case]:
    def build(mode: str) -> Forward:
        layer = QuantizedLinear(IN_FEATURES, OUT_FEATURES, mode, False, torch.float32, torch.device("cpu"))
        for name, value in layer.quantized(weight).items():
            setattr(layer, name, value)
        return layer

    return [Case(f"phi3v-tools {mode}", lambda mode=mode: build(mode), torch.float32) for mode in ("int8", "int4")]


def torchao_cases(weight: torch.Tensor) -> list[Case]:
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    def build(dtype: torch.dtype, config: Any) -> Forward:
        linear = dense_linear(weight, dtype)
        quantize_(linear, config)
        return linear

    cases = [
        Case("torchao int8 (fp32 linear)", lambda: build(torch.float32, Int8WeightOnlyConfig()), torch.float32),
        Case("torchao int8 (bf16 linear)", lambda: build(torch.bfloat16, Int8WeightOnlyConfig()), torch.bfloat16),
    ]
    try:
        from torchao.quantization.quantize_.workflows import Int4PackingFormat

        formats = list(Int4PackingFormat)
    except Exception:  # an older or newer layout of the package: the default format only
        formats = [None]
    for fmt in formats:
        kwargs = {} if fmt is None else {"int4_packing_format": fmt}
        label = "default" if fmt is None else fmt.value
        cases.append(
            Case(
                f"torchao int4 {label}",
                lambda kwargs=kwargs: build(torch.bfloat16, Int4WeightOnlyConfig(group_size=128, **kwargs)),
                torch.bfloat16,
            )
        )

    def prototype() -> Forward:
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        return build(torch.bfloat16, PrototypeInt4WeightOnlyConfig(group_size=128))

    cases.append(Case("torchao int4 prototype (CPU)", prototype, torch.bfloat16))
    return cases


def bitsandbytes_cases(weight: torch.Tensor) -> list[Case]:
    import bitsandbytes as bnb

    def int8() -> Forward:
        layer = bnb.nn.Linear8bitLt(IN_FEATURES, OUT_FEATURES, bias=False, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
        return layer.to("cpu")  # moving the parameter "to" a device is what quantizes it

    def four_bit(quant_type: str) -> Forward:
        layer = bnb.nn.Linear4bit(
            IN_FEATURES, OUT_FEATURES, bias=False, compute_dtype=torch.bfloat16, quant_type=quant_type
        )
        layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type=quant_type)
        return layer.to("cpu")

    return [
        Case("bitsandbytes int8 (Linear8bitLt)", int8, torch.float32),
        Case("bitsandbytes nf4 (bf16 compute)", lambda: four_bit("nf4"), torch.float32),
        Case("bitsandbytes fp4 (bf16 compute)", lambda: four_bit("fp4"), torch.float32),
    ]


def quanto_cases(weight: torch.Tensor, mode: str = "inference_mode") -> list[Case]:
    from optimum.quanto import freeze, qint4, qint8, quantize

    def build(qtype: Any) -> Forward:
        model = nn.Sequential(dense_linear(weight, torch.float32))  # quantize() swaps submodules, not the root
        quantize(model, weights=qtype)
        freeze(model)
        return model

    suffix = "" if mode == "inference_mode" else f" under {mode}"
    return [
        Case(f"optimum-quanto {name}{suffix}", lambda qtype=qtype: build(qtype), torch.float32, mode)
        for name, qtype in (("int8", qint8), ("int4", qint4))
    ]


# -- the machine --------------------------------------------------------------------------------------------------


def cpu_info() -> dict[str, Any]:
    model, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    return {
        "model": model,
        "platform": platform.platform(),
        "logical_cpus": os.cpu_count(),
        "flags": {
            "avx2": "avx2" in flags,
            "avx512f": "avx512f" in flags,
            "avx512_bf16": "avx512_bf16" in flags,
            "amx": sorted(flag for flag in flags if flag.startswith("amx")),
        },
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a missing parent package (optimum)
        return False


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# -- the report ---------------------------------------------------------------------------------------------------


SHORT = {"float32": "fp32", "bfloat16": "bf16"}


def cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "-"
    if "error" in entry:
        return "error"
    return f"{entry['median_ms']:.2f}"


def print_table(results: dict[str, Any], rows: list[int]) -> None:
    base = results.get("dense fp32", {}).get("rows", {})
    width = max(len(name) for name in results) + 2
    head = "".join(f"{f'{r} row' + ('s' if r > 1 else '') + ' ms':>12}" for r in rows)
    ratios = "".join(f"{f'x fp32@{r}':>10}" for r in rows)
    print(f"{'variant':<{width}}{'input':<7}{head}{ratios}{'rel.err':>10}")
    problems: list[str] = []
    for name, result in results.items():
        if "skipped" in result:
            print(f"{name:<{width}}{'':<7}skipped: {result['skipped']}")
            continue
        dtype = SHORT.get(result.get("input_dtype", ""), result.get("input_dtype", ""))
        if "error" in result:
            err = result["error"]
            print(f"{name:<{width}}{dtype:<7}{err['stage']} failed: {err['type']}")
            problems.append(f"{name} ({err['stage']}): {err['type']}: {err['message']}")
            continue
        per_rows = result["rows"]
        line = "".join(f"{cell(per_rows.get(str(r))):>12}" for r in rows)
        for r in rows:
            entry, ref = per_rows.get(str(r), {}), base.get(str(r), {})
            ok = "median_ms" in entry and "median_ms" in ref
            line += f"{entry['median_ms'] / ref['median_ms']:>9.1f}x" if ok else f"{'-':>10}"
        errors = [entry["rel_error"] for entry in per_rows.values() if "rel_error" in entry]
        line += f"{max(errors):>10.4f}" if errors else f"{'-':>10}"
        print(f"{name:<{width}}{dtype:<7}{line}")
        problems += [
            f"{name} ({e['error']['stage']}): {e['error']['type']}: {e['error']['message']}"
            for e in per_rows.values()
            if "error" in e
        ]
    if problems:
        print("\nfailures:")
        for problem in problems:
            print(f"  - {problem}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20, help="timed calls per variant and row count")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quant_kernels.json"))
    parser.add_argument("--rows", default="1,8,64", help="comma-separated row counts")
    parser.add_argument(
        "--max-case-s",
        type=float,
        default=3.0,
        help=f"stop timing a case after this many seconds (at least {MIN_CALLS} calls): bounds the slow libraries",
    )
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    torch.set_num_threads(1)

    torch.manual_seed(0)
    bound = IN_FEATURES**-0.5  # nn.Linear's own initialisation range
    weight = torch.empty(OUT_FEATURES, IN_FEATURES).uniform_(-bound, bound)
    inputs = {r: torch.randn(r, IN_FEATURES) for r in rows}
    refs = {r: x @ weight.T for r, x in inputs.items()}
    weight_bf16 = weight.bfloat16()

    cases = [
        Case("dense fp32", lambda: lambda x: x @ weight.T, torch.float32),
        Case("dense bf16", lambda: lambda x: x @ weight_bf16.T, torch.bfloat16),
        *phi3v_cases(weight),
    ]
    results: dict[str, Any] = {}
    libraries = (
        ("torchao", "torchao", torchao_cases),
        ("bitsandbytes", "bitsandbytes", bitsandbytes_cases),
        ("optimum-quanto", "optimum.quanto", quanto_cases),
    )
    load_before = os.getloadavg()
    for case in cases:
        results[case.name] = run_case(case, inputs, refs, args.calls, args.max_case_s)
    for dist, module, make_cases in libraries:
        if not importable(module):
            results[dist] = {"skipped": f"not installed: pip install {PIP[dist]}"}
            continue
        try:
            lib_cases = make_cases(weight)
        except Exception as exc:
            results[dist] = failure(exc, f"import {module}")
            continue
        for case in lib_cases:
            results[case.name] = run_case(case, inputs, refs, args.calls, args.max_case_s)
        if dist == "optimum-quanto":  # tell an inference_mode failure from a general one
            for case in quanto_cases(weight, "no_grad"):
                under_inference = results[case.name.removesuffix(" under no_grad")]
                if "error" in under_inference or any("error" in e for e in under_inference.get("rows", {}).values()):
                    results[case.name] = run_case(case, inputs, refs, args.calls, args.max_case_s)

    report = {
        "what": f"one {IN_FEATURES}->{OUT_FEATURES} linear layer, weight-only int8/int4, median ms per call",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": cpu_info() | {"loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__}
        | {dist: version(dist) for dist, _, _ in libraries},
        "settings": {
            "in_features": IN_FEATURES,
            "out_features": OUT_FEATURES,
            "bias": False,
            "rows": rows,
            "calls": args.calls,
            "warmup_calls": WARMUP,
            "max_case_s": args.max_case_s,
            "torch_threads": torch.get_num_threads(),
            "phi3v_packed_rows": PACKED_ROWS,
            "rel_error": "||y - y_fp32|| / ||y_fp32||, y_fp32 = x @ W.T in fp32; the max over row counts in the table",
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    cpu = report["machine"]
    print(f"{cpu['model']}, {cpu['torch_cpu_capability']}, torch {torch.__version__}, {torch.get_num_threads()} thread")
    print_table(results, rows)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
