"""The seed notebook's calls run as written against the native model (model id -> the tiny checkpoint)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from phi3v_tools.demo import SEED_TASKS, book_cover, revenue_chart, scene
from phi3v_tools.model import Phi3VForCausalLM, Phi3VProcessor
from tests.conftest import REPO


def test_the_three_seed_calls_run_as_written(tiny_dir: Path) -> None:
    model_id = str(tiny_dir)
    model = Phi3VForCausalLM.from_pretrained(
        model_id, device_map="cpu", trust_remote_code=True, torch_dtype="auto", _attn_implementation="eager"
    )
    processor = Phi3VProcessor.from_pretrained(model_id, trust_remote_code=True)
    generation_args = {"max_new_tokens": 8, "temperature": 0.0, "do_sample": False}
    calls = [
        ("<|image_1|>\nCould you please introduce this stock to me?", [revenue_chart()]),
        ("<|image_1|>\nWhat is the title of this book, and who is its author?", [book_cover()]),
        ("<|image_1|>\n<|image_2|>\nWhat is the difference between these two images?", [scene(False), scene(True)]),
    ]
    for content, images in calls:
        messages = [{"role": "user", "content": content}]
        prompt = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = processor(prompt, images, return_tensors="pt").to("cpu")
        generate_ids = model.generate(**inputs, eos_token_id=processor.tokenizer.eos_token_id, **generation_args)
        generate_ids = generate_ids[:, inputs["input_ids"].shape[1] :]
        response = processor.batch_decode(generate_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]
        assert 1 <= generate_ids.shape[1] <= 8
        assert isinstance(response, str) and response.strip()  # random words, but words


def test_the_scanned_page_is_a_light_page_with_dark_text_lines() -> None:
    from phi3v_tools.demo import TEXT_PAGE, text_page

    page = text_page().convert("L")
    assert page.size == (600, 800)
    rows = [sum(page.getpixel((x, y)) < 128 for x in range(0, 600, 2)) for y in range(800)]
    inked = sum(1 for r in rows if r > 0)
    assert 0 < inked < 400  # text lines, mostly blank paper
    assert len([line for line in TEXT_PAGE if line]) == 7


def test_the_demo_tasks_match_their_pictures() -> None:
    assert [len(task.images()) for task in SEED_TASKS] == [1, 1, 2]
    assert SEED_TASKS[2].user_content.startswith("<|image_1|>\n<|image_2|>\n")


def test_the_seed_notebook_example_script_runs(tiny_dir: Path) -> None:
    env = {**os.environ, "PHI3V_MODEL": str(tiny_dir), "MAX_NEW_TOKENS": "4"}
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "seed_notebook.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert len([line for line in result.stdout.splitlines() if line.strip()]) >= 3
