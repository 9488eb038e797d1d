"""Local paths (phi3v_tools.images): the allowed-directory check is lexical and comes before any file-system query,
the file is opened from the allowed directory's descriptor without following links (no check-then-open race),
messages for files outside the allowed directories do not depend on whether they exist, ``~user`` is refused,
and a path is used exactly as given (a name may end with a space).
"""

from __future__ import annotations

import base64
import os
import pwd
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from phi3v_tools import image_files
from phi3v_tools.errors import ImageError
from phi3v_tools.feature_cache import image_digest
from phi3v_tools.images import ImagePolicy, load_image
from tests.hostile import encode, noise

GOOD = encode(noise(16, 12, seed=1))
SECRET = encode(noise(16, 12, seed=99))
GOOD_DIGEST = image_digest(noise(16, 12, seed=1))
SECRET_DIGEST = image_digest(noise(16, 12, seed=99))


@pytest.fixture
def allowed(tmp_path: Path) -> Path:
    folder = tmp_path / "allowed"
    folder.mkdir()
    (folder / "good.png").write_bytes(GOOD)
    return folder


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    folder = tmp_path / "secret"
    folder.mkdir()
    (folder / "secret.png").write_bytes(SECRET)
    return folder / "secret.png"


@pytest.fixture
def policy(allowed: Path) -> ImagePolicy:
    return ImagePolicy(allowed_dirs=(allowed,))


def _message(ref: Any, policy: ImagePolicy) -> str:
    with pytest.raises(ImageError) as info:
        load_image(ref, policy)
    return str(info.value)


# ---------------------------------------------------------------------------------------------------------------------
# The check-then-open race


def test_a_file_swapped_for_a_link_between_the_check_and_the_open_is_refused(
    allowed: Path, secret: Path, policy: ImagePolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deterministic: the swap happens inside the first os.open (the allowed directory), after the lexical check."""
    target = allowed / "swap.png"
    target.write_bytes(GOOD)
    real_open = os.open
    swapped: list[bool] = []

    def swapping_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if not swapped:
            swapped.append(True)
            target.unlink()
            target.symlink_to(secret)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", swapping_open)
    message = _message(target, policy)
    assert swapped and "is a symbolic link; links are not followed" in message


def test_loading_while_another_thread_swaps_the_file_for_a_link_never_returns_the_secret(
    allowed: Path, secret: Path, policy: ImagePolicy
) -> None:
    """500 loads while a thread swaps the file for a link to a secret and back; another thread loads a good file."""
    target, stop = allowed / "racy.png", threading.Event()
    (allowed / "master.png").write_bytes(GOOD)

    def swapper() -> None:
        i = 0
        while not stop.is_set():
            spare = allowed / f".spare-{i % 2}"
            if i % 2:
                os.link(allowed / "master.png", spare)
            else:
                spare.symlink_to(secret)
            os.replace(spare, target)
            i += 1

    innocent_results: list[str] = []

    def innocent() -> None:
        while not stop.is_set():
            innocent_results.append(load_image(allowed / "good.png", policy).digest)

    threads = [threading.Thread(target=swapper), threading.Thread(target=innocent)]
    for thread in threads:
        thread.start()
    outcomes: dict[str, int] = {}
    try:
        for _ in range(500):
            try:
                digest = load_image(str(target), policy).digest
                assert digest != SECRET_DIGEST, "the secret came back"
                outcomes["good"] = outcomes.get("good", 0) + 1
            except ImageError as exc:
                key = "link" if "symbolic link" in str(exc) else "missing" if "no image file" in str(exc) else str(exc)
                assert key in ("link", "missing"), key
                outcomes[key] = outcomes.get(key, 0) + 1
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
    assert outcomes.get("link", 0) > 0 and outcomes.get("good", 0) > 0, outcomes
    assert innocent_results and set(innocent_results) == {GOOD_DIGEST}


def test_nothing_is_asked_of_the_file_system_before_the_check(
    allowed: Path, secret: Path, policy: ImagePolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []

    def spy(name: str) -> Any:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            asked.append(f"{name}{args[:1]}")
            raise AssertionError(f"{name} was called")

        return refuse

    for name in ("stat", "lstat", "open", "access", "scandir", "listdir", "readlink"):
        monkeypatch.setattr(os, name, spy(f"os.{name}"))
    monkeypatch.setattr(pwd, "getpwnam", spy("pwd.getpwnam"))
    outside_base64 = "/" + base64.b64encode(os.urandom(300)).decode().replace("/", "x")
    for ref in (str(secret), secret, "../../etc/passwd", "~/.ssh/id_rsa", "~root/.ssh/id_rsa", f"file://{secret}"):
        with pytest.raises(ImageError):
            load_image(ref, policy)
    with pytest.raises(ImageError):
        load_image(outside_base64, policy)  # read as base64: not valid image data
    assert asked == []


# ---------------------------------------------------------------------------------------------------------------------
# No existence oracle outside the allowed directories


def test_messages_outside_the_allowed_directories_do_not_depend_on_existence(
    allowed: Path, secret: Path, policy: ImagePolicy
) -> None:
    present, missing = secret, secret.parent / "missing.png"
    assert _message(present, policy).replace("secret.png", "X") == _message(missing, policy).replace("missing.png", "X")
    # long base64-looking names (no '.'): read as data unless they are a file inside an allowed directory
    name = "A" * 200  # the whole path is over 256 characters, without a dot
    (secret.parent / name).write_bytes(SECRET)
    there, absent = str(secret.parent / name), str(secret.parent / ("B" * 200))
    assert len(there) > 256 and "." not in there
    assert _message(there, policy).replace("A", "B") == _message(absent, policy)
    # ~user: never looked up
    assert _message("~root/x.png", policy).replace("root", "U") == _message("~nosuchuser42/x.png", policy).replace(
        "nosuchuser42", "U"
    )


def test_a_base64_looking_name_inside_an_allowed_directory_is_read_as_a_file(
    allowed: Path, policy: ImagePolicy
) -> None:
    name = "Q" * 200
    (allowed / name).write_bytes(GOOD)
    assert len(str(allowed / name)) > 256 and "." not in str(allowed / name)
    assert load_image(str(allowed / name), policy).digest == GOOD_DIGEST
    text = base64.b64encode(GOOD).decode()
    assert load_image(text, ImagePolicy(allowed_dirs=(allowed,))).digest == GOOD_DIGEST  # data, not a file


# ---------------------------------------------------------------------------------------------------------------------
# ~ and ~user


def test_a_bare_tilde_expands_from_home_and_tilde_user_is_refused(
    allowed: Path, policy: ImagePolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(allowed))
    assert load_image("~/good.png", policy).digest == GOOD_DIGEST
    message = _message("~root/good.png", policy)
    assert message == (
        "'~root/good.png' starts with '~root': other users' home directories are not expanded (only '~' and "
        "'~/...' are, from $HOME); give the full path, or './~root/good.png' for a file whose name starts with '~'"
    )
    monkeypatch.chdir(allowed)
    (allowed / "~root").mkdir()
    (allowed / "~root" / "good.png").write_bytes(GOOD)
    assert load_image("./~root/good.png", policy).digest == GOOD_DIGEST


# ---------------------------------------------------------------------------------------------------------------------
# Exact names


def test_a_path_is_used_exactly_as_given(allowed: Path, policy: ImagePolicy) -> None:
    (allowed / "spaced.png ").write_bytes(SECRET)
    (allowed / "plain.png").write_bytes(GOOD)
    assert load_image(f"{allowed}/spaced.png ", policy).digest == SECRET_DIGEST
    assert (
        _message(f"{allowed}/plain.png ", policy)
        == f"no image file at '{allowed}/plain.png ' (the name ends with a space)"
    )
    assert "(the name starts with a space)" in _message(f" {allowed}/plain.png", policy)
    assert "(the name ends with a newline)" in _message(f"{allowed}/plain.png\n", policy)
    # URLs, data: URIs and handles are still read stripped
    uri = "data:image/png;base64," + base64.b64encode(GOOD).decode()
    assert load_image(f"  {uri}\n", policy).digest == GOOD_DIGEST


# ---------------------------------------------------------------------------------------------------------------------
# Files that are not regular, links, the allowed directories' own spellings


def test_a_fifo_does_not_block_and_is_not_a_regular_file(allowed: Path, policy: ImagePolicy) -> None:
    os.mkfifo(allowed / "pipe.png")
    start = time.perf_counter()
    assert "is not a regular file" in _message(allowed / "pipe.png", policy)
    assert time.perf_counter() - start < 2


def test_links_are_not_followed_anywhere_below_an_allowed_directory(
    allowed: Path, secret: Path, policy: ImagePolicy
) -> None:
    (allowed / "sub").mkdir()
    (allowed / "sub" / "in.png").write_bytes(GOOD)
    (allowed / "sublink").symlink_to(allowed / "sub", target_is_directory=True)
    (allowed / "dangling.png").symlink_to(allowed / "nowhere.png")
    assert load_image(allowed / "sub" / "in.png", policy).digest == GOOD_DIGEST
    assert "goes through a symbolic link ('sublink')" in _message(allowed / "sublink" / "in.png", policy)
    assert "is a symbolic link" in _message(allowed / "dangling.png", policy)
    # ".." is resolved lexically: sub/../good.png is good.png, even through a name that does not exist
    assert load_image(f"{allowed}/nothing/../good.png", policy).digest == GOOD_DIGEST
    assert "not a directory" in _message(allowed / "good.png" / "x.png", policy)


def test_an_allowed_directory_given_through_a_link_accepts_both_spellings(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "good.png").write_bytes(GOOD)
    (tmp_path / "spelled").symlink_to(real, target_is_directory=True)
    policy = ImagePolicy(allowed_dirs=(tmp_path / "spelled",))
    assert policy.allowed_dirs == (real.resolve(),)
    assert set(policy.allowed_roots) == {str(real.resolve()), str(tmp_path / "spelled")}
    assert load_image(tmp_path / "spelled" / "good.png", policy).digest == GOOD_DIGEST  # as the operator wrote it
    assert load_image(real / "good.png", policy).digest == GOOD_DIGEST  # resolved


def test_the_fallback_without_dir_fd_refuses_links_and_reads_files(
    allowed: Path, secret: Path, policy: ImagePolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(image_files, "_DIR_FD", False)
    (allowed / "link.png").symlink_to(secret)
    (allowed / "sub").mkdir()
    (allowed / "sub" / "in.png").write_bytes(GOOD)
    assert load_image(allowed / "sub" / "in.png", policy).digest == GOOD_DIGEST
    assert "is a symbolic link" in _message(allowed / "link.png", policy)
    assert "no image file at" in _message(allowed / "missing.png", policy)
    assert "is not a regular file" in _message(allowed / "sub", policy)
    assert "outside the allowed directories" in _message(secret, policy)
