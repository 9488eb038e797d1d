"""The ``phi3v-tools`` command.

Options are bound to ``PHI3V_*`` environment variables here, once, and handed down as a Settings object. The
tool commands (describe, read-text, read-table, compare, ask) are built from the tools' table
(:func:`phi3v_tools.tools.tool_specs`): one argument or option per field of a tool's arguments model, its help
from the field's description, the result text from the result's ``to_text()`` (``--json``: the result model;
``--csv`` where the result has ``to_csv()``). Images are passed through as given and resolved by
:mod:`phi3v_tools.images` under the allowed-directory policy. stdout carries only the answer; progress (the
weight-loading bar, the live JSON) and the note on an answer cut at its length limit go to stderr. The images a
command read are kept on disk (``PHI3V_IMAGE_STORE_DIR``, by default ``<cache dir>/images``), so that the handles
of a ``--json`` result work in the next command, which is another process.

Every command ends the same way, however it ends (an answer, an error, Ctrl-C): the models it loaded are
closed before the interpreter exits (:func:`shut_down`), so that no engine thread is inside torch while the
interpreter tears down. Ctrl-C exits 130 and SIGTERM 143, with one line on stderr.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import click

from phi3v_tools.errors import Phi3VToolsError, install_command
from phi3v_tools.model.names import DEFAULT_MODEL_ID
from phi3v_tools.settings import Settings
from phi3v_tools.signals import Terminated, ending_line, exit_status, terminate_as_interrupt
from phi3v_tools.tools import TRUNCATED_NOTE, Answer, Table, Toolbox, ToolResult, ToolSpec, tool_spec, tool_specs

CONTEXT = {"help_option_names": ["-h", "--help"]}
F = TypeVar("F", bound=Callable[..., Any])
PROGRAM = "phi3v-tools"
WORKER_PREFIX = "phi3v-cli-worker"  # the threads of a command's event loop (reading images, loading the model)
THREADS_GRACE_S = 10.0  # how long shut_down waits for the package's background threads to finish


# ---------------------------------------------------------------------------------------------------------------------
# Ending a command: the models closed on every path, Ctrl-C as exit status 130


class Phi3VGroup(click.Group):
    """The ``phi3v-tools`` group: a command's models are closed however it ends; Ctrl-C exits 130 and SIGTERM
    143, each with one line (:mod:`phi3v_tools.signals`).

    click would print ``Aborted!`` for a KeyboardInterrupt and exit 1; it is caught here first, after the
    models are closed (the answer so far stays where it was printed).
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with terminate_as_interrupt():
                try:
                    return super().invoke(ctx)
                finally:
                    shut_down()
        except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM as signals.Terminated
            click.echo(ending_line(PROGRAM, stop), err=True)
            if _workers_still_busy():  # e.g. loading the model: the interpreter would wait for it at exit
                _exit_now(exit_status(stop))
            raise click.exceptions.Exit(exit_status(stop)) from None


class _NoWaitExecutor(concurrent.futures.ThreadPoolExecutor):
    """The default executor of a command's event loop. ``asyncio.run`` waits for its executor without a bound
    when it ends, so Ctrl-C while a worker loads the model (or downloads it) would wait for the load. This one
    is not waited for; a worker still busy after an interruption makes the command exit at once instead."""

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        super().shutdown(wait=False, cancel_futures=cancel_futures)


def _workers_still_busy() -> bool:
    return any(t.is_alive() and t.name.startswith(WORKER_PREFIX) for t in threading.enumerate())


def _exit_now(status: int) -> None:
    """End the process without the interpreter's teardown, which would join the busy workers first."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(status)


def shut_down() -> None:
    """Close every model this process loaded and let the package's background threads finish.

    The engine's threads are daemon threads: one still inside torch (or the grammar engine) when the
    interpreter finalizes is stopped in the middle of native code, which aborts the process ("terminate called
    without an active exception") or crashes it. Nothing to do when no model was loaded (the runner module,
    and torch, were never imported). A second Ctrl-C while this waits exits at once (status 130, one line).
    """
    runner = sys.modules.get("phi3v_tools.runner")
    if runner is None:
        return
    with _second_interrupt_exits():
        runner.close_runners()
        _join_background_threads(THREADS_GRACE_S)


def _join_background_threads(timeout: float) -> None:
    """Wait (up to ``timeout`` in all) for the package's daemon threads (named ``phi3v-...``) to end."""
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread.daemon and thread.name.startswith("phi3v-") and thread is not threading.current_thread():
            thread.join(max(deadline - time.monotonic(), 0.0))


@contextlib.contextmanager
def _second_interrupt_exits() -> Iterator[None]:
    """While the models close, Ctrl-C or SIGTERM ends the process at once, skipping the interpreter's teardown
    (which is what could crash with an engine thread still running)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_now(signum: int, frame: object) -> None:
        stop = Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.write(ending_line(PROGRAM, stop) + "\n")
            sys.stderr.flush()
        os._exit(exit_status(stop))

    previous = {sig: signal.signal(sig, exit_now) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@click.group(cls=Phi3VGroup, context_settings=CONTEXT)
@click.version_option(package_name="phi3v-tools")
def main() -> None:
    """Phi-3-vision as tools for agents: describe images, read their text and tables, compare them, ask about them.

    \b
    Examples:
      phi3v-tools describe chart.png -q "Could you please introduce this stock to me?"
      phi3v-tools read-text cover.png --fields title,author --json
      phi3v-tools read-table sales.png --columns Region,Q1 --csv
      phi3v-tools compare before.png after.png
      curl -s https://example.com/photo.jpg | phi3v-tools ask - -q "How many people are there?"
      phi3v-tools ask receipt.png -q "List the items" --schema items.json
      PHI3V_MODEL=./tiny phi3v-tools describe chart.png --detail brief
      phi3v-tools info --json                        # load the model: device, dtype, cache
      phi3v-tools mcp --transport http --port 8765   # serve the tools over MCP
      phi3v-tools demo                               # offline, tiny random model
      phi3v-tools make-tiny-checkpoint ./tiny        # a test checkpoint in the official layout

    \b
    Images are paths, http(s) URLs, data: URIs, base64, image://sha256/... handles from an
    earlier --json result, or - for stdin. Local files are read only under --allow-dir
    (default: the working directory). Each option also reads its PHI3V_* variable
    (PHI3V_MODEL, PHI3V_DEVICE, PHI3V_ALLOWED_DIRS, ...). stdout holds only the answer
    (with --json, only the JSON); progress goes to stderr. Exit status: 0 done, 1 error,
    2 bad usage, 130 Ctrl-C, 143 SIGTERM.
    """


# ---------------------------------------------------------------------------------------------------------------------
# Options and settings: the one place where PHI3V_* variables meet the command line

# The flags carry no envvar: click would check a PHI3V_* value as if it were the flag (a usage error, exit 2,
# naming the flag). The variables are read and checked by Settings.from_env instead (one line naming the
# variable, exit 1); a flag given on the command line overrides its variable.
_MODEL_OPTIONS = (
    click.option(
        "-m",
        "--model",
        help=f"Checkpoint directory, hub id, or 'tiny' (a random test model). [env: PHI3V_MODEL; default: "
        f"{DEFAULT_MODEL_ID}]",
    ),
    click.option("--device", help="cuda, cuda:1, cpu, mps, auto. [env: PHI3V_DEVICE; default: CUDA if present]"),
    click.option(
        "--quantization",
        type=click.Choice(["int8", "int4", "none"], case_sensitive=False),
        help="Weight-only quantization of the language model. [env: PHI3V_QUANTIZATION; default: none]",
    ),
    click.option(
        "--num-crops",
        type=click.IntRange(1, 16),
        help="Crops per image, one image or several. [env: PHI3V_NUM_CROPS; default: the checkpoint's for one "
        "image, 4 for several]",
    ),
)
_IMAGE_OPTIONS = (
    click.option(
        "--allow-dir",
        "allowed_dirs",
        multiple=True,
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        help="Read local images only under DIR; repeatable. [env: PHI3V_ALLOWED_DIRS, ':'-separated; default: "
        "the working directory]",
    ),
    click.option(
        "--urls/--no-urls",
        "allow_urls",
        default=None,
        help="Fetch http(s) image URLs (public addresses only). [env: PHI3V_ALLOW_URLS; default: on]",
    ),
)
_JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (the result model).")


def _apply(*options: Callable[[F], F]) -> Callable[[F], F]:
    def decorate(f: F) -> F:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


model_options = _apply(*_MODEL_OPTIONS)


def build_settings(**options: Any) -> Settings:
    """Settings from the PHI3V_* variables with the given options on top (None or () leaves a setting alone)."""
    if "allowed_dirs" in options:
        options["allowed_dirs"] = tuple(options["allowed_dirs"] or ()) or None
    try:
        return Settings.from_env(**options)
    except ValueError as exc:  # a malformed PHI3V_* variable
        raise click.ClickException(str(exc)) from exc


class ImageType(click.ParamType):
    """An image argument: passed on as given, except ``-``, which becomes the bytes read from stdin.

    Reading and checking the image is left to :mod:`phi3v_tools.images` (through the toolbox), so paths obey
    the allowed directories and URLs the URL policy.
    """

    name = "image"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str | bytes:
        if isinstance(value, bytes) or value != "-":
            return value if isinstance(value, bytes) else str(value)
        meta = ctx.meta if ctx is not None else {}
        if meta.get("phi3v_tools.stdin_read"):
            self.fail("'-' (stdin) can be given only once", param, ctx)
        with click.open_file("-", "rb") as stdin:
            if stdin.isatty():
                self.fail("'-' reads an image from stdin, but stdin is a terminal: pipe an image in", param, ctx)
            meta["phi3v_tools.stdin_read"] = True
            data = stdin.read()
        if not data:
            self.fail("no image data on stdin", param, ctx)
        return data


IMAGE = ImageType()


def _split_fields(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    return None if value is None else [name.strip() for name in value.split(",") if name.strip()]


def _load_schema(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, Any] | None:
    if value is None:
        return None
    text = value
    if not value.lstrip().startswith("{"):
        try:
            text = Path(value).read_text(encoding="utf-8")
        except OSError as exc:
            raise click.BadParameter(f"cannot read {value!r}: {exc.strerror or exc}") from exc
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}") from exc
    if not isinstance(schema, dict):
        raise click.BadParameter("a JSON schema must be a JSON object")
    return schema


# ---------------------------------------------------------------------------------------------------------------------
# Running a tool


def is_terminal() -> bool:
    """Whether stdout is a terminal (then answers stream live); a function so that tests can pretend."""
    return sys.stdout.isatty()


class LiveText:
    """Prints an answer's pieces as they are generated (called from the runner's thread).

    Free text goes to stdout, where it is the answer. The structured tools generate JSON, which is progress
    rather than the answer: it goes to stderr, dimmed, and the readable result follows on stdout.
    """

    def __init__(self, to_stdout: bool) -> None:
        self.to_stdout = to_stdout
        self.started = False
        self.ended = False
        self._held = ""  # trailing whitespace, shown only when more text follows: the answer is stripped
        self.paged = False

    def __call__(self, piece: str) -> None:
        if self.ended or self.paged:  # a piece still on its way after an interruption; or pages read at once
            return
        text = self._held + piece if self.started else piece.lstrip()
        shown = text.rstrip()
        self._held = text[len(shown) :]
        if shown:
            self.started = True
            if self.to_stdout:
                click.echo(shown, nl=False)
            else:
                click.echo(click.style(shown, dim=True), nl=False, err=True)

    def end(self) -> None:
        if self.started and not self.ended:
            click.echo(err=not self.to_stdout)
        self.ended = True

    def page(self, done: int, total: int) -> None:
        """A PDF's progress, on stderr: "2 of 3 pages read". Its pages are read at once, so their text is not
        streamed (the pieces of several answers would interleave)."""
        if self.ended:
            return
        if self.started and not self.paged:
            click.echo(err=not self.to_stdout)  # end the line streamed so far
        self.paged = True
        click.echo(click.style(f"{done} of {total} pages read", dim=True), err=True)


def run_tool(
    options: dict[str, Any],
    call: Callable[[Toolbox, LiveText | None], Awaitable[ToolResult]],
    *,
    free_text: bool = False,
    as_csv: bool = False,
) -> None:
    """Build the settings and toolbox, run one tool call, print its result (or raise a ClickException)."""
    from phi3v_tools.api import toolbox_from_settings

    as_json = options.pop("as_json")
    settings = build_settings(**options)
    if settings.image_store_dir is None and settings.image_store_disk_mb > 0:  # each command is a new process:
        # handles live on disk, for the next one (PHI3V_IMAGE_STORE_DISK_MB=0: not kept)
        settings = replace(settings, image_store_dir=settings.cache_dir / "images")
    toolbox = toolbox_from_settings(settings)
    live = LiveText(to_stdout=free_text) if not (as_json or as_csv) and is_terminal() else None

    async def call_once() -> ToolResult:
        asyncio.get_running_loop().set_default_executor(_NoWaitExecutor(thread_name_prefix=WORKER_PREFIX))
        return await call(toolbox, live)

    try:
        result = asyncio.run(call_once())
    except Phi3VToolsError as exc:
        if live is not None:
            live.end()
        raise click.ClickException(str(exc)) from exc
    except KeyboardInterrupt:  # Ctrl-C: the line streamed so far is ended; the group reports it
        if live is not None:
            live.end()
        raise
    if as_json:
        click.echo(result.model_dump_json(indent=2))  # call.truncated says whether it was cut short
        return
    if live is not None:
        live.end()
    if as_csv and isinstance(result, Table):
        click.echo(result.to_csv(), nl=False)
    elif live is None or not (live.to_stdout and live.started):  # else the answer is already on stdout
        click.echo(result.to_text())  # the handles are in --json (the text is the answer a script reads)
    if result.call.truncated:  # a note for the reader, outside the answer a script reads
        click.echo(TRUNCATED_NOTE, err=True)


# ---------------------------------------------------------------------------------------------------------------------
# The tools: one command per entry of the tools' table

COMMAND_NAMES = {
    "describe_image": "describe",
    "read_text": "read-text",
    "read_table": "read-table",
    "compare_images": "compare",
    "ask_images": "ask",
}
FLAGS = {"question": ("-q", "--question"), "output_schema": ("--schema",)}  # spellings other than --<field>


class SpecCommand(click.Command):
    """A tool's command; its help shows the tool's description with the limits the environment sets
    (``PHI3V_MAX_COMPARE``), read when the help is shown."""

    def __init__(self, spec: ToolSpec, **kwargs: Any) -> None:
        super().__init__(COMMAND_NAMES.get(spec.name, spec.name.replace("_", "-")), **kwargs)
        self.spec_name = spec.name

    def _spec(self) -> ToolSpec:
        try:
            return tool_spec(self.spec_name, build_settings().max_compare)
        except click.ClickException:  # a malformed PHI3V_* variable: the command itself will say so
            return tool_spec(self.spec_name)

    def format_help_text(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self.help = self._spec().description
        super().format_help_text(ctx, formatter)

    def get_short_help_str(self, limit: int = 45) -> str:
        return self._spec().title


def _spec_params(spec: ToolSpec) -> list[click.Parameter]:
    """One click parameter per field of the tool's arguments: images as arguments, the rest as options."""
    params: list[click.Parameter] = []
    for name, info in spec.args.model_fields.items():
        kind, flags = info.annotation, FLAGS.get(name, (f"--{name.replace('_', '-')}",))
        if name == "image":
            params.append(click.Argument(["image"], type=IMAGE))
        elif name == "images":
            params.append(click.Argument(["images"], nargs=-1, required=True, type=IMAGE, metavar="IMAGE..."))
        elif get_origin(kind) is Literal:
            choice = click.Choice([str(v) for v in get_args(kind)])
            params.append(click.Option([*flags, name], type=choice, default=info.default, show_default=True))
        elif dict in (get_origin(a) or a for a in get_args(kind)):  # a JSON schema: a file or inline JSON
            params.append(
                click.Option([*flags, name], callback=_load_schema, metavar="FILE.json", help=info.description)
            )
        elif list in (get_origin(a) for a in get_args(kind)):  # names: comma-separated
            params.append(
                click.Option([*flags, name], metavar="NAME,NAME", callback=_split_fields, help=info.description)
            )
        else:
            params.append(click.Option([*flags, name], required=info.is_required(), help=info.description))
    return params


def _spec_command(spec: ToolSpec) -> click.Command:
    csv = hasattr(spec.result, "to_csv")

    def callback(**values: Any) -> None:
        options = {k: values.pop(k) for k in list(values) if k not in spec.args.model_fields}
        as_csv = bool(options.pop("as_csv", False))
        if "images" in values:
            values["images"] = list(values["images"])
        free_text = spec.result is Answer and values.get("output_schema") is None  # streams to stdout as it comes
        run_tool(
            options,
            lambda tools, live: spec.acall(tools, values, live, live.page if live is not None else None),
            free_text=free_text,
            as_csv=as_csv,
        )

    command = SpecCommand(spec, callback=callback, params=_spec_params(spec), context_settings=CONTEXT)
    extra = [click.option("--csv", "as_csv", is_flag=True, help="Print the table as CSV.")] if csv else []
    for option in (*_MODEL_OPTIONS, *_IMAGE_OPTIONS, _JSON_OPTION, *extra):
        option(command)  # an option decorator applied to a Command appends its parameter, in this order
    return command


for _spec in tool_specs():
    main.add_command(_spec_command(_spec))


# ---------------------------------------------------------------------------------------------------------------------
# The model and the server


@main.command()
@model_options
@_JSON_OPTION
@click.option(
    "--estimate",
    is_flag=True,
    help="Do not load: show the memory each mode would take (weights, KV cache, activations) and whether it fits.",
)
def info(as_json: bool, estimate: bool, **options: Any) -> None:
    """Load the model and show how it runs: device, dtype, attention, num_crops, feature cache (with
    PHI3V_BACKEND=openai: the server, and the models it serves). With --estimate, nothing is loaded: the memory
    each mode (the dtype, int8, int4) would take on the device, from the checkpoint's config alone."""
    settings = build_settings(**options)
    if estimate:
        _estimate(settings, as_json)
        return
    try:
        if settings.backend == "openai":
            from phi3v_tools.api import remote_backend

            details = remote_backend(settings).info()
        else:
            from phi3v_tools.runner import get_runner

            details = get_runner(settings).info()
    except Phi3VToolsError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(details, indent=2))
        return
    for key, value in details.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items()) or "none"
        click.echo(f"{key}: {value}")


def _checkpoint_crops(directory: Path) -> int:
    """The checkpoint's default crops per image (its preprocessor config; 16 when it says nothing)."""
    try:
        raw = json.loads((directory / "preprocessor_config.json").read_text(encoding="utf-8"))
        return int(raw.get("num_crops", 16))
    except (OSError, ValueError, TypeError):
        return 16


def _estimate(settings: Settings, as_json: bool) -> None:
    """``info --estimate``: every mode's memory on the configured device, before anything is loaded."""
    from phi3v_tools.errors import require_local

    try:
        require_local("Estimating the model's memory")
        from phi3v_tools.model.checkpoint import choose_device, choose_dtype, resolve_checkpoint
        from phi3v_tools.model.config import Phi3VConfig
        from phi3v_tools.model.memory import GB, available_bytes, plans

        directory = resolve_checkpoint(settings.model, weights=False, cache_dir=settings.cache_dir)
        config = Phi3VConfig.from_json_file(directory / "config.json")
        device = choose_device(settings.device)
        dtype = choose_dtype(settings.dtype, device, config)
        crops = settings.num_crops or _checkpoint_crops(directory)
        rows = plans(config, dtype, num_crops=crops, max_context=settings.max_context, device_type=device.type)
        free = available_bytes(device)
    except (Phi3VToolsError, OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    fits = [None if free is None else row.to_run <= free for row in rows]
    modes = [{**row.as_dict(), "fits": fit} for row, fit in zip(rows, fits, strict=True)]
    report = {
        "model": settings.model,
        "device": str(device),
        "num_crops": crops,
        "max_context": settings.max_context,
        "available_gb": None if free is None else round(free / GB, 2),
        "modes": modes,
    }
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    where = "unknown" if free is None else f"{free / GB:.1f} GB"
    click.echo(f"model: {settings.model}")
    click.echo(f"device: {device} (available: {where}); num_crops {crops}, max_context {settings.max_context}")
    click.echo(f"{'mode':<10}{'weights':>10}{'KV/token':>11}{'KV/context':>12}{'activations':>13}{'needs':>9}  fits")
    shown = {None: "?", True: "yes", False: "no"}
    for row, fit in zip(rows, fits, strict=True):
        click.echo(
            f"{row.mode:<10}{row.weights / GB:>8.2f}GB{row.kv_per_token / 2**20:>9.3f}MB{row.context_kv / GB:>10.2f}GB"
            f"{row.activations / GB:>11.2f}GB{row.to_run / GB:>7.2f}GB  {shown[fit]}"
        )


@main.command()
@click.option("--transport", type=click.Choice(["stdio", "http"]), default="stdio", show_default=True)
@click.option("--host", "mcp_host", help="HTTP: address to bind. [env: PHI3V_MCP_HOST; default: 127.0.0.1]")
@click.option(
    "--port",
    "mcp_port",
    type=click.IntRange(0, 65535),
    help="HTTP: port (0: any free one). [env: PHI3V_MCP_PORT; default: 8765]",
)
@model_options
@_apply(*_IMAGE_OPTIONS)
def mcp(transport: str, **options: Any) -> None:
    """Serve the tools over MCP: stdio (for desktop clients) or streamable HTTP."""
    settings = build_settings(**options)
    with _server_errors("the MCP server"):
        from phi3v_mcp.server import run

        run(settings, transport)


@main.command()
@click.option("--host", "serve_host", help="Address to bind. [env: PHI3V_SERVE_HOST; default: 127.0.0.1]")
@click.option(
    "--port",
    "serve_port",
    type=click.IntRange(0, 65535),
    help="Port (0: any free one). [env: PHI3V_SERVE_PORT; default: 8000]",
)
@click.option(
    "--served-model-name",
    help="The model's id on /v1/models and in answers. [env: PHI3V_SERVED_MODEL_NAME; default: the --model value]",
)
@click.option(
    "--replicas",
    type=int,
    help="Serve from N engines on Ray Serve (one GPU each when there are GPUs), the start when autoscaling. "
    "[env: PHI3V_REPLICAS; default: this process, no Ray]",
)
@click.option("--min-replicas", type=int, help="Autoscaling's lower bound. [env: PHI3V_MIN_REPLICAS; default: 1]")
@click.option(
    "--max-replicas",
    type=int,
    help="Autoscale up to N replicas on ongoing requests. [env: PHI3V_MAX_REPLICAS; default: no autoscaling]",
)
@click.option(
    "--ray-address",
    help='Join this Ray cluster ("auto", or HOST:PORT) instead of starting one. [env: PHI3V_RAY_ADDRESS]',
)
@model_options
@_apply(*_IMAGE_OPTIONS)
def serve(**options: Any) -> None:
    """Serve the model over the OpenAI API (/v1/chat/completions, /v1/models) and MCP (/mcp), in one process.

    \b
    Any OpenAI client (or PHI3V_BACKEND=openai PHI3V_BASE_URL=http://HOST:PORT/v1 for these tools
    elsewhere) can then use it. Set PHI3V_API_KEY to require "Authorization: Bearer <key>".
    With --replicas N the same app runs on N replicas behind Ray Serve's proxy (the 'ray' extra).
    """
    settings = build_settings(**options)
    if settings.backend != "local":
        raise click.ClickException(
            f"serve runs the model in this process; unset PHI3V_BACKEND (it is {settings.backend!r})"
        )
    if settings.replicas is not None or settings.max_replicas is not None or settings.ray_address is not None:
        with _server_errors("the server", "ray"):
            from phi3v_tools.serving.ray import serve_replicas

            serve_replicas(settings)
        return
    with _server_errors("the server", "serve"):
        from phi3v_tools.serving.server import serve as serve_app

        serve_app(settings)


@contextlib.contextmanager
def _server_errors(what: str, extra: str = "mcp") -> Iterator[None]:
    """A server's start-up failures as one line: the mcp extra missing (with its install command), the model not
    found, the port in use, two different tokens, ..."""
    try:
        yield
    except ModuleNotFoundError as exc:
        raise click.ClickException(f"{what} cannot start ({exc}); install it with: {install_command(extra)}") from exc
    except (Phi3VToolsError, OSError, ValueError) as exc:  # OptionalDependencyError carries its own command
        raise click.ClickException(str(exc)) from exc


# ---------------------------------------------------------------------------------------------------------------------
# The seed demo and the tiny checkpoint


@main.command()
@click.option(
    "--model",
    envvar="PHI3V_MODEL",
    default="tiny",
    show_default=True,
    help="Checkpoint directory, hub id, or 'tiny' (the built-in random test model). Env: PHI3V_MODEL.",
)
@click.option(
    "--device", default=None, help="cuda, cuda:1, cpu, mps, auto. [env: PHI3V_DEVICE; default: CUDA if present]"
)
@click.option("--num-crops", type=click.IntRange(1, 16), help="Crops per image. [env: PHI3V_NUM_CROPS]")
@click.option("--max-new-tokens", type=click.IntRange(1, 2048), default=64, show_default=True)
def demo(model: str, device: str | None, num_crops: int | None, max_new_tokens: int) -> None:
    """Run the seed notebook's three tasks (chart, book cover, two photos) and a table through the model API."""
    settings = build_settings(model=model, device=device, num_crops=num_crops)
    if settings.backend != "local":
        raise click.ClickException(
            f"the demo runs the model in this process; unset PHI3V_BACKEND (it is {settings.backend!r})"
        )
    try:
        run_demo(settings, max_new_tokens)
    except Phi3VToolsError as exc:
        raise click.ClickException(str(exc)) from exc


def run_demo(settings: Settings, max_new_tokens: int) -> None:
    from phi3v_tools.demo import DEMO_TASKS
    from phi3v_tools.runner import load_pretrained

    started = time.perf_counter()
    model, processor = load_pretrained(settings)
    click.echo(
        f"model {settings.model} on {model.device} ({str(model.dtype).removeprefix('torch.')}, "
        f"{model.attn_implementation}), num_crops {processor.num_crops}, loaded in {time.perf_counter() - started:.1f}s"
    )
    if settings.model == "tiny":
        click.echo("(the tiny model has random weights: expect random words; set PHI3V_MODEL for real answers)")
    for task in DEMO_TASKS:
        messages = [{"role": "user", "content": task.user_content}]
        prompt = processor.apply_chat_template(messages)
        inputs = processor(prompt, task.images(), return_tensors="pt").to(model.device)
        t0 = time.perf_counter()
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            do_sample=False,
            eos_token_id=processor.tokenizer.eos_token_id,
        )
        new = out[:, inputs["input_ids"].shape[1] :]
        answer = processor.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]
        click.echo(f"\n## {task.name}: {task.question}")
        click.echo(
            f"[{inputs['input_ids'].shape[1]} prompt tokens, {new.shape[1]} new, {time.perf_counter() - t0:.2f}s]"
        )
        click.echo(answer.strip() or "(empty answer)")
    _demo_document(model, processor, settings, max_new_tokens)


def _demo_document(model: Any, processor: Any, settings: Settings, max_new_tokens: int) -> None:
    """The demo's last step: read_text on a generated 3-page PDF (an invoice and a table with real text layers, a
    scan with an invisible OCR layer), through the toolbox, on an engine over the model already loaded."""
    from importlib.util import find_spec

    from phi3v_tools.images import ImagePolicy
    from phi3v_tools.pdf_samples import demo_document
    from phi3v_tools.runner import Runner
    from phi3v_tools.tools import Toolbox

    click.echo("\n## document: read_text on a 3-page PDF (an invoice, a table, a scanned page)")
    if find_spec("pypdfium2") is None:
        click.echo(f"(skipped: reading PDFs needs the pdf extra: {install_command('pdf')})")
        return
    engine = Runner(model, processor, replace(settings, max_new_tokens=max_new_tokens))
    try:
        toolbox = Toolbox(engine, ImagePolicy(allowed_dirs=()), documents=settings.document_policy())
        reading = toolbox.read_text(demo_document())
    except Phi3VToolsError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        engine.close()
    seconds = reading.call.seconds
    click.echo(
        f"[{reading.page_count} pages, rendered in {seconds['render']:.2f}s, "
        f"{reading.call.completion_tokens} new tokens, {seconds['total']:.2f}s]"
    )
    for page in reading.pages or ():
        how = "its text layer, exact" if page.source == "text" else "a scan, read by the model"
        first = page.text.strip().split("\n", 1)[0][:100]
        click.echo(f"page {page.page} ({how}): {first or '(no text)'}")


@main.command("make-tiny-checkpoint")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--num-crops", type=int, default=4, show_default=True, help="Default num_crops of its processor.")
def make_tiny_checkpoint_command(directory: Path, seed: int, num_crops: int) -> None:
    """Write a tiny random Phi-3-vision checkpoint in the official layout to DIRECTORY."""
    from phi3v_tools.model import make_tiny_checkpoint

    path = make_tiny_checkpoint(directory, seed=seed, num_crops=num_crops)
    click.echo(f"wrote a tiny Phi-3-vision checkpoint to {path}")


if __name__ == "__main__":
    main()
