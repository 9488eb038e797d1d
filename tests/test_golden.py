"""The native model reproduces the original implementation's outputs on the shared golden cases.

Tolerances are the golden README's (pixel sums 1e-2, samples 1e-4, logits 1e-3); we hold logits to 1e-4.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from phi3v_tools.model import Phi3VForCausalLM, Phi3VProcessor
from tests.conftest import REFERENCE, needs_reference

pytestmark = needs_reference


def _cases() -> list[dict[str, Any]]:
    path = REFERENCE / "golden" / "expected.json"
    if not path.is_file():
        return []
    return list(json.loads(path.read_text())["cases"])


def _literal(value: Any) -> Any:
    return ast.literal_eval(value) if isinstance(value, str) else value


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def golden_model(request: pytest.FixtureRequest, reference_dir: Path) -> Phi3VForCausalLM:
    return Phi3VForCausalLM.from_pretrained(reference_dir / "tiny-random", attn_implementation=request.param)


def _inputs(case: dict[str, Any], reference_dir: Path) -> Any:
    processor = Phi3VProcessor.from_pretrained(reference_dir / "tiny-random", num_crops=case["num_crops"])
    images = [Image.open(reference_dir / "golden" / "images" / name).convert("RGB") for name in case["images"]]
    return processor(case["prompt"], images or None, return_tensors="pt")


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c["name"])
def test_prompt_ids_and_image_tensors_match_the_original(case: dict[str, Any], reference_dir: Path) -> None:
    inputs = _inputs(case, reference_dir)
    assert inputs["input_ids"][0].tolist() == _literal(case["input_ids"])
    if not case["images"]:
        assert "pixel_values" not in inputs
        return
    pixels = inputs["pixel_values"]
    assert list(pixels.shape) == case["pixel_values_shape"]
    assert inputs["image_sizes"].tolist() == case["image_sizes"]
    for i, row in enumerate(case["pixel_values_crop_sums"]):
        for j, expected in enumerate(row):
            assert pixels[i, j].sum().item() == pytest.approx(expected, abs=1e-2)
    for sample in _literal(case["pixel_values_samples"]):
        assert pixels[tuple(sample["index"])].item() == pytest.approx(sample["value"], abs=1e-4)


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c["name"])
def test_logits_match_the_original_within_1e_4(
    case: dict[str, Any], golden_model: Phi3VForCausalLM, reference_dir: Path
) -> None:
    inputs = _inputs(case, reference_dir)
    with torch.inference_mode():
        logits = golden_model(**inputs).logits
    top = logits[0, -1].topk(10)
    assert top.indices.tolist() == case["logits_last_top10_ids"]
    torch.testing.assert_close(top.values, torch.tensor(case["logits_last_top10_values"]), atol=1e-4, rtol=0)
    assert logits.mean().item() == pytest.approx(case["logits_mean"], abs=1e-5)


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c["name"])
def test_greedy_generation_matches_the_original_token_for_token(
    case: dict[str, Any], golden_model: Phi3VForCausalLM, reference_dir: Path
) -> None:
    inputs = _inputs(case, reference_dir)
    out = golden_model.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=32000)
    assert out[0, inputs["input_ids"].shape[1] :].tolist() == case["generated_greedy"]
    assert torch.equal(out[0, : inputs["input_ids"].shape[1]], inputs["input_ids"][0])  # prompt left untouched
