"""The ``phi3v-tools`` tool commands, ``info`` and ``mcp``, and the two tool examples, on the tiny checkpoint.

Most runs use click's CliRunner in this process (they share one runner per model, as a real process would);
a subprocess runs where a real terminal or stdin matters, and for the example scripts.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pty
import subprocess
import sys
import threading
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from pydantic import BaseModel

import phi3v_tools.cli
from phi3v_tools import runner as runner_module
from phi3v_tools.images import ImagePolicy, load_image
from phi3v_tools.settings import Settings
from phi3v_tools.tools import Answer, ImageComparison, ImageDescription, Table, TextReading

REPO = Path(__file__).resolve().parent.parent
PLAYERS = '{"type": "object", "properties": {"players": {"type": "integer"}}, "required": ["players"]}'
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
STOCK = "Could you please introduce this stock to me?"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", autouse=True)
def _close_our_runners() -> Iterator[None]:
    """Close the runners these commands loaded (runners are cached per process), and only those."""
    before = set(runner_module._RUNNERS)
    yield
    with runner_module._RUNNERS_LOCK:
        ours = [key for key in runner_module._RUNNERS if key not in before]
        for key in ours:
            runner_module._RUNNERS.pop(key).close()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, cache_dir: Path) -> None:
    """No PHI3V_* settings from the environment leak into the runs. The cache dir is part of a runner's key:
    one for the module, so the commands share one runner as they would in one process."""
    for name in list(os.environ):
        if name.startswith("PHI3V_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PHI3V_CACHE_DIR", str(cache_dir))


@pytest.fixture
def cli(tiny_dir: Path, sample_images: dict[str, Path]) -> Callable[..., Result]:
    """Invoke ``phi3v-tools ARGS --model <tiny> --allow-dir <samples>`` in process; stdout and stderr apart."""

    def invoke(*args: str, input: bytes | None = None, model: bool = True) -> Result:
        common = ["--model", str(tiny_dir), "--allow-dir", str(sample_images["chart"].parent)] if model else []
        return CliRunner().invoke(phi3v_tools.cli.main, [*args, *common], input=input)

    return invoke


def _ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    assert result.exception is None
    return result.stdout


def _failed(result: Result, code: int) -> str:
    """The run exited with ``code`` through click (no traceback); its stderr."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    return result.stderr


# ---------------------------------------------------------------------------------------------------------------------
# The tools


@pytest.mark.parametrize(
    ("args", "model"),
    [
        (["describe", "{chart}", "--detail", "brief", "-q", STOCK], ImageDescription),
        (["read-text", "{cover}", "--fields", "title,author"], TextReading),
        (["read-table", "{table}", "--columns", "Region,Q1"], Table),
        (["compare", "{scene_a}", "{scene_b}"], ImageComparison),
        (["ask", "{scene_a}", "-q", "How many players are there?", "--schema", "PLAYERS"], Answer),
    ],
    ids=["describe", "read-text", "read-table", "compare", "ask"],
)
def test_each_tool_prints_text_and_with_json_its_result_model(
    cli: Callable[..., Result], sample_images: dict[str, Path], args: list[str], model: type[BaseModel]
) -> None:
    args = [PLAYERS if a == "PLAYERS" else a.format(**sample_images) for a in args]
    text = _ok(cli(*args))
    result = model.model_validate_json(_ok(cli(*args, "--json")))
    assert text.strip() and text == result.to_text() + "\n"  # type: ignore[attr-defined]  # greedy: same answer
    assert len(result.images) == (2 if args[0] == "compare" else 1)  # type: ignore[attr-defined]
    if isinstance(result, TextReading):
        assert result.fields is not None and set(result.fields) == {"title", "author"}
    if isinstance(result, Table):
        assert result.columns == ["Region", "Q1"] and all(len(row) == 2 for row in result.rows)
    if isinstance(result, Answer):
        assert isinstance(result.answer, dict) and isinstance(result.answer["players"], int)


def test_read_table_csv_prints_the_header_then_one_line_per_row(
    cli: Callable[..., Result], sample_images: dict[str, Path]
) -> None:
    table = str(sample_images["table"])
    printed = _ok(cli("read-table", table, "--columns", "Region, Q1 ,Q2", "--csv"))
    result = Table.model_validate_json(_ok(cli("read-table", table, "--columns", "Region,Q1,Q2", "--json")))
    assert printed == result.to_csv()  # greedy: the same table
    rows = list(csv.reader(io.StringIO(printed)))
    assert rows[0] == ["Region", "Q1", "Q2"]
    assert len(rows) == 1 + len(result.rows) and all(len(row) == 3 for row in rows)


def test_on_a_terminal_free_text_streams_to_stdout_as_it_is_generated(
    cli: Callable[..., Result], sample_images: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    pieces: list[str] = []
    monkeypatch.setattr(phi3v_tools.cli, "is_terminal", lambda: True)
    monkeypatch.setattr(phi3v_tools.cli.LiveText, "__call__", _recording(phi3v_tools.cli.LiveText.__call__, pieces))
    streamed = _ok(cli("ask", str(sample_images["chart"]), "-q", "What is this?"))
    assert len(pieces) > 1
    assert streamed == "".join(pieces).strip() + "\n"
    monkeypatch.setattr(phi3v_tools.cli, "is_terminal", lambda: False)
    printed = _ok(cli("ask", str(sample_images["chart"]), "-q", "What is this?"))
    assert printed == streamed  # greedy decoding: the same answer, printed at the end instead


def test_a_pdf_with_pages_gives_per_page_results_and_handles_in_json(
    cli: Callable[..., Result], demo_pdf: Path
) -> None:
    pytest.importorskip("pypdfium2")
    reading = json.loads(_ok(cli("read-text", str(demo_pdf), "--pages", "1,3", "--json")))
    assert [(p["page"], p["source"]) for p in reading["pages"]] == [(1, "text"), (3, "ocr")]
    assert reading["pages"][0]["text"].startswith("Invoice INV-2041") and reading["page_count"] == 3
    assert [i["handle"] for i in reading["images"]] == [p["handle"] for p in reading["pages"]]
    assert [i["page"] for i in reading["images"]] == [1, 3]
    table = json.loads(_ok(cli("read-table", str(demo_pdf), "--pages", "2", "--json")))
    assert [p["page"] for p in table["pages"]] == [2]
    message = _failed(cli("read-text", str(demo_pdf), "--pages", "9"), 1)
    assert message.startswith("Error: ") and "has 3" in message and len(message.strip().splitlines()) == 1


def test_on_a_terminal_a_pdf_shows_its_pages_as_they_are_read(
    cli: Callable[..., Result], demo_pdf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("pypdfium2")
    monkeypatch.setattr(phi3v_tools.cli, "is_terminal", lambda: True)
    result = cli("read-text", str(demo_pdf))
    text = _ok(result)
    assert "--- page 1 (text layer) ---\nInvoice INV-2041" in text and "--- page 3 (read by the model) ---" in text
    assert [line for line in result.stderr.splitlines() if "pages read" in line] == [
        "2 of 3 pages read",
        "3 of 3 pages read",
    ]
    assert "{" not in result.stderr  # the pages' JSON is not streamed (several would interleave)


def _recording(call: Callable[[Any, str], None], pieces: list[str]) -> Callable[[Any, str], None]:
    def record(self: Any, piece: str) -> None:
        pieces.append(piece)
        call(self, piece)

    return record


def test_dash_reads_the_image_bytes_from_stdin(cli: Callable[..., Result], sample_images: dict[str, Path]) -> None:
    data = sample_images["cover"].read_bytes()
    reading = TextReading.model_validate_json(_ok(cli("read-text", "-", "--json", input=data)))
    assert reading.images[0].handle == load_image(data, ImagePolicy()).handle


def test_dash_twice_or_an_empty_stdin_is_a_usage_error(cli: Callable[..., Result]) -> None:
    assert "only once" in _failed(cli("compare", "-", "-", input=b"\x89PNG"), 2)
    assert "no image data on stdin" in _failed(cli("describe", "-", input=b""), 2)


def test_a_path_outside_the_allowed_dirs_exits_1_with_the_reason(
    cli: Callable[..., Result], sample_images: dict[str, Path], tmp_path: Path
) -> None:
    outside = tmp_path / "chart.png"
    outside.write_bytes(sample_images["chart"].read_bytes())
    message = _failed(cli("describe", str(outside)), 1)
    assert message.startswith("Error: ") and "outside the allowed directories" in message
    assert "--allow-dir" in message


def test_compare_with_one_image_exits_1_saying_how_many_it_takes(
    cli: Callable[..., Result], sample_images: dict[str, Path]
) -> None:
    message = _failed(cli("compare", str(sample_images["scene_a"])), 1)
    assert message.startswith("Error: ") and "takes 2 to 4" in message


@pytest.mark.parametrize(
    "args",
    [
        ["describe", "x.png", "--no-such-option"],
        ["describe", "x.png", "--detail", "huge"],
        ["ask", "x.png"],  # no --question
        ["compare"],  # no images
        ["ask", "x.png", "-q", "?", "--schema", "{not json"],
        ["describe", "x.png", "--allow-dir", "/no/such/dir"],
    ],
)
def test_bad_usage_exits_2(cli: Callable[..., Result], args: list[str]) -> None:
    assert "Usage:" in _failed(cli(*args, model=False), 2)


def test_a_malformed_phi3v_variable_exits_1(cli: Callable[..., Result], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHI3V_MAX_NEW_TOKENS", "many")
    assert "PHI3V_MAX_NEW_TOKENS must be a whole number" in _failed(cli("describe", "x.png"), 1)


def test_phi3v_variables_are_honoured(
    cli: Callable[..., Result], tiny_dir: Path, sample_images: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PHI3V_MODEL", str(tiny_dir))
    monkeypatch.setenv("PHI3V_ALLOWED_DIRS", str(sample_images["chart"].parent))
    out = _ok(
        cli("ask", str(sample_images["chart"]), "-q", "How many bars?", "--schema", PLAYERS, "--json", model=False)
    )
    assert Answer.model_validate_json(out).call.model == str(tiny_dir)


# ---------------------------------------------------------------------------------------------------------------------
# info and mcp


def test_info_json_shows_the_device_dtype_and_cache(cli: Callable[..., Result], tiny_dir: Path) -> None:
    info = json.loads(_ok(CliRunner().invoke(phi3v_tools.cli.main, ["info", "--json", "-m", str(tiny_dir)])))
    assert info["model"] == str(tiny_dir)
    assert (info["device"], info["dtype"]) == ("cpu", "float32")
    assert {"attn_implementation", "num_crops", "feature_cache"} <= set(info)
    text = _ok(CliRunner().invoke(phi3v_tools.cli.main, ["info", "-m", str(tiny_dir)]))
    assert "device: cpu" in text and "dtype: float32" in text and "feature_cache: entries" in text


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """``phi3v_mcp.server`` (a stand-in module when it cannot be imported) for tests to patch ``run`` on."""
    try:
        import phi3v_mcp.server as module
    except ImportError:
        module = types.ModuleType("phi3v_mcp.server")
        monkeypatch.setitem(sys.modules, "phi3v_mcp.server", module)
    return module


@pytest.fixture
def server_runs(server: types.ModuleType, monkeypatch: pytest.MonkeyPatch) -> list[tuple[Settings, str]]:
    """``phi3v_mcp.server.run`` replaced by a recorder of its arguments."""
    runs: list[tuple[Settings, str]] = []
    monkeypatch.setattr(server, "run", lambda settings, transport: runs.append((settings, transport)), raising=False)
    return runs


def test_mcp_runs_the_server_with_the_settings_and_transport(
    server_runs: list[tuple[Settings, str]], tiny_dir: Path, tmp_path: Path
) -> None:
    args = ["mcp", "--transport", "http", "--host", "0.0.0.0", "--port", "9001", "-m", str(tiny_dir)]
    _ok(CliRunner().invoke(phi3v_tools.cli.main, [*args, "--allow-dir", str(tmp_path), "--no-urls"]))
    _ok(CliRunner().invoke(phi3v_tools.cli.main, ["mcp"], env={"PHI3V_MCP_PORT": "9002"}))
    (settings, transport), (default_settings, default_transport) = server_runs
    assert transport == "http" and default_transport == "stdio"
    assert (settings.model, settings.mcp_host, settings.mcp_port) == (str(tiny_dir), "0.0.0.0", 9001)
    assert settings.allowed_dirs == (tmp_path,) and settings.allow_urls is False
    assert default_settings == Settings.from_env(mcp_port=9002)


def test_mcp_rejects_an_unknown_transport(server_runs: list[tuple[Settings, str]]) -> None:
    _failed(CliRunner().invoke(phi3v_tools.cli.main, ["mcp", "--transport", "carrier-pigeon"]), 2)
    assert server_runs == []


def test_mcp_start_up_errors_exit_1_without_a_traceback(
    server: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(settings: Settings, transport: str) -> None:
        raise OSError(98, "Address already in use")

    monkeypatch.setattr(server, "run", fail, raising=False)
    assert "Address already in use" in _failed(CliRunner().invoke(phi3v_tools.cli.main, ["mcp"]), 1)


# ---------------------------------------------------------------------------------------------------------------------
# Subprocesses: a real terminal and stdin; the examples


def test_on_a_real_terminal_json_progress_goes_to_stderr_and_the_text_to_stdout(
    tiny_dir: Path, sample_images: dict[str, Path]
) -> None:
    env = {**os.environ, **ONE_THREAD, "PHI3V_MODEL": str(tiny_dir)}
    args = ["-m", "phi3v_tools.cli", "describe", "-", "--detail", "brief"]
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, *args], stdin=subprocess.PIPE, stdout=secondary, stderr=subprocess.PIPE, env=env, cwd=REPO
    )
    os.close(secondary)
    chunks: list[bytes] = []
    reader = threading.Thread(target=_drain, args=(primary, chunks))
    reader.start()
    _, err = proc.communicate(sample_images["chart"].read_bytes(), timeout=300)
    reader.join()
    os.close(primary)
    stdout, stderr = b"".join(chunks).decode(), err.decode()
    assert proc.returncode == 0, stderr
    assert '{"description"' in stderr and "loading weights" in stderr  # the live JSON, the loading bar
    assert "(kind: " in stdout and '"description"' not in stdout and "loading" not in stdout


def _drain(fd: int, chunks: list[bytes]) -> None:
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:  # EIO: the terminal's other end closed
            return
        if not data:
            return
        chunks.append(data)


@pytest.fixture(scope="module")
def examples(
    tiny_dir: Path, sample_images: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[subprocess.CompletedProcess[str], Path]]:
    """Both example scripts, run side by side (each is mostly one busy thread), with their output files."""
    folder = tmp_path_factory.mktemp("scans")
    for name in ("chart", "cover"):
        (folder / f"{name}.png").write_bytes(sample_images[name].read_bytes())
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("not an image file either, and not picked up")
    out = folder.parent / "out.jsonl"
    commands: dict[str, list[str | Path]] = {
        "seed_tools": [REPO / "examples" / "seed_tools.py"],
        "read_folder": [REPO / "examples" / "read_folder.py", folder, out, "--fields", "title,author"],
    }
    env = {**os.environ, **ONE_THREAD, "PHI3V_MODEL": str(tiny_dir), "PHI3V_CACHE_DIR": str(folder.parent / "cache")}
    procs = {
        name: subprocess.Popen(
            [sys.executable, *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, args in commands.items()
    }
    runs = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        runs[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), out)
    return runs


def test_the_seed_tools_example_runs_the_three_tasks_and_the_table(
    examples: dict[str, tuple[subprocess.CompletedProcess[str], Path]], tiny_dir: Path
) -> None:
    run, _ = examples["seed_tools"]
    assert run.returncode == 0, run.stderr
    for heading in ("## stock chart", "## book cover", "## two photos", "## sales table\nRegion,Q1,Q2\n"):
        assert heading in run.stdout
    assert "title: " in run.stdout and "author: " in run.stdout
    assert f"(model {tiny_dir};" in run.stdout


def test_the_read_folder_example_writes_one_line_per_image_goes_on_after_errors_and_exits_1_for_them(
    examples: dict[str, tuple[subprocess.CompletedProcess[str], Path]],
) -> None:
    run, out = examples["read_folder"]
    assert run.returncode == 1, run.stderr  # one image could not be read: a script must notice
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 3 and "3 images, 1 errors" in run.stderr
    assert "image/s]" in run.stderr  # the progress bar
    by_name = {Path(line["path"]).name: line for line in lines}
    assert set(by_name) == {"chart.png", "cover.png", "broken.png"}
    assert "not a readable image" in by_name["broken.png"]["error"]
    for name in ("chart.png", "cover.png"):
        reading = TextReading.model_validate(by_name[name]["result"])
        assert reading.fields is not None and set(reading.fields) == {"title", "author"}


def test_the_read_folder_example_exits_1_for_a_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "read_folder.py"), str(tmp_path), str(tmp_path / "out.jsonl")],
        env={**os.environ, "PHI3V_MODEL": "tiny"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "no images in" in done.stderr, done.stderr


def test_a_handle_from_one_cli_run_is_an_image_in_the_next_run(
    tiny_dir: Path, sample_images: dict[str, Path], tmp_path: Path
) -> None:
    # Each command is a new process; the handle lives in <cache dir>/images between them. The second run cannot
    # read the chart's directory (its allowed directory is elsewhere): the image can only come from the store.
    env = {**os.environ, **ONE_THREAD, "PHI3V_MODEL": str(tiny_dir), "PHI3V_CACHE_DIR": str(tmp_path / "cache")}
    env = {k: v for k, v in env.items() if k != "PHI3V_IMAGE_STORE_DIR"}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    images = tmp_path / "cache" / "images"

    def run(*args: str, cwd: Path = elsewhere, **extra: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "phi3v_tools.cli", *args]
        return subprocess.run(
            command,
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=300,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
        )

    chart, cover = sample_images["chart"], sample_images["cover"]
    first = run("read-text", str(chart), "--json", cwd=chart.parent)
    assert first.returncode == 0, first.stderr
    handle = json.loads(first.stdout)["images"][0]["handle"]
    second = run("describe", handle, "--json", "--detail", "brief")
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["images"][0]["handle"] == handle
    stored = list(images.iterdir())
    assert [p.name for p in stored] == [handle.removeprefix("image://sha256/") + ".png"]
    assert stored[0].stat().st_mode & 0o777 == 0o600
    off = run("read-text", str(cover), "--json", cwd=cover.parent, PHI3V_IMAGE_STORE_DISK_MB="0")
    assert off.returncode == 0, off.stderr
    assert len(list(images.iterdir())) == 1  # PHI3V_IMAGE_STORE_DISK_MB=0: nothing more kept on disk
    unknown = run("describe", "image://sha256/" + "0" * 64)
    assert unknown.returncode == 1 and "unknown image handle" in unknown.stderr, unknown.stderr


def test_compare_uses_the_crops_asked_for(cli: Callable[..., Result], sample_images: dict[str, Path]) -> None:
    # --num-crops was once ignored by compare (always 4): fewer crops, fewer image tokens in the prompt.
    images = [str(sample_images["scene_a"]), str(sample_images["scene_b"])]
    tokens = {}
    for crops in ("1", "4"):
        result = json.loads(_ok(cli("compare", *images, "--num-crops", crops, "--json")))
        tokens[crops] = result["call"]["prompt_tokens"]
    assert tokens["1"] < tokens["4"]
    default = json.loads(_ok(cli("compare", *images, "--json")))["call"]["prompt_tokens"]
    assert default == tokens["4"]  # unset: 4 each for several images
