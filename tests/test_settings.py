"""Settings are read from PHI3V_* variables at the edges, with explicit overrides on top."""

from __future__ import annotations

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
    with pytest.raises(ValueError, match="PHI3V_MAX_QUEUE must be a number"):
        Settings.from_env({"PHI3V_MAX_QUEUE": "lots"})


def test_the_kv_budget_is_unset_by_default_and_a_bad_one_names_its_variable() -> None:
    assert Settings.from_env({}).engine_limits().max_batch_tokens is None  # the engine sizes it from memory
    assert Settings.from_env({"PHI3V_MAX_BATCH_TOKENS": "32768"}).engine_limits().max_batch_tokens == 32768
    for bad in ("0", "-5"):
        with pytest.raises(ValueError, match="PHI3V_MAX_BATCH_TOKENS must be a whole number of at least 1"):
            Settings.from_env({"PHI3V_MAX_BATCH_TOKENS": bad}).engine_limits()
    with pytest.raises(ValueError, match="PHI3V_MAX_BATCH_SIZE must be a whole number of at least 1"):
        Settings.from_env({"PHI3V_MAX_BATCH_SIZE": "0"}).engine_limits()
