"""The engine under continuous batching: joins, admission limits, chunked prefill, vision batching, shutdown."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from phi3v_tools import runner as runner_module
from phi3v_tools.engine import scheduler
from phi3v_tools.engine.model_runner import Prefill, PromptGroup, RunningBatch
from phi3v_tools.errors import CancelledError, GenerationError, OutOfMemoryError
from phi3v_tools.model import Phi3VForCausalLM, Phi3VProcessor
from phi3v_tools.runner import GenerationRequest, GenerationResult, RequestHandle, Runner, get_runner
from phi3v_tools.settings import Settings

SCHEMA = {
    "type": "object",
    "properties": {"kind": {"type": "string", "enum": ["photo", "chart"]}, "n": {"type": "integer"}},
    "required": ["kind", "n"],
}


def picture(seed: int, size: tuple[int, int] = (300, 200)) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


@pytest.fixture
def own_runner(tiny_model: Phi3VForCausalLM, tiny_processor: Phi3VProcessor, tiny_dir: Path) -> Iterator[Any]:
    made: list[Runner] = []

    def make(**settings: Any) -> Runner:
        runner = Runner(tiny_model, tiny_processor, Settings(model=str(tiny_dir), **{"batch_window_ms": 1, **settings}))
        made.append(runner)
        return runner

    yield make
    for runner in made:
        runner.close()


def mixed_requests(rng: random.Random) -> list[GenerationRequest]:
    """Images (cached and not, several crop counts), schemas, seeded sampling, short and long answers."""
    return [
        GenerationRequest.from_text("Describe it.", [picture(1)], max_new_tokens=rng.randint(5, 30), num_crops=4),
        GenerationRequest.from_text("Hello, how are you?", max_new_tokens=rng.randint(3, 25)),
        GenerationRequest.from_text("Which kind?", [picture(2)], json_schema=SCHEMA, max_new_tokens=30, num_crops=1),
        GenerationRequest.from_text("A story.", max_new_tokens=rng.randint(5, 30), temperature=0.9, seed=7),
        GenerationRequest.from_text("Compare.", [picture(3), picture(1)], max_new_tokens=12, num_crops=1),
        GenerationRequest.from_text("Nucleus.", max_new_tokens=15, temperature=1.2, top_p=0.8, seed=11),
        GenerationRequest.from_text("Count them.", [picture(4, (640, 120))], max_new_tokens=rng.randint(2, 9)),
    ]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_requests_joining_at_random_steps_get_exactly_their_tokens_alone(own_runner: Any, seed: int) -> None:
    """A long driver row decodes while the others join at random decode steps; companions finish, one row is
    cancelled mid-answer; every answered row has exactly its text (and token count) alone."""
    runner = own_runner()
    rng = random.Random(seed)
    requests = mixed_requests(rng)
    alone = [runner.generate_sync(r) for r in requests]
    runner.feature_cache.clear()  # the joining rows' images must go through the vision tower again
    joins = sorted(rng.sample(range(1, 60), len(requests)))
    handles: list[RequestHandle] = []
    victim_box: list[RequestHandle] = []
    submitted = threading.Event()

    def driver_text(_piece: str) -> None:  # the engine thread: submits at the chosen decode steps
        steps = runner.decode_steps
        while len(handles) < len(requests) and joins[len(handles)] <= steps:
            handles.append(runner.submit(requests[len(handles)]))
            if len(handles) == 3:
                victim = GenerationRequest.from_text("Ramble.", max_new_tokens=50)
                victim.on_text = lambda _p: victim_box[0].cancel() if len(victim_box[0].streamed) > 3 else None
                victim_box.append(runner.submit(victim))
        if len(handles) == len(requests):
            submitted.set()

    driver = GenerationRequest.from_text("Go on and on.", max_new_tokens=120, on_text=driver_text)
    driver_alone = runner.generate_sync(GenerationRequest.from_text("Go on and on.", max_new_tokens=120))
    joins_before = runner.joins
    driver_handle = runner.submit(driver)
    assert submitted.wait(60), "the driver finished before every request joined"
    got = [h.future.result(60) for h in handles]
    assert [r.text for r in got] == [r.text for r in alone]
    assert [r.completion_tokens for r in got] == [r.completion_tokens for r in alone]
    assert got[2].parsed == alone[2].parsed
    assert driver_handle.future.result(60).text == driver_alone.text
    with pytest.raises(CancelledError):
        victim_box[0].future.result(60)
    assert runner.joins - joins_before >= len(requests) // 2  # they really joined a running batch


def test_a_short_request_behind_two_long_ones_waits_no_more_than_a_few_steps(own_runner: Any) -> None:
    """It is admitted at the next step, prefilled in one chunk and decoded beside the long rows: it finishes within
    its own token count plus two steps, while both long answers are still running."""
    runner = own_runner()
    started = threading.Event()
    long_requests = [
        GenerationRequest.from_text(f"Long answer {i}.", max_new_tokens=400, on_text=lambda _p: started.set())
        for i in range(2)
    ]
    long_handles = [runner.submit(r) for r in long_requests]
    assert started.wait(30)
    while len(runner._running) < 2:
        time.sleep(0.01)
    steps_at_submit = runner.decode_steps
    short = runner.submit(GenerationRequest.from_text("Short.", max_new_tokens=8))
    result = short.future.result(60)
    steps = runner.decode_steps - steps_at_submit
    assert result.completion_tokens == 8
    assert steps <= 8 + 2, steps
    assert not any(h.future.done() for h in long_handles)
    for h in long_handles:
        h.cancel()


def test_the_kv_budget_bounds_the_padded_cache_and_requests_wait_for_room(own_runner: Any) -> None:
    budget = 2 * (40 + 30)  # room for two rows of ~40 prompt tokens + 30 new ones
    runner = own_runner(max_batch_tokens=budget)
    seen: list[int] = []
    original = RunningBatch.step

    def record(self: RunningBatch, tokens: list[int]) -> None:
        seen.append(self.rows * (self.length + 1))
        original(self, tokens)

    requests = [GenerationRequest.from_text(f"Question number {i}, please.", max_new_tokens=30) for i in range(5)]
    alone = [runner.generate_sync(r).text for r in requests]
    RunningBatch.step = record  # type: ignore[method-assign]
    try:
        handles = [runner.submit(r) for r in requests]
        texts = [h.future.result(60).text for h in handles]
    finally:
        RunningBatch.step = original  # type: ignore[method-assign]
    assert texts == alone
    assert max(seen) <= budget and max(seen) > budget // 2  # two rows shared steps, never a third


def test_a_long_prompt_is_prefilled_in_chunks_between_the_running_rows_steps(own_runner: Any) -> None:
    runner = own_runner(prefill_chunk_tokens=256)
    per_step: list[int] = []
    original_prefill, original_run = runner._prefill, Prefill.run
    ran: list[int] = []

    def prefill() -> None:
        ran.clear()
        original_prefill()
        per_step.append(sum(ran))

    def run(self: Prefill, tokens: int) -> None:
        ran.append(tokens)
        original_run(self, tokens)

    runner._prefill = prefill
    Prefill.run = run  # type: ignore[method-assign]
    try:
        started = threading.Event()
        running = runner.submit(
            GenerationRequest.from_text("Keep going.", max_new_tokens=200, on_text=lambda _p: started.set())
        )
        assert started.wait(30)
        steps_before = runner.decode_steps
        long_prompt = runner.submit(GenerationRequest.from_text("Look.", [picture(9)], num_crops=16, max_new_tokens=2))
        result = long_prompt.future.result(60)
        steps_during = runner.decode_steps - steps_before
    finally:
        Prefill.run = original_run  # type: ignore[method-assign]
    assert result.prompt_tokens > 1500
    assert max(per_step) <= 256  # never more than one chunk between two decode steps
    assert steps_during >= result.prompt_tokens // 256  # the running row kept decoding meanwhile
    assert not running.future.done()
    running.cancel()


def test_the_uncached_images_of_requests_admitted_together_go_through_the_vision_tower_as_one_batch(
    own_runner: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = own_runner(batch_window_ms=300)
    calls: list[int] = []
    original = runner.model.get_image_features

    def spy(pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
        calls.append(len(pixel_values))
        return original(pixel_values, image_sizes)

    monkeypatch.setattr(runner.model, "get_image_features", spy)
    handles = [
        runner.submit(GenerationRequest.from_text("A.", [picture(21)], num_crops=4, max_new_tokens=2)),
        runner.submit(GenerationRequest.from_text("B.", [picture(22), picture(21)], num_crops=4, max_new_tokens=2)),
        runner.submit(GenerationRequest.from_text("C.", [picture(23)], num_crops=4, max_new_tokens=2)),
    ]
    results = [h.future.result(30) for h in handles]
    assert calls == [3]  # three distinct images, one forward pass (the repeated one encoded once)
    assert [r.cached_images for r in results] == [0, 0, 0]


def test_a_request_that_crosses_the_longrope_switch_never_shares_a_decode_step(own_runner: Any) -> None:
    runner = own_runner(batch_window_ms=200)
    runner.preparer.alone_above = 60  # as if 60 positions were the 4096-position switch
    shared: list[int] = []
    original = runner._decode

    def record() -> None:
        if any(row.crosses_switch for row in runner._running):
            shared.append(len(runner._running))
        original()

    runner._decode = record
    crossing = GenerationRequest.from_text("Crossing the switch.", max_new_tokens=60)
    short = [GenerationRequest.from_text(f"Short {i}.", max_new_tokens=5) for i in range(3)]
    handles = [runner.submit(r) for r in (short[0], crossing, *short[1:])]
    results: list[GenerationResult] = [h.future.result(60) for h in handles]
    assert shared and set(shared) == {1}
    assert all(r.completion_tokens >= 1 for r in results)


def test_closing_fails_every_request_in_flight_with_cancelled_and_stops_the_loop(own_runner: Any) -> None:
    runner = own_runner()
    started = threading.Event()
    running = runner.submit(GenerationRequest.from_text("Run.", max_new_tokens=500, on_text=lambda _p: started.set()))
    assert started.wait(30)
    waiting = [runner.submit(GenerationRequest.from_text(f"w{i}", max_new_tokens=300)) for i in range(3)]
    runner.close()
    for handle in (running, *waiting):
        with pytest.raises(CancelledError):
            handle.future.result(5)
    assert not runner._worker.is_alive()


def test_an_interpreter_exiting_while_the_engine_generates_exits_cleanly(tiny_dir: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys, threading
        from phi3v_tools.runner import GenerationRequest, get_runner
        from phi3v_tools.settings import Settings
        runner = get_runner(Settings(model={str(tiny_dir)!r}), progress=False)
        started = threading.Event()
        runner.submit(GenerationRequest.from_text("Run.", max_new_tokens=1000, on_text=lambda _p: started.set()))
        started.wait(60)
        sys.exit(3)
        """
    )
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert done.returncode == 3, done.stderr[-2000:]
        assert "terminate called" not in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]


def test_two_toolkits_that_differ_only_in_allowed_directories_share_one_runner(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from phi3v_tools.langchain import Phi3VisionToolkit

    monkeypatch.setattr(runner_module, "_RUNNERS", {})
    base = Settings(model=str(tiny_dir))
    other = Settings(model=str(tiny_dir), allowed_dirs=(tmp_path,), max_queue=7, mcp_port=9999)
    first = Phi3VisionToolkit(settings=base).toolbox
    second = Phi3VisionToolkit(settings=other).toolbox
    assert first is not None and second is not None
    try:
        assert first.backend is second.backend
        assert first.backend is get_runner(Settings(model=str(tiny_dir), allow_urls=False))
        assert get_runner(Settings(model=str(tiny_dir), dtype="bfloat16")) is not first.backend  # another load
    finally:
        runner_module.close_runners()


# ---------------------------------------------------------------------------------------------------------------------
# The scheduler's policy, without a model


class Item:
    def __init__(self, budget: int, alone: bool = False) -> None:
        self.budget = budget
        self.alone = alone


LIMITS = scheduler.AdmissionLimits(max_rows=3, kv_tokens=3000)


def test_admission_is_a_first_come_prefix_within_rows_and_the_padded_kv_budget() -> None:
    assert scheduler.admit([Item(500)] * 5, [], LIMITS) == 3  # rows
    assert scheduler.admit([Item(1000), Item(1000), Item(1000)], [], LIMITS) == 3  # 3 x 1000 fits exactly
    assert scheduler.admit([Item(1000), Item(1001)], [Item(100)], LIMITS) == 1  # 3 x 1001 would not
    assert scheduler.admit([Item(2000), Item(10)], [Item(10)], LIMITS) == 0  # no overtaking the oldest
    assert scheduler.admit([Item(9000)], [], LIMITS) == 1  # an idle engine takes anything that passed submission


def test_a_row_that_must_run_alone_waits_for_an_empty_batch_and_keeps_others_out() -> None:
    assert scheduler.admit([Item(10, alone=True)], [Item(10)], LIMITS) == 0
    assert scheduler.admit([Item(10, alone=True), Item(10)], [], LIMITS) == 1
    assert scheduler.admit([Item(10)], [Item(10, alone=True)], LIMITS) == 0


def test_an_unset_kv_budget_is_what_memory_holds_between_one_and_max_rows_full_contexts() -> None:
    # Phi-3-vision in bf16: 32 layers x keys and values x 32 heads x 96 dims x 2 bytes = 384 KiB a position
    per_token = 2 * 32 * 32 * 96 * 2
    assert scheduler.kv_budget_tokens(per_token, 6 * 2**30, max_rows=16, max_context=4096) == 16384
    assert scheduler.kv_budget_tokens(per_token, 64 * 2**30, max_rows=16, max_context=4096) == 16 * 4096
    assert scheduler.kv_budget_tokens(per_token, 2**20, max_rows=16, max_context=4096) == 4096  # one request
    assert scheduler.kv_budget_tokens(0, 2**30, max_rows=2, max_context=100) == 200


def test_the_engine_sizes_an_unset_kv_budget_from_the_models_bytes_per_position(tiny_runner: Any) -> None:
    from phi3v_tools.engine import model_runner

    text = tiny_runner.model.config.text_config
    expected = 2 * text.num_hidden_layers * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads)
    assert model_runner.kv_bytes_per_token(tiny_runner.model) == expected * 4  # float32 on CPU
    limits = tiny_runner.limits
    assert limits.max_batch_tokens is None
    assert tiny_runner.info()["kv_budget_tokens"] == scheduler.kv_budget_tokens(
        expected * 4, scheduler.KV_HOST_BYTES, limits.max_batch_size, limits.max_context
    )


def test_prefill_chunks_are_cut_at_fixed_offsets_and_the_first_always_runs() -> None:
    assert scheduler.prefill_plan([1300], 512, 512) == [512]
    assert scheduler.prefill_plan([100, 300, 200], 512, 512) == [100, 300]  # 200 more would pass the budget
    assert scheduler.prefill_plan([100, 412, 5], 512, 512) == [100, 412]
    assert scheduler.prefill_plan([2000, 10], 256, 100) == [256]  # one chunk even above a small budget


def test_the_plain_mask_kernel_masks_exactly_what_llguidance_does() -> None:
    import llguidance.torch as llgt

    from phi3v_tools.grammar import apply_bitmask

    generator = torch.Generator().manual_seed(0)
    for rows, vocab in ((1, 32064), (5, 32064), (3, 32100)):  # 32100: logits wider than the mask
        mask = llgt.allocate_token_bitmask(rows, 32064)
        mask.copy_(torch.randint(-(2**31), 2**31 - 1, mask.shape, dtype=torch.int32, generator=generator))
        logits = torch.randn(rows, vocab, generator=generator)
        expected, got = logits.clone(), logits.clone()
        llgt.apply_token_bitmask_inplace(expected, mask)
        apply_bitmask(got, mask)
        assert torch.equal(expected, got)


def test_short_prompts_admitted_together_are_prefilled_in_one_pass_with_the_same_answers(
    own_runner: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = own_runner(batch_window_ms=300, max_batch_size=16)
    requests = [GenerationRequest.from_text(f"Short question {i}?" * (1 + i % 3), max_new_tokens=6) for i in range(12)]
    alone = [runner.generate_sync(r).text for r in requests]
    groups: list[int] = []
    original = PromptGroup.run

    def counted(self: PromptGroup) -> Any:
        groups.append(len(self.prefills))
        return original(self)

    monkeypatch.setattr(PromptGroup, "run", counted)
    handles = [runner.submit(r) for r in requests]
    assert [h.future.result(30).text for h in handles] == alone
    assert groups and max(groups) >= 6, groups  # one pass for many prompts


def test_a_failed_group_prefill_falls_back_to_one_prompt_at_a_time(
    own_runner: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = own_runner(batch_window_ms=300)
    requests = [GenerationRequest.from_text(f"Question {i}?", max_new_tokens=4) for i in range(4)]
    alone = [runner.generate_sync(r).text for r in requests]

    def broken(self: PromptGroup) -> Any:
        raise RuntimeError("injected group failure")

    monkeypatch.setattr(PromptGroup, "run", broken)
    handles = [runner.submit(r) for r in requests]
    assert [h.future.result(30).text for h in handles] == alone


def test_a_failed_join_fails_only_the_joining_row_and_the_running_one_finishes(
    own_runner: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = own_runner()
    started = threading.Event()
    running = runner.submit(GenerationRequest.from_text("Run.", max_new_tokens=40, on_text=lambda _p: started.set()))
    assert started.wait(30)
    original = RunningBatch.join_rows

    def broken(self: RunningBatch, *args: Any) -> None:
        if self.rows:
            raise torch.OutOfMemoryError("injected while merging caches")
        original(self, *args)

    monkeypatch.setattr(RunningBatch, "join_rows", broken)
    joining = runner.submit(GenerationRequest.from_text("Join.", max_new_tokens=5))
    with pytest.raises(OutOfMemoryError, match="num_crops"):
        joining.future.result(30)
    assert running.future.result(30).completion_tokens == 40


def test_a_vanishing_temperature_samples_near_greedily_and_a_row_whose_sampling_fails_fails_alone(
    own_runner: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = own_runner(batch_window_ms=300)
    greedy = GenerationRequest.from_text("Hello there.", max_new_tokens=12)
    expected = runner.generate_sync(greedy).text
    tiny = runner.generate_sync(GenerationRequest.from_text("Hello there.", max_new_tokens=12, temperature=1e-300))
    assert tiny.text == expected  # 1e-300 samples as 1e-5: the greedy answer, not a division by zero
    from phi3v_tools.engine import sampler

    def broken(logits: torch.Tensor, row: Any) -> int:
        raise RuntimeError("probability tensor contains inf")

    monkeypatch.setattr(sampler, "_sample", broken)
    companion = runner.submit(GenerationRequest.from_text("Hello there.", max_new_tokens=12))
    bad = runner.submit(GenerationRequest.from_text("Sample.", max_new_tokens=12, temperature=0.7, seed=1))
    with pytest.raises(GenerationError, match="sampling"):
        bad.future.result(30)
    assert companion.future.result(30).text == expected
    assert runner.info()["batches"] >= 1


def test_cancelling_the_future_itself_stops_the_request(own_runner: Any) -> None:
    runner = own_runner()
    started = threading.Event()
    handle = runner.submit(GenerationRequest.from_text("Run.", max_new_tokens=800, on_text=lambda _p: started.set()))
    assert started.wait(30)
    assert handle.future.cancel() or handle.future.done()
    deadline = time.perf_counter() + 10
    while runner._running and time.perf_counter() < deadline:
        time.sleep(0.01)
    assert not runner._running  # it left the batch, well before its 800 tokens
    assert runner.generate_sync(GenerationRequest.from_text("next", max_new_tokens=2)).completion_tokens == 2


def test_a_model_that_is_loading_does_not_hold_up_callers_of_another(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    release = threading.Event()

    class SlowRunner:
        closed = False

        @classmethod
        def load(cls, settings: Settings, *, progress: bool = True) -> SlowRunner:
            if settings.model == "slow":
                release.wait(10)
            return cls()

        def close(self) -> None:
            pass

    monkeypatch.setattr(runner_module, "Runner", SlowRunner)
    monkeypatch.setattr(runner_module, "_RUNNERS", {})
    slow = threading.Thread(target=get_runner, args=(Settings(model="slow", cache_dir=tmp_path),))
    slow.start()
    try:
        time.sleep(0.1)  # the slow load is under way
        started = time.perf_counter()
        other = get_runner(Settings(model="quick", cache_dir=tmp_path))
        assert time.perf_counter() - started < 1.0 and isinstance(other, SlowRunner)
    finally:
        release.set()
        slow.join(10)
