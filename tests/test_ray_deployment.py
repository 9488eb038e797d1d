"""The Ray Serve deployment without a cluster: its options from the settings, the replica's settings, the health
check's logic, the replica header, the ``serve run`` / config-file entry point and the missing-extra line.
(tests/test_ray.py runs it on a local Ray.)"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve: pip install -e '.[ray]'")

from phi3v_tools.serving import ray as ray_serving  # noqa: E402
from phi3v_tools.settings import Settings  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "servers" / "ray" / "serve_config.yaml"


def test_a_fixed_number_of_cpu_replicas_each_take_the_engine_s_batch_and_drain_for_the_grace_period() -> None:
    settings = Settings(model="tiny", replicas=3, max_batch_size=16, max_queue=40, mcp_shutdown_grace_s=25)
    options = ray_serving.deployment_options(settings)
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0}  # no GPU on this machine
    assert (options["max_ongoing_requests"], options["max_queued_requests"]) == (16, 40)
    assert options["graceful_shutdown_timeout_s"] == 25
    assert options["health_check_period_s"] == 10 and options["health_check_timeout_s"] == 30
    assert "request_router_config" not in options


def test_max_replicas_turns_on_autoscaling_on_ongoing_requests_within_the_bounds() -> None:
    settings = Settings.from_env(
        {"PHI3V_MIN_REPLICAS": "1", "PHI3V_REPLICAS": "2", "PHI3V_MAX_REPLICAS": "4", "PHI3V_UPSCALE_DELAY_S": "5"},
        model="tiny",
        max_batch_size=24,
    )
    options = ray_serving.deployment_options(settings)
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {
        "min_replicas": 1,
        "initial_replicas": 2,
        "max_replicas": 4,
        "target_ongoing_requests": 12.0,  # half the engine's batch, by default
        "upscale_delay_s": 5.0,
        "downscale_delay_s": 600.0,
    }


def test_a_replica_takes_one_gpu_when_ray_sees_gpus_and_none_for_a_cpu_device(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 32.0, "GPU": 4.0})
    assert ray_serving.replica_gpus(None, None) == 1.0
    assert ray_serving.replica_gpus(None, "cuda") == 1.0
    assert ray_serving.replica_gpus(None, "cpu") == 0.0
    assert ray_serving.replica_gpus(0.5, None) == 0.5  # PHI3V_REPLICA_GPUS: two replicas a card
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 32.0})
    assert ray_serving.replica_gpus(None, None) == 0.0
    gpu = ray_serving.replica_settings(Settings(model="tiny", replica_gpus=1))
    assert gpu.device is None and gpu.mcp_stateless  # the replica sees the GPU Ray gave it as cuda:0
    cpu = ray_serving.replica_settings(Settings(model="tiny"))
    assert cpu.device == "cpu" and cpu.mcp_stateless  # a CPU replica on a GPU box stays off the GPUs


def test_route_by_image_uses_serve_s_consistent_hash_router() -> None:
    options = ray_serving.deployment_options(Settings(model="tiny", route_by_image=True))
    assert options["request_router_config"]["request_router_class"] == ray_serving.CONSISTENT_HASH_ROUTER
    module, _, name = ray_serving.CONSISTENT_HASH_ROUTER.partition(":")
    assert hasattr(__import__(module, fromlist=[name]), name)  # the path exists in the installed Ray
    assert Settings.from_env({"PHI3V_ROUTE_BY_IMAGE": "yes"}).route_by_image
    with pytest.raises(ValueError, match="PHI3V_ROUTE_BY_IMAGE must be true or false"):
        Settings.from_env({"PHI3V_ROUTE_BY_IMAGE": "sometimes"})


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"PHI3V_MIN_REPLICAS": "3", "PHI3V_MAX_REPLICAS": "2"}, r"PHI3V_MIN_REPLICAS \(3\) <= PHI3V_REPLICAS"),
        ({"PHI3V_REPLICAS": "5", "PHI3V_MAX_REPLICAS": "4"}, r"PHI3V_REPLICAS \(5\) <= PHI3V_MAX_REPLICAS \(4\)"),
        ({"PHI3V_MIN_REPLICAS": "2"}, "PHI3V_MIN_REPLICAS needs PHI3V_MAX_REPLICAS"),
        ({"PHI3V_REPLICAS": "0"}, "PHI3V_REPLICAS must be a whole number from 1"),
        ({"PHI3V_REPLICA_CPUS": "-1"}, "PHI3V_REPLICA_CPUS must be a number from 0"),
        ({"PHI3V_HEALTH_CHECK_PERIOD_S": "0"}, "PHI3V_HEALTH_CHECK_PERIOD_S must be a number above 0"),
    ],
)
def test_replica_settings_that_cannot_work_are_refused_naming_the_variable(
    environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Settings.from_env(environ)


def test_serve_run_arguments_are_settings_fields_read_like_their_variables() -> None:
    application = ray_serving.app({"model": "tiny", "replicas": 2, "max_batch_size": "8"})
    deployment = application._bound_deployment
    assert (deployment.name, deployment.num_replicas, deployment.max_ongoing_requests) == ("Phi3VServer", 2, 8)
    with pytest.raises(ValueError, match="unknown settings modle, replica"):
        ray_serving.app({"modle": "tiny", "replica": 2})
    with pytest.raises(ValueError, match="PHI3V_MAX_BATCH_SIZE must be a whole number"):
        ray_serving.app({"max_batch_size": "many"})
    with pytest.raises(ValueError, match="unset PHI3V_BACKEND"):
        ray_serving.build(Settings(backend="openai", base_url="http://gpu-box:8000/v1"))


def test_the_shipped_serve_config_is_valid_for_ray_and_builds_the_app() -> None:
    import yaml
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))
    (application,) = config.applications
    assert application.import_path == "phi3v_tools.serving.ray:app"
    args = dict(application.args or {})
    args["model"] = "tiny"  # the real checkpoint is not needed to build the application
    built = ray_serving.app(args)
    assert built._bound_deployment.name == application.deployments[0].name


# -- the health check ----------------------------------------------------------------------------------------------


class FakeRunner:
    """What check_health reads of an engine: its counters, and a generate() that can be made to stall or fail."""

    def __init__(self) -> None:
        self.closed = False
        self.counters = {"queue": 0, "prefilling": 0, "running": 0, "prompt_tokens": 0, "sampled_tokens": 0}
        self.probes: list[Any] = []
        self.stall = False

    def close(self) -> None:
        self.closed = True

    def info(self) -> dict[str, int]:
        return dict(self.counters)

    async def generate(self, request: Any) -> Any:
        self.probes.append(request)
        if self.stall:
            await asyncio.sleep(3600)
        self.counters["prompt_tokens"] += 3
        self.counters["sampled_tokens"] += 1


def replica(runner: FakeRunner) -> Any:
    server = object.__new__(ray_serving.Replica)
    server.runner, server.settings, server.replica, server._progress = runner, Settings(model="tiny"), "r1", None
    return server


def test_an_idle_replica_s_health_check_generates_one_token() -> None:
    runner = FakeRunner()
    asyncio.run(replica(runner).check_health())
    (probe,) = runner.probes
    assert probe.max_new_tokens == 1 and probe.timeout_s == 30


def test_a_busy_replica_that_made_progress_is_healthy_without_queueing_a_probe_behind_its_batch() -> None:
    runner = FakeRunner()
    server = replica(runner)
    asyncio.run(server.check_health())  # idle: one probe
    runner.counters.update(running=32, queue=20)
    for _step in range(3):
        runner.counters["sampled_tokens"] += 32  # decoding
        asyncio.run(server.check_health())
    assert len(runner.probes) == 1


def test_a_busy_replica_that_stopped_making_progress_fails_its_health_check() -> None:
    runner = FakeRunner()
    server = replica(runner)
    runner.counters.update(running=32)
    runner.counters["sampled_tokens"] = 100
    asyncio.run(server.check_health())  # the first look: no earlier progress to compare with, so it probes
    runner.stall = True  # wedged: the counters no longer move and a probe never finishes

    async def check() -> None:
        await asyncio.wait_for(server.check_health(), 0.5)  # Serve's health_check_timeout_s, shortened

    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(check())
    runner.closed = True
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(server.check_health())


def test_every_http_response_names_its_replica() -> None:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    inner = Starlette(routes=[Route("/x", lambda request: PlainTextResponse("hi"))])
    client = TestClient(ray_serving.ReplicaHeader(inner, "abc123"))
    response = client.get("/x")
    assert (response.text, response.headers[ray_serving.REPLICA_HEADER]) == ("hi", "abc123")
    assert client.get("/missing").headers[ray_serving.REPLICA_HEADER] == "abc123"


HIDE_RAY = """
import importlib.machinery, runpy, sys
class Without(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.partition(".")[0] == "ray" else super().find_spec(name, path, target)
sys.meta_path[:] = [Without if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
sys.argv = ["phi3v-tools", *sys.argv[1:]]
runpy.run_module("phi3v_tools.cli", run_name="__main__")
"""


def test_replicas_without_the_ray_extra_is_one_line_with_the_install_command(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", HIDE_RAY, "serve", "--replicas", "2", "--model", "tiny"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "needs the 'ray' package" in lines[0] and "pip install 'ray[serve]" in lines[0], lines[0]
