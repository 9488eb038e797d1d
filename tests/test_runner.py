"""The shared runner: batching, the feature cache, limits, cancellation, faults, concurrency."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from phi3v_tools import runner as runner_module
from phi3v_tools.engine.model_runner import RunningBatch
from phi3v_tools.errors import (
    BusyError,
    CancelledError,
    GenerationError,
    OutOfMemoryError,
    PromptError,
    RequestTimeoutError,
)
from phi3v_tools.feature_cache import CachedFeatures, FeatureCache, image_digest
from phi3v_tools.model import Phi3VForCausalLM, Phi3VProcessor
from phi3v_tools.runner import GenerationRequest, Runner, TextDeltas, get_runner
from phi3v_tools.settings import Settings
from tests.conftest import REFERENCE, needs_reference


def picture(seed: int, size: tuple[int, int] = (300, 200)) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def requests() -> list[GenerationRequest]:
    return [
        GenerationRequest.from_text("Describe this.", [picture(1)], max_new_tokens=12),
        GenerationRequest.from_text("Hello there, how are you today?", max_new_tokens=7),
        GenerationRequest.from_text("Compare them.", [picture(2), picture(3, (200, 400))], max_new_tokens=10),
        GenerationRequest.from_text("Short.", max_new_tokens=3),
        GenerationRequest.from_text("Read the text.", [picture(4, (640, 100))], max_new_tokens=9, num_crops=1),
    ]


@pytest.fixture
def own_runner(tiny_model: Phi3VForCausalLM, tiny_processor: Phi3VProcessor, tiny_dir: Path) -> Iterator[Any]:
    """A fresh runner with its own settings (and so its own queue, counters and cache)."""
    made: list[Runner] = []

    def make(**settings: Any) -> Runner:
        runner = Runner(tiny_model, tiny_processor, Settings(model=str(tiny_dir), **settings))
        made.append(runner)
        return runner

    yield make
    for runner in made:
        runner.close()


def test_concurrent_requests_are_batched_and_give_the_same_greedy_text_as_alone(tiny_runner: Runner) -> None:
    alone = [tiny_runner.generate_sync(r) for r in requests()]
    batches_before = tiny_runner.batches

    async def together() -> list[Any]:
        return list(await asyncio.gather(*(tiny_runner.generate(r) for r in requests())))

    batched = asyncio.run(together())
    assert tiny_runner.batches - batches_before < len(batched)  # really shared batches
    for a, b in zip(alone, batched, strict=True):
        assert (b.text, b.completion_tokens, b.prompt_tokens) == (a.text, a.completion_tokens, a.prompt_tokens)


def test_callers_on_many_threads_each_get_their_own_answer(tiny_runner: Runner) -> None:
    expected = [tiny_runner.generate_sync(r).text for r in requests()]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda r: tiny_runner.generate_sync(r).text, requests() * 2))
    assert results == expected * 2


def test_result_reports_tokens_and_timings(tiny_runner: Runner) -> None:
    result = tiny_runner.generate_sync(
        GenerationRequest.from_text("Describe.", [picture(11)], max_new_tokens=5, num_crops=4)
    )
    assert result.image_tokens == 757
    assert result.prompt_tokens > result.image_tokens
    assert result.completion_tokens == 5 and result.finish_reason == "length"
    t = result.timings
    assert t.preprocess_s > 0 and t.vision_s > 0 and t.prefill_s > 0 and t.decode_s > 0
    assert t.total_s >= t.queue_s + t.prefill_s
    assert result.tokens_per_s > 0


def test_a_repeated_image_skips_preprocessing_and_the_vision_tower(tiny_runner: Runner) -> None:
    image = picture(21)
    first = tiny_runner.generate_sync(GenerationRequest.from_text("Describe.", [image], max_new_tokens=4))
    hits = tiny_runner.feature_cache.hits
    second = tiny_runner.generate_sync(GenerationRequest.from_text("Describe.", [image], max_new_tokens=4))
    assert (first.cached_images, second.cached_images) == (0, 1)
    assert second.timings.vision_s == 0.0
    assert tiny_runner.feature_cache.hits == hits + 1
    assert second.text == first.text


def test_the_same_pixels_in_another_file_format_hit_the_cache(tiny_runner: Runner) -> None:
    image = picture(22)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    reopened = Image.open(io.BytesIO(buffer.getvalue()))
    assert image_digest(reopened) == image_digest(image)
    tiny_runner.generate_sync(GenerationRequest.from_text("A.", [image], max_new_tokens=1))
    again = tiny_runner.generate_sync(GenerationRequest.from_text("A.", [reopened], max_new_tokens=1))
    assert again.cached_images == 1


def test_different_images_or_crop_counts_never_share_a_cache_entry(tiny_runner: Runner) -> None:
    a, b = picture(31), picture(32)  # same size, different pixels
    assert image_digest(a) != image_digest(b)
    one_pixel_changed = a.copy()
    one_pixel_changed.putpixel((0, 0), (0, 0, 0) if a.getpixel((0, 0)) != (0, 0, 0) else (1, 1, 1))
    assert image_digest(one_pixel_changed) != image_digest(a)
    tiny_runner.generate_sync(GenerationRequest.from_text("A.", [a], max_new_tokens=1, num_crops=4))
    for image, crops in ((b, 4), (a, 1), (one_pixel_changed, 4)):
        result = tiny_runner.generate_sync(
            GenerationRequest.from_text("A.", [image], max_new_tokens=1, num_crops=crops)
        )
        assert result.cached_images == 0
    cached = tiny_runner.generate_sync(GenerationRequest.from_text("A.", [a], max_new_tokens=1, num_crops=1))
    assert cached.cached_images == 1 and cached.image_tokens == 313


def test_the_feature_cache_evicts_least_recently_used_entries_by_bytes() -> None:
    cache = FeatureCache(max_bytes=3 * 400)
    entry = CachedFeatures(torch.zeros(100, dtype=torch.float32), (1, 1))  # 400 bytes each
    for key in "abc":
        cache.put(key, entry)
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", entry)
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("d") is not None
    assert cache.stats()["bytes"] == 1200 and cache.stats()["evictions"] == 1
    cache.put("huge", CachedFeatures(torch.zeros(1000), (1, 1)))  # bigger than the cache: not stored
    assert cache.get("huge") is None and cache.stats()["entries"] == 3


def test_a_full_queue_answers_busy_at_once(own_runner: Any) -> None:
    runner = own_runner(max_queue=1)
    release = threading.Event()
    original = runner._step

    def held() -> float:
        release.wait(10)
        return original()

    runner._step = held  # the engine stops taking requests in
    first = runner.submit(GenerationRequest.from_text("one", max_new_tokens=1))
    started = time.perf_counter()
    with pytest.raises(BusyError, match="busy"):
        runner.submit(GenerationRequest.from_text("two", max_new_tokens=1))
    assert time.perf_counter() - started < 0.1
    release.set()
    assert first.future.result(10).completion_tokens == 1
    assert runner.generate_sync(GenerationRequest.from_text("three", max_new_tokens=1)).completion_tokens == 1


def test_a_request_past_its_timeout_fails_and_the_runner_goes_on(tiny_runner: Runner) -> None:
    with pytest.raises(RequestTimeoutError):
        tiny_runner.generate_sync(GenerationRequest.from_text("slow", max_new_tokens=200, timeout_s=0.0))
    assert tiny_runner.generate_sync(GenerationRequest.from_text("next", max_new_tokens=2)).completion_tokens == 2


def test_cancelling_stops_generation_within_one_decode_step(own_runner: Any) -> None:
    runner = own_runner()
    steps_at_cancel: list[int] = []
    seen: list[str] = []
    handle_box: list[Any] = []

    def on_text(delta: str) -> None:
        seen.append(delta)
        if len(seen) == 3 and not steps_at_cancel:
            steps_at_cancel.append(runner.decode_steps)
            handle_box[0].cancel()

    request = GenerationRequest.from_text("ramble on", max_new_tokens=500, on_text=on_text)
    handle_box.append(runner.submit(request))
    with pytest.raises(CancelledError):
        handle_box[0].future.result(30)
    assert runner.decode_steps - steps_at_cancel[0] <= 1
    assert runner.generate_sync(GenerationRequest.from_text("next", max_new_tokens=2)).completion_tokens == 2


def test_cancelling_the_awaiting_task_cancels_the_request(own_runner: Any) -> None:
    runner = own_runner()

    async def scenario() -> tuple[int, int]:
        first_text = asyncio.Event()
        loop = asyncio.get_running_loop()
        request = GenerationRequest.from_text(
            "ramble", max_new_tokens=1000, on_text=lambda _d: loop.call_soon_threadsafe(first_text.set)
        )
        task = asyncio.create_task(runner.generate(request))
        await first_text.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.3)
        settled = runner.decode_steps
        await asyncio.sleep(0.3)
        return settled, runner.decode_steps

    settled, later = asyncio.run(scenario())
    assert settled == later  # nothing is generating any more
    assert settled < 1000


def test_a_cancelled_row_leaves_the_batch_and_its_companions_are_unchanged(own_runner: Any) -> None:
    runner = own_runner(batch_window_ms=200)
    companion = GenerationRequest.from_text("Hello there, how are you today?", max_new_tokens=20)
    expected = runner.generate_sync(companion).text
    box: list[Any] = []
    victim = GenerationRequest.from_text("ramble", max_new_tokens=20, on_text=lambda _d: box[0].cancel())
    box.append(runner.submit(victim))
    other = runner.submit(GenerationRequest.from_text("Hello there, how are you today?", max_new_tokens=20))
    with pytest.raises(CancelledError):
        box[0].future.result(30)
    assert other.future.result(30).text == expected


def test_out_of_memory_in_a_shared_step_reruns_each_row_alone_with_the_same_answer(
    own_runner: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = own_runner(batch_window_ms=200)
    sizes: list[int] = []
    original = RunningBatch.step

    def fragile(self: RunningBatch, tokens: list[int]) -> None:
        sizes.append(self.rows)
        if self.rows > 1:
            raise torch.OutOfMemoryError("injected")
        original(self, tokens)

    expected = [runner.generate_sync(r).text for r in requests()[:4]]
    monkeypatch.setattr(RunningBatch, "step", fragile)

    async def together() -> list[Any]:
        return list(await asyncio.gather(*(runner.generate(r) for r in requests()[:4])))

    results = asyncio.run(together())
    assert [r.text for r in results] == expected
    assert max(sizes) > 1  # a shared step failed, and every row still got its own answer


def test_a_single_request_that_does_not_fit_fails_clearly_and_the_runner_keeps_serving(
    own_runner: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = own_runner()
    original = RunningBatch.step
    calls = {"n": 0}

    def oom_once(self: RunningBatch, tokens: list[int]) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("injected")
        original(self, tokens)

    monkeypatch.setattr(RunningBatch, "step", oom_once)
    with pytest.raises(OutOfMemoryError, match="num_crops"):
        runner.generate_sync(GenerationRequest.from_text("big", max_new_tokens=2))
    assert runner.generate_sync(GenerationRequest.from_text("next", max_new_tokens=2)).completion_tokens == 2


def test_an_exception_inside_the_model_fails_the_batch_cleanly(own_runner: Any, monkeypatch: Any) -> None:
    runner = own_runner()
    model = runner.model
    original = model.language_model.forward
    state = {"raise": True}

    def broken(*args: Any, **kwargs: Any) -> Any:
        if state["raise"]:
            raise RuntimeError("injected failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(model.language_model, "forward", broken)
    with pytest.raises(GenerationError, match="injected failure"):
        runner.generate_sync(GenerationRequest.from_text("x", max_new_tokens=2))
    state["raise"] = False
    assert runner.generate_sync(GenerationRequest.from_text("y", max_new_tokens=2)).completion_tokens == 2


def test_limits_are_checked_when_submitting(own_runner: Any) -> None:
    runner = own_runner(max_images=2, max_compare=2, max_new_tokens=50, max_context=1000)
    with pytest.raises(PromptError, match="at most 2"):
        runner.submit(GenerationRequest.from_text("x", [picture(1)] * 3))
    with pytest.raises(PromptError, match="between 1 and 50"):
        runner.submit(GenerationRequest.from_text("x", max_new_tokens=0))
    assert runner.submit(GenerationRequest.from_text("x", max_new_tokens=51)).max_new_tokens == 50  # capped
    with pytest.raises(PromptError, match="num_crops"):
        runner.submit(GenerationRequest.from_text("x", [picture(1)], num_crops=17))
    with pytest.raises(PromptError, match="1000-token limit"):  # 757 image tokens at num_crops 4, twice
        runner.generate_sync(GenerationRequest.from_text("x", [picture(1), picture(2)], max_new_tokens=10))


def test_streamed_pieces_add_up_to_the_answer(tiny_runner: Runner) -> None:
    pieces: list[str] = []
    result = tiny_runner.generate_sync(
        GenerationRequest.from_text("Tell me", [picture(41)], max_new_tokens=15, on_text=pieces.append)
    )
    assert len(pieces) > 1 and "".join(pieces) == result.text


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(tiny_runner: Runner) -> None:
    def sampled(seed: int) -> GenerationRequest:
        return GenerationRequest.from_text("Tell me", max_new_tokens=10, temperature=1.0, seed=seed)

    alone = tiny_runner.generate_sync(sampled(3)).text
    assert tiny_runner.generate_sync(sampled(3)).text == alone

    async def together() -> list[Any]:
        return list(await asyncio.gather(*(tiny_runner.generate(sampled(s)) for s in (3, 4, 5))))

    assert asyncio.run(together())[0].text == alone


def test_images_without_tags_are_referenced_automatically(tiny_runner: Runner) -> None:
    untagged = tiny_runner.generate_sync(
        GenerationRequest.from_text("Compare.", [picture(51), picture(52)], max_new_tokens=3)
    )
    tagged = tiny_runner.generate_sync(
        GenerationRequest.from_text("<|image_1|>\n<|image_2|>\nCompare.", [picture(51), picture(52)], max_new_tokens=3)
    )
    assert untagged.image_tokens == 2 * 757 and untagged.text == tagged.text


def test_get_runner_loads_once_for_every_thread_and_event_loop(monkeypatch: Any, tmp_path: Path) -> None:
    loads: list[Settings] = []

    class FakeRunner:
        @classmethod
        def load(cls, settings: Settings, *, progress: bool = True) -> FakeRunner:
            loads.append(settings)
            time.sleep(0.05)
            return cls()

        def close(self) -> None:
            pass

    monkeypatch.setattr(runner_module, "Runner", FakeRunner)
    monkeypatch.setattr(runner_module, "_RUNNERS", {})
    settings = Settings(model="tiny", cache_dir=tmp_path)
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda _: get_runner(settings), range(16)))

    async def from_loop() -> Any:
        return await asyncio.to_thread(get_runner, settings)

    got.append(asyncio.run(from_loop()))
    assert len(loads) == 1 and all(r is got[0] for r in got)
    assert get_runner(Settings(model="other", cache_dir=tmp_path)) is not got[0]


def test_info_reports_the_device_dtype_attention_and_cache(tiny_runner: Runner) -> None:
    info = tiny_runner.info()
    assert info["device"] == "cpu" and info["dtype"] == "float32" and info["attn_implementation"] == "sdpa"
    assert {"hits", "misses", "bytes", "max_bytes"} <= set(info["feature_cache"])
    assert info["feature_cache"]["max_bytes"] == 512 * 2**20  # the CPU default


def test_stream_yields_the_text_as_it_is_generated_then_the_result(tiny_runner: Runner) -> None:
    async def consume() -> tuple[list[str], Any]:
        stream = tiny_runner.stream(GenerationRequest.from_text("Tell me", [picture(61)], max_new_tokens=12))
        pieces = [piece async for piece in stream]
        return pieces, stream.result

    pieces, result = asyncio.run(consume())
    assert len(pieces) > 1 and "".join(pieces) == result.text


def test_leaving_a_stream_early_cancels_its_request(own_runner: Any) -> None:
    runner = own_runner()

    async def consume() -> None:
        stream = runner.stream(GenerationRequest.from_text("ramble", max_new_tokens=1000))
        async for _piece in stream:
            break
        await asyncio.sleep(0.3)

    asyncio.run(consume())
    settled = runner.decode_steps
    time.sleep(0.3)
    assert runner.decode_steps == settled < 1000


SAMPLES = [
    "Hello there, how are you today?",
    "  leading spaces, trailing spaces  \n\nand blank lines\n",
    "Prix : 12,50 € — déjà vu, naïve café; Straße; ½ teaspoon",
    "日本語のテキストと中文字符，还有한국어 문장.",
    'emoji 🎉🚀👩‍👩‍👧 and symbols ∑∫√ and <tags> {"json": [1, 2.5, null]}',
    "def f(x):\n    return x ** 2  # code\n\t\ttabs",
]


def _deltas(tokenizer: Any, text: str) -> tuple[list[str], str]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = TextDeltas(lambda tokens: tokenizer.decode(tokens, skip_special_tokens=True))
    pieces = [stream.push(ids[: n + 1]) for n in range(len(ids))]
    return pieces, tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("text", SAMPLES)
def test_incremental_text_pieces_add_up_to_the_full_decode_with_the_tiny_tokenizer(
    tiny_processor: Phi3VProcessor, text: str
) -> None:
    pieces, full = _deltas(tiny_processor.tokenizer, text)
    assert "".join(pieces) == full
    assert all("\ufffd" not in piece for piece in pieces)  # never half a character


@needs_reference
@pytest.mark.parametrize("text", SAMPLES)
def test_incremental_text_pieces_add_up_to_the_full_decode_with_the_official_tokenizer(text: str) -> None:
    from phi3v_tools.model.processing import load_tokenizer

    tokenizer = load_tokenizer(REFERENCE / "phi-3-vision-128k-instruct")
    pieces, full = _deltas(tokenizer, text + " <|end|>")  # a special token at the end is skipped
    assert "".join(pieces) == full
    assert all("\ufffd" not in piece for piece in pieces)


def test_incremental_decoding_reads_a_short_window_not_the_whole_sequence(tiny_processor: Phi3VProcessor) -> None:
    decoded: list[int] = []

    def decode(tokens: list[int]) -> str:
        decoded.append(len(tokens))
        return str(tiny_processor.tokenizer.decode(tokens, skip_special_tokens=True))

    ids = tiny_processor.tokenizer(" ".join(["word"] * 400), add_special_tokens=False)["input_ids"]
    stream = TextDeltas(decode)
    for n in range(len(ids)):
        stream.push(ids[: n + 1])
    assert len(ids) >= 400 and max(decoded) <= 8, max(decoded)
