"""Generation: batching, stop tokens, the LongRoPE switch at 4096 positions, and the transformers keywords."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from PIL import Image
from transformers import GenerationConfig

from phi3v_tools.errors import GenerationError, PromptError
from phi3v_tools.model import Phi3VForCausalLM, Phi3VProcessor
from phi3v_tools.model.config import END_OF_TEXT_ID, END_OF_TURN_ID
from phi3v_tools.model.modeling import positions_from_mask


def chat(text: str) -> str:
    return f"<|user|>\n{text}<|end|>\n<|assistant|>\n"


def picture(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


PROMPTS = [
    chat("<|image_1|>\nDescribe this image."),
    chat("Hello, who are you? Tell me a long story about boats."),
    chat("<|image_1|>\n<|image_2|>\nWhat differs?"),
]
IMAGES = [[picture(1)], [], [picture(2, (200, 400)), picture(3, (640, 200))]]


@contextmanager
def boost(model: Phi3VForCausalLM, token: int, rows: list[int] | None = None) -> Iterator[None]:
    """Make ``token`` the argmax for the given rows (all rows by default) at every step."""

    def hook(_module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[rows if rows is not None else slice(None), :, token] += 1000.0
        return output

    handle = model.language_model.lm_head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def new_tokens(out: torch.Tensor, prompt_len: int) -> list[list[int]]:
    return out[:, prompt_len:].tolist()


def test_batched_greedy_generation_equals_each_prompt_alone(
    tiny_model: Phi3VForCausalLM, tiny_processor: Phi3VProcessor
) -> None:
    batch = tiny_processor(PROMPTS, IMAGES, padding=True)
    assert len(set(batch["attention_mask"].sum(dim=1).tolist())) == 3  # really different lengths
    out = tiny_model.generate(**batch, max_new_tokens=16, eos_token_id=[])
    for row, (prompt, images) in enumerate(zip(PROMPTS, IMAGES, strict=True)):
        alone = tiny_processor(prompt, images or None)
        expected = tiny_model.generate(**alone, max_new_tokens=16, eos_token_id=[])
        assert new_tokens(out, batch["input_ids"].shape[1])[row] == new_tokens(expected, alone["input_ids"].shape[1])[0]


def test_batched_forward_logits_equal_each_prompt_alone(
    tiny_model: Phi3VForCausalLM, tiny_processor: Phi3VProcessor
) -> None:
    batch = tiny_processor(PROMPTS, IMAGES, padding=True)
    with torch.inference_mode():
        batched = tiny_model(**batch).logits
        for row, (prompt, images) in enumerate(zip(PROMPTS, IMAGES, strict=True)):
            alone = tiny_model(**tiny_processor(prompt, images or None)).logits[0]
            torch.testing.assert_close(batched[row, -alone.shape[0] :], alone, atol=1e-5, rtol=1e-5)


def test_generation_stops_on_end_of_turn_by_default(
    tiny_model: Phi3VForCausalLM, tiny_processor: Phi3VProcessor
) -> None:
    inputs = tiny_processor(chat("Hi"))
    with boost(tiny_model, END_OF_TURN_ID):
        out = tiny_model.generate(**inputs, max_new_tokens=10)
    assert new_tokens(out, inputs["input_ids"].shape[1]) == [[END_OF_TURN_ID]]


def test_generation_stops_on_end_of_text_by_default(
    tiny_model: Phi3VForCausalLM, tiny_processor: Phi3VProcessor
) -> None:
    inputs = tiny_processor(chat("Hi"))
    with boost(tiny_model, END_OF_TEXT_ID):
        out = tiny_model.generate(**inputs, max_new_tokens=10)
    assert new_tokens(out, inputs["input_ids"].shape[1]) == [[END_OF_TEXT_ID]]


def test_an_explicit_eos_token_id_replaces_the_default_stops(
    tiny_model: Phi3VForCausalLM, tiny_processor: Phi3VProcessor
) -> None:
    inputs = tiny_processor(chat("Hi"))
    with boost(tiny_model, END_OF_TURN_ID):
        out = tiny_model.generate(**inputs, max_new_tokens=5, eos_token_id=END_OF_TEXT_ID)
    assert new_tokens(out, inputs["input_ids"].shape[1]) == [[END_OF_TURN_ID] * 5]


def test_a_finished_row_is_padded_while_the_others_go_on_unchanged(
    tiny_model: Phi3VForCausalLM, tiny_processor: Phi3VProcessor
) -> None:
    batch = tiny_processor(PROMPTS[:2], IMAGES[:2], padding=True)
    with boost(tiny_model, END_OF_TURN_ID, rows=[0]):
        out = tiny_model.generate(**batch, max_new_tokens=8)
    rows = new_tokens(out, batch["input_ids"].shape[1])
    assert rows[0] == [END_OF_TURN_ID] + [END_OF_TEXT_ID] * 7  # stopped, then padding
    alone = tiny_processor(PROMPTS[1])
    expected = tiny_model.generate(**alone, max_new_tokens=8)
    assert rows[1] == new_tokens(expected, alone["input_ids"].shape[1])[0]


def test_generation_across_the_4096_longrope_switch_equals_recomputing_every_prefix(
    tiny_model: Phi3VForCausalLM, tiny_processor: Phi3VProcessor
) -> None:
    inputs = tiny_processor(chat("the " * 4076))
    prompt_len = inputs["input_ids"].shape[1]
    assert 4086 <= prompt_len <= 4094, prompt_len  # the switch falls inside the 12 new tokens
    out = tiny_model.generate(**inputs, max_new_tokens=12, eos_token_id=[])
    with torch.inference_mode():
        for i in range(12):
            prefix = out[:, : prompt_len + i]  # one forward over the prefix: long factors iff it exceeds 4096
            expected = tiny_model(input_ids=prefix).logits[0, -1].argmax().item()
            assert out[0, prompt_len + i].item() == expected, f"new token {i} (prefix of {prefix.shape[1]})"


def test_the_longrope_switch_matters_so_the_recompute_is_needed(tiny_model: Phi3VForCausalLM) -> None:
    """Decoding past 4096 on a cache built with short factors gives different logits than recomputing."""
    ids = torch.randint(3, 30000, (1, 4097), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        recomputed = tiny_model(input_ids=ids).logits[0, -1]
        prefill = tiny_model(input_ids=ids[:, :4096], use_cache=True)
        stale = tiny_model(input_ids=ids[:, 4096:], cache=prefill.cache, use_cache=True).logits[0, -1]
    assert (recomputed - stale).abs().max().item() > 1e-3


def test_prompt_plus_new_tokens_beyond_the_context_is_refused_before_any_work(
    tiny_model: Phi3VForCausalLM, tiny_processor: Phi3VProcessor
) -> None:
    inputs = tiny_processor(chat("Hi"))
    with pytest.raises(GenerationError, match="131072"):
        tiny_model.generate(**inputs, max_new_tokens=131072)


def test_unsupported_generate_arguments_are_refused_by_name(
    tiny_model: Phi3VForCausalLM, tiny_processor: Phi3VProcessor
) -> None:
    inputs = tiny_processor(chat("Hi"))
    with pytest.raises(TypeError, match="repetition_penalty"):
        tiny_model.generate(**inputs, max_new_tokens=2, repetition_penalty=1.2)
    with pytest.raises(TypeError, match="beam"):
        tiny_model.generate(**inputs, max_new_tokens=2, num_beams=3)


def test_max_length_and_generation_config_bound_the_new_tokens(
    tiny_model: Phi3VForCausalLM, tiny_processor: Phi3VProcessor
) -> None:
    inputs = tiny_processor(chat("Hi"))
    prompt_len = inputs["input_ids"].shape[1]
    assert tiny_model.generate(**inputs, max_length=prompt_len + 3, eos_token_id=[]).shape[1] == prompt_len + 3
    config = GenerationConfig(max_new_tokens=4, eos_token_id=[])
    assert tiny_model.generate(**inputs, generation_config=config).shape[1] == prompt_len + 4


def test_sampling_is_reproducible_with_a_seed_and_top_k_1_is_greedy(
    tiny_model: Phi3VForCausalLM, tiny_processor: Phi3VProcessor
) -> None:
    inputs = tiny_processor(chat("Hi"))
    greedy = tiny_model.generate(**inputs, max_new_tokens=6, eos_token_id=[])
    torch.manual_seed(7)
    first = tiny_model.generate(**inputs, max_new_tokens=6, do_sample=True, temperature=1.5, eos_token_id=[])
    torch.manual_seed(7)
    second = tiny_model.generate(**inputs, max_new_tokens=6, do_sample=True, temperature=1.5, eos_token_id=[])
    assert torch.equal(first, second)
    top1 = tiny_model.generate(**inputs, max_new_tokens=6, do_sample=True, top_k=1, eos_token_id=[])
    assert torch.equal(top1, greedy)
    zero = tiny_model.generate(**inputs, max_new_tokens=6, do_sample=True, temperature=0.0, eos_token_id=[])
    assert torch.equal(zero, greedy)


def test_a_streamer_sees_the_prompt_then_every_new_token_then_the_end(
    tiny_model: Phi3VForCausalLM, tiny_processor: Phi3VProcessor
) -> None:
    class Recorder:
        def __init__(self) -> None:
            self.values: list[list[int]] = []
            self.ended = 0

        def put(self, value: torch.Tensor) -> None:
            self.values.append(value.flatten().tolist())

        def end(self) -> None:
            self.ended += 1

    inputs = tiny_processor(chat("Hi"))
    recorder = Recorder()
    out = tiny_model.generate(**inputs, max_new_tokens=5, eos_token_id=[], streamer=recorder)
    assert recorder.values[0] == inputs["input_ids"][0].tolist()
    assert [v[0] for v in recorder.values[1:]] == out[0, inputs["input_ids"].shape[1] :].tolist()
    assert recorder.ended == 1


def test_generate_leaves_the_callers_input_ids_untouched(
    tiny_model: Phi3VForCausalLM, tiny_processor: Phi3VProcessor
) -> None:
    inputs = tiny_processor(PROMPTS[0], IMAGES[0])
    before = inputs["input_ids"].clone()
    tiny_model.generate(**inputs, max_new_tokens=2)
    assert torch.equal(inputs["input_ids"], before)  # the original clamped negative ids in place


def test_precomputed_image_features_give_the_same_tokens_as_pixels(
    tiny_model: Phi3VForCausalLM, tiny_processor: Phi3VProcessor
) -> None:
    inputs = tiny_processor(PROMPTS[2], IMAGES[2])
    with torch.inference_mode():
        features = tiny_model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
    from_pixels = tiny_model.generate(**inputs, max_new_tokens=6, eos_token_id=[])
    from_features = tiny_model.generate(
        inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        image_features=features,
        max_new_tokens=6,
        eos_token_id=[],
    )
    assert torch.equal(from_pixels, from_features)


def test_image_features_skip_the_zero_padding_crops_without_changing_results(
    tiny_model: Phi3VForCausalLM, tiny_processor: Phi3VProcessor
) -> None:
    inputs = tiny_processor(PROMPTS[0], IMAGES[0], num_crops=16)  # 320x240 -> 12 real crops of 16
    pixels = inputs["pixel_values"]
    with torch.inference_mode():
        features = tiny_model.get_image_features(pixels, inputs["image_sizes"])[0]
        all_crops = tiny_model.vision_tower(pixel_values=pixels[0]).last_hidden_state[:, 1:]
        grid_h, grid_w = (int(s) // 336 for s in inputs["image_sizes"][0])
        expected = tiny_model.image_projection(all_crops[: 1 + grid_h * grid_w], grid_h, grid_w)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)
    assert features.shape[0] == (inputs["input_ids"] == -1).sum().item()


def test_a_prompt_whose_image_runs_do_not_match_the_features_is_refused_with_both_counts(
    tiny_model: Phi3VForCausalLM, tiny_processor: Phi3VProcessor
) -> None:
    at_4 = tiny_processor(PROMPTS[0], IMAGES[0], num_crops=4)
    at_16 = tiny_processor(PROMPTS[0], IMAGES[0], num_crops=16)
    with pytest.raises(PromptError, match=r"\d+ image positions but the image yields \d+ features"):
        tiny_model(at_4["input_ids"], pixel_values=at_16["pixel_values"], image_sizes=at_16["image_sizes"])


def test_positions_count_only_attended_tokens() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert positions_from_mask(mask, 5, 0, torch.device("cpu")).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
