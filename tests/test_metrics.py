"""``GET /metrics``: Prometheus text whose numbers are the ones the requests and the engine made."""

from __future__ import annotations

import base64
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from phi3v_tools.images import ImagePolicy
from phi3v_tools.runner import Runner
from phi3v_tools.serving.app import OpenAIServer
from phi3v_tools.serving.metrics import Metrics
from tests.fakes import FakeBackend
from tests.openai_server import MODEL, Served

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def scrape(url: str, **headers: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``url/metrics``, by name and sorted labels."""
    answer = httpx.get(url + "/metrics", headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def served(tiny_runner: Runner) -> Iterator[Served]:
    with Served(tiny_runner) as running:
        yield running


def _ask(served: Served, image: Path, *, stream: bool = False, max_tokens: int = 6) -> Any:
    uri = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    content = [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "What is this?"}]
    return served.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        stream=stream,
        stream_options={"include_usage": True} if stream else None,
    )


def test_the_metrics_count_the_requests_tokens_and_engine_steps_that_were_served(
    served: Served, tiny_runner: Runner, sample_images: dict[str, Path]
) -> None:
    before = scrape(served.url)
    steps_before = tiny_runner.decode_steps
    plain = _ask(served, sample_images["chart"])
    streamed = list(_ask(served, sample_images["chart"], stream=True))
    usage = streamed[-1].usage
    with pytest.raises(Exception, match="does not exist"):
        served.client().chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
    after = scrape(served.url)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    answered = {
        (reason, stream): grew("phi3v_request_success_total", finish_reason=reason, stream=stream)
        for reason in ("stop", "length")
        for stream in ("true", "false")
    }
    assert sum(answered.values()) == 2
    assert answered[(plain.choices[0].finish_reason, "false")] >= 1
    assert answered[(streamed[-2].choices[0].finish_reason, "true")] >= 1
    assert grew("phi3v_request_failure_total", type="NotFoundError") == 1
    assert grew("phi3v_prompt_tokens_total") == plain.usage.prompt_tokens + usage.prompt_tokens
    assert grew("phi3v_generation_tokens_total") == plain.usage.completion_tokens + usage.completion_tokens
    assert grew("phi3v_cached_images_total") >= 1  # the same picture twice: the second one's features were kept
    assert grew("phi3v_e2e_request_latency_seconds_count") == 2
    assert grew("phi3v_time_to_first_token_seconds_count") == 2
    # The engine's own counters, read at the scrape: what the engine itself says it did.
    assert grew("phi3v_decode_steps_total") == tiny_runner.decode_steps - steps_before > 0
    assert grew("phi3v_engine_prompt_tokens_total") == plain.usage.prompt_tokens + usage.prompt_tokens
    assert value(after, "phi3v_batch_size_sum") == value(after, "phi3v_engine_sampled_tokens_total") > 0
    assert value(after, "phi3v_num_requests_running") == 0
    assert value(after, "phi3v_max_queue") == tiny_runner.limits.max_queue
    assert value(after, "phi3v_feature_cache_hits_total") == tiny_runner.feature_cache.hits
    assert value(after, "process_resident_memory_bytes") > 0


def test_the_batch_size_histogram_shows_requests_decoded_together(
    served: Served, tiny_runner: Runner, sample_images: dict[str, Path]
) -> None:
    before = scrape(served.url)
    threads = [
        threading.Thread(target=_ask, args=(served, sample_images[name]), kwargs={"max_tokens": 8})
        for name in ("chart", "cover", "scene_a", "scene_b")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = scrape(served.url)
    steps = value(after, "phi3v_batch_size_count") - value(before, "phi3v_batch_size_count")
    alone = value(after, "phi3v_batch_size_bucket", le="1.0") - value(before, "phi3v_batch_size_bucket", le="1.0")
    assert steps > alone  # some steps decoded more than one row (four requests arrived within the batch window)
    assert value(after, "phi3v_batch_size_bucket", le="+Inf") == value(after, "phi3v_batch_size_count")


def test_without_prometheus_client_the_server_serves_and_metrics_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import prometheus_client now fails
    server = OpenAIServer(FakeBackend(), ImagePolicy(allowed_dirs=()), MODEL)
    assert server.metrics is None
    with Served(app=server.app()) as running:
        refused = httpx.get(running.url + "/metrics", timeout=30)
        assert refused.status_code == 501
        assert "pip install" in refused.json()["error"]["message"]
        assert "prometheus-client" in refused.json()["error"]["message"]
        answer = running.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content == "a fake answer"


def test_a_scrape_while_the_engine_cannot_answer_still_gives_the_servers_own_metrics() -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("the engine is closing")

    metrics = Metrics(broken)
    metrics.responded("/v1/models", 200)
    body, _ = metrics.exposition(None)
    text = body.decode()
    assert 'phi3v_http_requests_total{code="200",surface="openai"} 1.0' in text
    assert "phi3v_decode_steps" not in text


def test_the_batch_size_histogram_has_power_of_two_buckets_up_to_the_largest_batch() -> None:
    steps = {1: 5, 3: 2, 6: 1}
    metrics = Metrics(lambda: {"decode_batch_sizes": steps, "decode_steps": 8})
    samples = {
        (s.name, s.labels.get("le")): s.value
        for family in text_string_to_metric_families(metrics.exposition(None)[0].decode())
        for s in family.samples
        if s.name.startswith("phi3v_batch_size")
    }
    assert samples[("phi3v_batch_size_bucket", "1.0")] == 5
    assert samples[("phi3v_batch_size_bucket", "2.0")] == 5
    assert samples[("phi3v_batch_size_bucket", "4.0")] == 7
    assert samples[("phi3v_batch_size_bucket", "8.0")] == 8
    assert samples[("phi3v_batch_size_bucket", "+Inf")] == 8
    assert samples[("phi3v_batch_size_count", None)] == 8
    assert samples[("phi3v_batch_size_sum", None)] == 5 + 6 + 6
