"""Checks on the real Phi-3-vision weights. Skipped unless PHI3V_REAL_MODEL names a local checkpoint directory."""

from __future__ import annotations

import os

import pytest

from phi3v_tools.demo import book_cover, revenue_chart
from phi3v_tools.model import Phi3VForCausalLM, Phi3VProcessor

REAL_MODEL = os.environ.get("PHI3V_REAL_MODEL")
pytestmark = [
    pytest.mark.real_weights,
    pytest.mark.skipif(not REAL_MODEL, reason="set PHI3V_REAL_MODEL to a local Phi-3-vision checkpoint to run"),
]


@pytest.fixture(scope="module")
def real() -> tuple[Phi3VForCausalLM, Phi3VProcessor]:
    assert REAL_MODEL is not None
    return Phi3VForCausalLM.from_pretrained(REAL_MODEL), Phi3VProcessor.from_pretrained(REAL_MODEL)


def _ask(real: tuple[Phi3VForCausalLM, Phi3VProcessor], question: str, image: object) -> str:
    model, processor = real
    prompt = processor.apply_chat_template([{"role": "user", "content": f"<|image_1|>\n{question}"}])
    inputs = processor(prompt, [image]).to(model.device)
    out = model.generate(**inputs, max_new_tokens=60)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]


def test_the_real_model_reads_the_book_cover(real: tuple[Phi3VForCausalLM, Phi3VProcessor]) -> None:
    answer = _ask(real, "What is the title of this book, and who is its author?", book_cover()).lower()
    assert "harbour" in answer or "lindqvist" in answer


def test_the_real_model_sees_a_bar_chart(real: tuple[Phi3VForCausalLM, Phi3VProcessor]) -> None:
    answer = _ask(real, "What kind of chart is this?", revenue_chart()).lower()
    assert "bar" in answer
