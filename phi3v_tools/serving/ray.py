"""``phi3v-tools serve`` on Ray Serve: one engine per replica, one replica per GPU, on one box or a cluster.

Ray Serve places the replicas, routes requests to them (its proxy, power-of-two-choices on queue length),
checks their health, replaces one that dies, autoscales on ongoing requests and drains a replica it removes.
This module only says what a replica is:

- :class:`Phi3VServer`, a Serve deployment whose replica loads this process's engine
  (:func:`~phi3v_tools.runner.get_runner`) and serves :func:`~phi3v_tools.serving.server.serving_app` over it:
  the same Starlette app as ``phi3v-tools serve`` (OpenAI API, ``/mcp``, ``/health``, ``/metrics``, its token,
  body limit and Host check), not a copy. Serve's late-bound ingress (``__serve_build_asgi_app__``) builds it on
  the replica, so nothing holding the engine is pickled. Each response names its replica in ``x-phi3v-replica``.
- MCP runs stateless under Ray (``mcp_stateless``): a streamable-HTTP session lives in one process, and the next
  request of a session may reach another replica. Progress still streams within each request.
- :meth:`Phi3VServer.check_health` proves that the engine generates: one token while the engine is idle, or, while
  it is busy, that it has made progress since the last check (a check queued behind a full batch would time out
  and have a busy replica replaced). Three failed checks in a row and Serve replaces the replica.
- The deployment's options come from :class:`~phi3v_tools.settings.ReplicaPolicy`: a replica takes one GPU when
  the cluster has GPUs (and ``replica_cpus`` CPUs), a CPU replica otherwise; a fixed number of replicas, or
  autoscaling between ``min_replicas`` and ``max_replicas`` on ``target_ongoing_requests``; at most
  ``max_batch_size`` requests on a replica at once (the engine's batch), the rest waiting at the proxy, at most
  ``max_queue`` of them (then 503); a replica being removed gets ``mcp_shutdown_grace_s`` to finish its calls.
- :func:`app` is the entry point for ``serve run phi3v_tools.serving.ray:app [field=value ...]`` and for a Serve
  config file (``import_path`` plus ``args``); :func:`serve_replicas` is ``phi3v-tools serve --replicas N``,
  which starts a local Ray (or joins ``ray_address``) and serves until SIGTERM or Ctrl-C.

Images travel in each request as bytes (the remote backend sends PNG ``data:`` URIs), and the tools side keeps
its own image store, so an ``image://sha256/`` handle never depends on which replica answered. The
image-feature cache is per replica: a repeated image is a hit on the replica that saw it before. See
``servers/ray/README.md`` for what was measured about routing repeats to one replica.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from phi3v_tools.errors import OptionalDependencyError
from phi3v_tools.settings import ENV_PREFIX, Settings

try:
    from ray import serve
except ImportError as exc:  # the ray extra is optional: one line saying how to install it
    raise OptionalDependencyError("ray", "ray", "Serving on Ray (phi3v-tools serve --replicas N)", alone=True) from exc

if TYPE_CHECKING:
    from ray.serve import Application
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from phi3v_tools.runner import Runner

__all__ = ["APP_NAME", "DEPLOYMENT", "REPLICA_HEADER", "Phi3VServer", "Replica", "app", "build", "deployment_options"]

logger = logging.getLogger("phi3v_tools.serving")

APP_NAME = "phi3v"  # the Serve application phi3v-tools serve --replicas runs
DEPLOYMENT = "Phi3VServer"
REPLICA_HEADER = "x-phi3v-replica"
CONSISTENT_HASH_ROUTER = "ray.serve.experimental.consistent_hash_router:ConsistentHashRouter"
CONSTRUCTOR_RETRIES = 3  # a replica whose engine cannot load is retried this often, not Serve's 20 times


class ReplicaHeader:
    """Adds ``x-phi3v-replica: <Serve's replica id>`` to every HTTP response."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app, self.header = app, (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


class Replica:
    """One replica: this process's engine for ``settings``, and the ``phi3v-tools serve`` app over it (the
    deployment is :data:`Phi3VServer`, this class under Serve's ingress and deployment decorators)."""

    def __init__(self, settings: Settings) -> None:
        from phi3v_tools.runner import get_runner

        self.settings = settings
        self.replica = serve.get_replica_context().replica_tag
        self.runner: Runner = get_runner(settings, progress=False)  # loads the model: a failure fails the replica
        self.runner.wait_until_warm(settings.health_check_timeout_s)
        self._progress: tuple[int, int] | None = None
        logger.info("replica %s serves %s on %s", self.replica, self.runner.model_name, self.runner.info()["device"])

    def __serve_build_asgi_app__(self) -> ASGIApp:
        from phi3v_tools.serving.server import serving_app

        return ReplicaHeader(serving_app(self.settings, self.runner), self.replica)

    async def check_health(self) -> None:
        """Raise unless the engine generates (Serve calls this every ``health_check_period_s``)."""
        from phi3v_tools.runner import GenerationRequest

        if self.runner.closed:
            raise RuntimeError("the engine is closed")
        info = self.runner.info()
        progress = (info["prompt_tokens"], info["sampled_tokens"])
        busy = info["queue"] + info["prefilling"] + info["running"] > 0
        moved, self._progress = progress != self._progress, progress
        if busy and moved:  # serving others, and it got on with it since the last check
            return
        probe = GenerationRequest.from_text("OK", max_new_tokens=1, timeout_s=self.settings.health_check_timeout_s)
        started = time.perf_counter()
        await self.runner.generate(probe)
        logger.debug("replica %s: health check generated in %.3f s", self.replica, time.perf_counter() - started)
        after = self.runner.info()
        self._progress = (after["prompt_tokens"], after["sampled_tokens"])

    def __del__(self) -> None:  # after Serve drained the replica and ran the app's lifespan shutdown
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.close()


# Serve's late-bound ingress (no app object at decoration: __serve_build_asgi_app__ builds it on the replica).
Phi3VServer = serve.deployment(name=DEPLOYMENT)(serve.ingress()(Replica))


def replica_gpus(policy_gpus: float | None, device: str | None) -> float:
    """The GPUs a replica takes: as set, none for a CPU or MPS device, else one when Ray (or, before Ray is
    started, this machine) has a GPU."""
    if policy_gpus is not None:
        return policy_gpus
    if device is not None and not device.startswith("cuda"):
        return 0.0
    import ray

    if ray.is_initialized():
        return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    try:  # `serve run` builds the app before it starts Ray: ask this machine
        import torch
    except ImportError:
        return 0.0
    return 1.0 if torch.cuda.is_available() else 0.0


def deployment_options(settings: Settings) -> dict[str, Any]:
    """The Serve deployment options for ``settings`` (a config file's ``deployments`` entry overrides them)."""
    policy = settings.replica_policy()
    gpus = replica_gpus(policy.gpus, settings.device)
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": policy.cpus, "num_gpus": gpus},
        "max_ongoing_requests": settings.max_batch_size,
        "max_queued_requests": settings.max_queue,
        "health_check_period_s": policy.health_check_period_s,
        "health_check_timeout_s": policy.health_check_timeout_s,
        "graceful_shutdown_timeout_s": max(settings.mcp_shutdown_grace_s, 1.0),
        "graceful_shutdown_wait_loop_s": 0.5,
        "max_constructor_retry_count": CONSTRUCTOR_RETRIES,
    }
    if policy.route_by_image:
        options["request_router_config"] = {
            "request_router_class": CONSISTENT_HASH_ROUTER,
            "request_router_kwargs": {"num_fallback_replicas": 2},  # a full replica passes a request round the ring
        }
    if policy.autoscaling:
        options["autoscaling_config"] = {
            "min_replicas": policy.min_replicas,
            "initial_replicas": policy.replicas,
            "max_replicas": policy.max_replicas,
            "target_ongoing_requests": policy.target_ongoing_requests,
            "upscale_delay_s": policy.upscale_delay_s,
            "downscale_delay_s": policy.downscale_delay_s,
        }
    else:
        options["num_replicas"] = policy.replicas
    return options


def replica_settings(settings: Settings) -> Settings:
    """What each replica runs with: stateless MCP, and the CPU when the replica gets no GPU."""
    gpus = replica_gpus(settings.replica_gpus, settings.device)
    device = "cpu" if gpus == 0 and settings.device is None else settings.device
    return replace(settings, mcp_stateless=True, device=device)


def build(settings: Settings) -> Application:
    """The Serve application for ``settings``: :class:`Phi3VServer` with :func:`deployment_options`."""
    if settings.backend != "local":
        raise ValueError(f"the replicas run the model themselves; unset PHI3V_BACKEND (it is {settings.backend!r})")
    return Phi3VServer.options(**deployment_options(settings)).bind(replica_settings(settings))


def app(args: Mapping[str, Any]) -> Application:
    """``serve run phi3v_tools.serving.ray:app model=tiny replicas=2``, or a config file's ``args``: each argument
    is a setting by its field name (``model``, ``max_batch_size``, ...), read as its ``PHI3V_*`` variable would
    be, over the ``PHI3V_*`` variables of the process that builds the app."""
    fields = set(Settings.__dataclass_fields__)
    unknown = sorted(set(args) - fields)
    if unknown:
        raise ValueError(f"unknown settings {', '.join(unknown)}; the arguments are Settings fields, e.g. model=tiny")
    environ = dict(os.environ)
    environ.update({ENV_PREFIX + name.upper(): str(value) for name, value in args.items()})
    return build(Settings.from_env(environ))


def serve_replicas(settings: Settings) -> None:
    """``phi3v-tools serve --replicas N``: the app on Ray Serve at ``serve_host:serve_port`` until SIGTERM/Ctrl-C.

    Without ``ray_address`` a local Ray is started (as many logical CPUs as the replicas need, at least the
    machine's) and stopped at the end; with one, the app joins that cluster and is deleted at the end.
    """
    import ray
    from phi3v_mcp.server import configure_logging

    from phi3v_tools.serving.server import server_token

    configure_logging()
    server_token(settings)  # two different tokens: refused before anything starts
    policy = settings.replica_policy()
    started_ray = False
    sigterm = signal.getsignal(signal.SIGTERM)
    if not ray.is_initialized():
        options: dict[str, Any] = {"namespace": "serve", "include_dashboard": False, "log_to_driver": True}
        if policy.ray_address is None:
            # A local Ray started here sends no usage statistics unless the operator set the variable (Ray reads it
            # from the environment in the processes it starts, so it is set here, at the launch edge).
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            needed = math.ceil(policy.most * policy.cpus)
            options["num_cpus"] = max(os.cpu_count() or 1, needed)
            if needed > (os.cpu_count() or 1):
                logger.warning(
                    "%d replicas x %g CPUs is more than this machine's %d CPUs; they will share them",
                    policy.most,
                    policy.cpus,
                    os.cpu_count(),
                )
        ray.init(address=policy.ray_address, **options)
        _keep_sigterm(sigterm)
        started_ray = policy.ray_address is None
    try:
        http = {"host": settings.serve_host, "port": settings.serve_port, "keep_alive_timeout_s": 90}
        serve.start(http_options=http)
        application = build(settings)
        serve.run(application, name=APP_NAME, route_prefix="/")
        host = f"[{settings.serve_host}]" if ":" in settings.serve_host else settings.serve_host
        how = (
            f"{policy.min_replicas} to {policy.max_replicas} replicas (autoscaling)"
            if policy.autoscaling
            else f"{policy.replicas} replica{'s' if policy.replicas != 1 else ''}"
        )
        logger.info("serving %s at http://%s:%d/v1 (OpenAI) and /mcp (MCP) on %s", settings.model, host,
                    settings.serve_port, how)  # fmt: skip
        _wait_until_stopped()
    finally:
        _stop(started_ray)


def _keep_sigterm(handler: Any) -> None:
    """Put back the SIGTERM handler that ``ray.init`` replaced with its own (which logs a stack and dies), so that
    SIGTERM drains and exits 143 as Ctrl-C does (phi3v_tools.signals)."""
    if threading.current_thread() is threading.main_thread() and handler is not None:
        signal.signal(signal.SIGTERM, handler)


def _wait_until_stopped() -> None:
    """Sleep until Ctrl-C or SIGTERM (phi3v_tools.signals turns SIGTERM into a KeyboardInterrupt)."""
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        logger.info("stopping: draining the replicas")
        raise


def _stop(started_ray: bool) -> None:
    import ray

    try:
        serve.delete(APP_NAME)  # the replicas drain: calls in flight get graceful_shutdown_timeout_s to finish
        serve.shutdown()
    except Exception as exc:  # already gone (Ray stopped under us): nothing left to drain
        logger.warning("Ray Serve did not shut down cleanly: %s", exc)
    if started_ray:
        ray.shutdown()
