"""Settings are read from PHI3V_* variables at the edges, with explicit overrides on top."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from phi3v_tools.model import DEFAULT_MODEL_ID
from phi3v_tools.settings import Settings


def test_defaults_name_the_official_model_and_leave_hardware_choices_open() -> None:
    settings = Settings.from_env({})
    assert settings.model == DEFAULT_MODEL_ID
    assert (settings.device, settings.dtype, settings.attn_implementation, settings.num_crops) == (None,) * 4


def test_environment_variables_fill_typed_fields() -> None:
    settings = Settings.from_env(
        {
            "PHI3V_MODEL": "tiny",
            "PHI3V_NUM_CROPS": "4",
            "PHI3V_BATCH_WINDOW_MS": "2.5",
            "PHI3V_MAX_QUEUE": "7",
            "PHI3V_CACHE_DIR": "~/x",
            "PHI3V_DEVICE": "",  # empty means unset
        }
    )
    assert settings.model == "tiny" and settings.num_crops == 4 and settings.max_queue == 7
    assert settings.batch_window_ms == 2.5 and settings.device is None
    assert settings.cache_dir == Path("~/x").expanduser()


def test_explicit_overrides_beat_the_environment_and_none_means_not_given() -> None:
    settings = Settings.from_env({"PHI3V_MODEL": "tiny", "PHI3V_NUM_CROPS": "4"}, model="other", num_crops=None)
    assert settings.model == "other" and settings.num_crops == 4


def test_a_malformed_number_names_the_variable() -> None:
    with pytest.raises(ValueError, match="PHI3V_MAX_QUEUE must be a whole number"):
        Settings.from_env({"PHI3V_MAX_QUEUE": "lots"})


def test_the_kv_budget_is_unset_by_default_and_a_bad_one_names_its_variable() -> None:
    assert Settings.from_env({}).engine_limits().max_batch_tokens is None  # the engine sizes it from memory
    assert Settings.from_env({"PHI3V_MAX_BATCH_TOKENS": "32768"}).engine_limits().max_batch_tokens == 32768
    for bad in ("0", "-5"):
        with pytest.raises(ValueError, match="PHI3V_MAX_BATCH_TOKENS must be a whole number from 1 to"):
            Settings.from_env({"PHI3V_MAX_BATCH_TOKENS": bad}).engine_limits()
    with pytest.raises(ValueError, match="PHI3V_MAX_BATCH_SIZE must be a whole number from 1 to"):
        Settings.from_env({"PHI3V_MAX_BATCH_SIZE": "0"}).engine_limits()


@pytest.mark.parametrize(
    ("variable", "value", "allowed"),
    [
        ("PHI3V_DEVICE", "gpu", "cpu, cuda, cuda:N, mps or auto"),
        ("PHI3V_DEVICE", "cuda:x", "cpu, cuda, cuda:N, mps or auto"),
        ("PHI3V_DTYPE", "fp16", "bfloat16, float16, float32, auto"),
        ("PHI3V_ATTN_IMPLEMENTATION", "flash", "sdpa, flash_attention_2, eager"),
    ],
)
def test_a_bad_device_dtype_or_attention_is_refused_when_the_settings_are_made(
    variable: str, value: str, allowed: str
) -> None:
    with pytest.raises(ValueError, match=f"^{variable} must be .*{re.escape(allowed)}, got '{re.escape(value)}'$"):
        Settings.from_env({variable: value})
    with pytest.raises(ValueError, match=variable):  # a flag on top of the environment is checked the same way
        Settings.from_env({}, **{variable.removeprefix("PHI3V_").lower(): value})


def test_every_documented_device_dtype_and_attention_is_accepted() -> None:
    for device in ("cpu", "cuda", "cuda:1", "mps", "auto"):
        assert Settings(device=device).model_config().device == device
    for dtype in ("bfloat16", "float16", "float32", "auto"):
        assert Settings(dtype=dtype).dtype == dtype
    for attention in ("sdpa", "flash_attention_2", "eager"):
        assert Settings(attn_implementation=attention).attn_implementation == attention


BAD_AT_START = [
    ("PHI3V_DTYPE", "fp16", "PHI3V_DTYPE must be one of bfloat16, float16, float32, auto, got 'fp16'"),
    ("PHI3V_MAX_NEW_TOKENS", "-5", "PHI3V_MAX_NEW_TOKENS must be a whole number from 1 to 131072, got -5"),
    ("PHI3V_MAX_NEW_TOKENS", "0", "PHI3V_MAX_NEW_TOKENS must be a whole number from 1 to 131072, got 0"),
    ("PHI3V_MAX_QUEUE", "0", "PHI3V_MAX_QUEUE must be a whole number from 1 to 1000000, got 0"),
    ("PHI3V_REQUEST_TIMEOUT_S", "0", "PHI3V_REQUEST_TIMEOUT_S must be a number above 0 and at most 86400"),
    # Variables that also have a flag: checked by Settings (exit 1, naming the variable), not by click as the flag.
    ("PHI3V_NUM_CROPS", "17", "PHI3V_NUM_CROPS must be a whole number from 1 to 16, got 17"),
    ("PHI3V_MCP_PORT", "70000", "PHI3V_MCP_PORT must be a whole number from 0 to 65535, got 70000"),
    ("PHI3V_ALLOW_URLS", "maybe", "PHI3V_ALLOW_URLS must be true or false, got 'maybe'"),
]
COMMANDS = [["-m", "phi3v_tools.cli", "describe", "x.png"], ["-m", "phi3v_tools.cli", "mcp"], ["-m", "phi3v_mcp"]]


@pytest.mark.parametrize("command", COMMANDS, ids=["cli", "cli-mcp", "python-m-phi3v_mcp"])
@pytest.mark.parametrize(("variable", "value", "message"), BAD_AT_START, ids=[f"{v}={x}" for v, x, _ in BAD_AT_START])
def test_a_bad_setting_stops_the_cli_and_both_mcp_entry_points_at_start_with_one_line_and_exit_1(
    command: list[str], variable: str, value: str, message: str, tmp_path: Path
) -> None:
    env = {**os.environ, variable: value, "PHI3V_MODEL": "tiny"}
    done = subprocess.run(
        [sys.executable, *command], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"PHI3V_MAX_QUEUE": "0"}, "PHI3V_MAX_QUEUE"),  # once silently an unbounded queue
        ({"PHI3V_NUM_CROPS": "17"}, "PHI3V_NUM_CROPS"),
        ({"PHI3V_MAX_COMPARE": "1"}, "PHI3V_MAX_COMPARE"),  # compare needs two
        ({"PHI3V_MAX_COMPARE": "9"}, "PHI3V_MAX_COMPARE"),  # more than a request may carry (8)
        ({"PHI3V_MAX_CONTEXT": "2048", "PHI3V_MAX_NEW_TOKENS": "2048"}, "PHI3V_MAX_NEW_TOKENS"),
        ({"PHI3V_MCP_PORT": "70000"}, "PHI3V_MCP_PORT"),
        ({"PHI3V_MAX_IMAGE_MB": "0"}, "PHI3V_MAX_IMAGE_MB"),
        ({"PHI3V_MAX_QUEUE": "2.5"}, "PHI3V_MAX_QUEUE"),
        ({"PHI3V_IMAGE_STORE_DISK_MB": "-1"}, "PHI3V_IMAGE_STORE_DISK_MB"),
    ],
)
def test_a_value_out_of_range_is_refused_when_the_settings_are_made(environ: dict[str, str], variable: str) -> None:
    with pytest.raises(ValueError, match=f"^{variable} "):
        Settings.from_env(environ)


def test_every_numeric_setting_has_a_range_and_its_default_is_inside_it() -> None:
    from dataclasses import fields

    from phi3v_tools.settings import RANGES

    numeric = {f.name for f in fields(Settings) if str(f.type) in ("int", "float", "int | None", "float | None")}
    assert numeric == set(RANGES)
    Settings()  # the defaults pass their own checks
    assert Settings(max_queue=1, feature_cache_mb=0, mcp_port=0).max_queue == 1  # the ends are allowed


def test_defaults_follow_a_lowered_limit_instead_of_refusing_what_was_not_set() -> None:
    lowered = Settings.from_env({"PHI3V_MAX_CONTEXT": "1024"})  # the default max_new_tokens (1024) would not fit
    assert lowered.max_context == 1024 and lowered.max_new_tokens < 1024
    assert Settings.from_env({"PHI3V_MAX_IMAGES": "3"}).max_compare == 3  # the default 4 would be more
    with pytest.raises(ValueError, match="PHI3V_MAX_NEW_TOKENS"):  # both given: the clash is the caller's
        Settings.from_env({"PHI3V_MAX_CONTEXT": "1024", "PHI3V_MAX_NEW_TOKENS": "1024"})
    with pytest.raises(ValueError, match="PHI3V_MAX_IMAGES must be a whole number from 2"):
        Settings.from_env({"PHI3V_MAX_IMAGES": "1"})


def test_the_remote_backend_needs_an_http_base_url_and_a_known_backend_name() -> None:
    remote = Settings.from_env({"PHI3V_BACKEND": "openai", "PHI3V_BASE_URL": "http://gpu-box:8000/v1"})
    assert remote.backend == "openai" and remote.base_url == "http://gpu-box:8000/v1"
    with pytest.raises(ValueError, match="^PHI3V_BACKEND=openai needs PHI3V_BASE_URL"):
        Settings.from_env({"PHI3V_BACKEND": "openai"})
    with pytest.raises(ValueError, match="^PHI3V_BACKEND must be one of local, openai, got 'vllm'"):
        Settings.from_env({"PHI3V_BACKEND": "vllm"})
    assert "secret" not in repr(Settings(api_key="secret"))  # a key never shows in a log line
