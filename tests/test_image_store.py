"""The on-disk image store (phi3v_tools.image_store): handles that outlive the process, bounded and safe."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from phi3v_tools import api
from phi3v_tools import image_store as image_store_module
from phi3v_tools.errors import ImageError
from phi3v_tools.image_store import DiskImageStore
from phi3v_tools.images import ImagePolicy, ImageStore, LoadedImage, load_image
from phi3v_tools.settings import Settings
from phi3v_tools.tools import ImageDescription, Toolbox
from tests.fakes import FakeBackend
from tests.hostile import encode, noise

REPO = Path(__file__).resolve().parent.parent


def picture(seed: int, width: int = 16, height: int = 12) -> LoadedImage:
    return load_image(noise(width, height, seed), ImagePolicy(allowed_dirs=()))


def stored(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def same_pixels(a: LoadedImage, b: LoadedImage) -> bool:
    return a.image.size == b.image.size and a.image.tobytes() == b.image.tobytes()


# ---------------------------------------------------------------------------------------------------------------------
# Across instances and processes


def test_a_handle_added_by_one_store_is_found_by_another_over_the_same_directory(tmp_path: Path) -> None:
    first = DiskImageStore(tmp_path / "images")
    loaded = picture(1)
    first.add(loaded)
    second = DiskImageStore(tmp_path / "images")
    assert len(second) == 0
    found = second.get(loaded.digest)
    assert found is not None and found.digest == loaded.digest and same_pixels(found, loaded)
    assert len(second) == 1  # a disk hit joins the memory layer


def test_a_handle_added_in_another_process_is_found_here(tmp_path: Path) -> None:
    snippet = (
        "import sys\n"
        "from phi3v_tools.image_store import DiskImageStore\n"
        "from phi3v_tools.images import ImagePolicy, load_image\n"
        "from tests.hostile import noise\n"
        "loaded = load_image(noise(16, 12, 7), ImagePolicy(allowed_dirs=()))\n"
        "DiskImageStore(sys.argv[1]).add(loaded)\n"
        "print(loaded.handle)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", snippet, str(tmp_path / "images")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    handle = done.stdout.strip().splitlines()[-1]
    here = load_image(handle, ImagePolicy(allowed_dirs=()), DiskImageStore(tmp_path / "images"))
    assert here.handle == handle and same_pixels(here, picture(7))


# ---------------------------------------------------------------------------------------------------------------------
# Files


def test_files_are_0600_in_a_0700_directory_and_named_only_by_their_digest(tmp_path: Path) -> None:
    store = DiskImageStore(tmp_path / "images")
    pictures = [picture(seed) for seed in range(3)]
    for loaded in pictures:
        store.add(loaded)
    directory = tmp_path / "images"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stored(directory) == sorted(p.digest + ".png" for p in pictures)  # no temporary file left behind
    for path in directory.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_adding_a_stored_picture_again_touches_its_file_instead_of_rewriting_it(tmp_path: Path) -> None:
    loaded = picture(1)
    DiskImageStore(tmp_path).add(loaded)
    path = tmp_path / (loaded.digest + ".png")
    os.utime(path, (1_000_000, 1_000_000))
    before = path.stat()
    DiskImageStore(tmp_path).add(loaded)
    after = path.stat()
    assert after.st_ino == before.st_ino and after.st_mtime > before.st_mtime


def test_the_disk_cap_holds_and_the_least_recently_used_file_goes(tmp_path: Path) -> None:
    old, newer, newest = picture(1), picture(2), picture(3)
    DiskImageStore(tmp_path).add(old)
    size = (tmp_path / (old.digest + ".png")).stat().st_size  # noise: every picture's PNG is about this size
    cap = int(size * 2.5)  # room for two
    first = DiskImageStore(tmp_path, max_disk_bytes=cap)
    first.add(newer)
    now = time.time()
    os.utime(tmp_path / (old.digest + ".png"), (now - 100, now - 100))
    os.utime(tmp_path / (newer.digest + ".png"), (now - 50, now - 50))
    second = DiskImageStore(tmp_path, max_disk_bytes=cap)
    assert second.get(old.digest) is not None  # a disk hit: the oldest file becomes the most recently used
    second.add(newest)
    assert stored(tmp_path) == sorted([old.digest + ".png", newest.digest + ".png"])
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) <= cap


def test_a_picture_whose_png_is_over_the_cap_alone_is_kept_in_memory_only(tmp_path: Path) -> None:
    loaded = picture(1)
    store = DiskImageStore(tmp_path / "images", max_disk_bytes=100)
    store.add(loaded)
    assert store.get(loaded.digest) is loaded
    assert not (tmp_path / "images").exists() or stored(tmp_path / "images") == []


def test_eviction_leaves_every_other_file_in_the_directory_alone(tmp_path: Path) -> None:
    others = ["notes.txt", "ABCDEF.png", "0" * 63 + ".png", "0" * 64 + ".PNG", "0" * 64 + ".png.bak"]
    for name in others:
        (tmp_path / name).write_bytes(b"x" * 10_000)
    store = DiskImageStore(tmp_path, max_disk_bytes=5_000)
    for seed in range(4):
        store.add(picture(seed))
    assert set(others) <= set(stored(tmp_path))


# ---------------------------------------------------------------------------------------------------------------------
# Hostile directories and handles


def test_a_tampered_file_is_not_returned_and_is_removed(tmp_path: Path) -> None:
    loaded, other = picture(1), picture(2)
    DiskImageStore(tmp_path).add(loaded)
    path = tmp_path / (loaded.digest + ".png")
    path.write_bytes(encode(other.image))  # a valid PNG, but other pixels than the name says
    assert DiskImageStore(tmp_path).get(loaded.digest) is None
    assert not path.exists()


def test_a_corrupt_file_is_not_returned_and_is_removed(tmp_path: Path) -> None:
    loaded = picture(1)
    DiskImageStore(tmp_path).add(loaded)
    path = tmp_path / (loaded.digest + ".png")
    path.write_bytes(path.read_bytes()[:100])  # truncated
    assert DiskImageStore(tmp_path).get(loaded.digest) is None
    assert not path.exists()


def test_a_symlink_planted_under_a_digest_name_is_not_followed(tmp_path: Path) -> None:
    loaded = picture(1)
    elsewhere = tmp_path / "elsewhere.png"
    elsewhere.write_bytes(encode(loaded.image))  # the right pixels: followed, the link would give a valid image
    directory = tmp_path / "images"
    directory.mkdir(mode=0o700)
    link = directory / (loaded.digest + ".png")
    link.symlink_to(elsewhere)
    store = DiskImageStore(directory)
    assert store.get(loaded.digest) is None
    assert elsewhere.read_bytes() == encode(loaded.image)
    store.add(loaded)  # a real file takes the link's place; the target is untouched
    assert not link.is_symlink() and DiskImageStore(directory).get(loaded.digest) is not None
    assert elsewhere.read_bytes() == encode(loaded.image)


@pytest.mark.parametrize(
    "digest",
    [
        "../" * 3 + "etc/passwd",
        "0" * 63,
        "0" * 65,
        "A" * 64,  # upper case: not the form digests take
        "0" * 64 + "\n",
        "0" * 32 + "/" + "0" * 31,
        "0" * 64 + ".png",
        "",
    ],
)
def test_a_malformed_digest_never_reaches_the_file_system(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, digest: str
) -> None:
    store = DiskImageStore(tmp_path)
    calls: list[str] = []

    def spy(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return real(*args, **kwargs)

        return recorded

    for name in ("open", "stat", "lstat", "utime", "scandir", "unlink", "replace", "makedirs"):
        monkeypatch.setattr(image_store_module.os, name, spy(name, getattr(os, name)))
    assert store.get(digest) is None
    monkeypatch.undo()
    assert calls == []
    with pytest.raises(ValueError):
        store._path(digest)


def test_a_handle_that_is_not_a_digest_is_refused_before_the_store(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="is not an image handle"):
        load_image("image://sha256/../../etc/passwd", ImagePolicy(allowed_dirs=()), DiskImageStore(tmp_path))


def test_an_unknown_handle_says_it_is_not_in_the_image_store(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"not among the images seen recently .*image store.*send the image itself"):
        load_image("image://sha256/" + "0" * 64, ImagePolicy(allowed_dirs=()), DiskImageStore(tmp_path))


def test_an_unusable_directory_does_not_fail_add_or_get(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "a-file").write_bytes(b"")
    store = DiskImageStore(tmp_path / "a-file" / "images")  # a path whose parent is a file: even root cannot write
    pictures = [picture(seed) for seed in range(3)]
    with caplog.at_level(logging.WARNING, logger="phi3v_tools.image_store"):
        for loaded in pictures:
            store.add(loaded)
        assert all(store.get(p.digest) is p for p in pictures)  # memory still works
    warnings = [r for r in caplog.records if r.name == "phi3v_tools.image_store"]
    assert len(warnings) == 1 and "memory only" in warnings[0].getMessage()  # once, not once per call
    assert DiskImageStore(tmp_path / "a-file" / "images").get(pictures[0].digest) is None


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into a read-only directory")
def test_a_read_only_directory_does_not_fail_add_or_get(tmp_path: Path) -> None:
    directory = tmp_path / "images"
    directory.mkdir(mode=0o500)
    try:
        store = DiskImageStore(directory)
        loaded = picture(1)
        store.add(loaded)
        assert store.get(loaded.digest) is loaded
        assert stored(directory) == []
    finally:
        directory.chmod(0o700)


# ---------------------------------------------------------------------------------------------------------------------
# Through the tools


def _toolbox(fake: FakeBackend, sample_images: dict[str, Path], directory: Path) -> Toolbox:
    return Toolbox(fake, ImagePolicy(allowed_dirs=(sample_images["chart"].parent,)), store=DiskImageStore(directory))


def test_a_handle_from_one_toolbox_works_in_another_over_the_same_directory(
    fake: FakeBackend, sample_images: dict[str, Path], tmp_path: Path
) -> None:
    first = _toolbox(fake, sample_images, tmp_path / "images").describe_image(sample_images["chart"])
    handle = first.images[0].handle
    other = FakeBackend()
    second = _toolbox(other, sample_images, tmp_path / "images").read_text(handle)
    assert second.images[0] == first.images[0]
    assert other.requests[0].image_digests == fake.requests[0].image_digests


def test_an_innocent_call_beside_one_naming_a_tampered_file_succeeds(
    fake: FakeBackend, sample_images: dict[str, Path], tmp_path: Path
) -> None:
    directory = tmp_path / "images"
    writer = _toolbox(fake, sample_images, directory)
    good = writer.describe_image(sample_images["chart"]).images[0].handle
    bad = writer.describe_image(sample_images["cover"]).images[0].handle
    tampered = directory / (bad.rsplit("/", 1)[1] + ".png")
    tampered.write_bytes((directory / (good.rsplit("/", 1)[1] + ".png")).read_bytes())
    reader = _toolbox(FakeBackend(), sample_images, directory)

    async def both() -> list[Any]:
        return await asyncio.gather(reader.adescribe_image(bad), reader.adescribe_image(good), return_exceptions=True)

    hostile, innocent = asyncio.run(both())
    assert isinstance(hostile, ImageError) and "unknown image handle" in str(hostile)
    assert isinstance(innocent, ImageDescription) and innocent.images[0].handle == good
    assert not tampered.exists()


def test_toolbox_from_settings_stores_handles_on_disk_only_when_image_store_dir_is_set(tmp_path: Path) -> None:
    on_disk = api.toolbox_from_settings(
        Settings(model="tiny", image_store_dir=tmp_path, image_store_mb=3, image_store_disk_mb=1.5)
    ).store
    assert isinstance(on_disk, DiskImageStore)
    assert on_disk.directory == tmp_path
    assert on_disk.max_bytes == 3 * 2**20 and on_disk.max_disk_bytes == int(1.5 * 2**20)
    in_memory = api.toolbox_from_settings(Settings(model="tiny")).store
    assert type(in_memory) is ImageStore
    off = api.toolbox_from_settings(Settings(model="tiny", image_store_dir=tmp_path, image_store_disk_mb=0)).store
    assert type(off) is ImageStore  # PHI3V_IMAGE_STORE_DISK_MB=0 turns the disk store off, also for the CLI


def test_a_directory_deleted_while_serving_is_made_again_at_the_next_write(tmp_path: Path) -> None:
    import shutil

    store = DiskImageStore(tmp_path / "images")
    store.add(picture(1))
    shutil.rmtree(tmp_path / "images")  # e.g. someone cleared the cache
    later = picture(2)
    store.add(later)
    assert stored(tmp_path / "images") == [later.digest + ".png"]
