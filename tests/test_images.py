"""Image references (phi3v_tools.images): paths, data: URIs, base64, handles, decoding limits and URL fetching (SSRF).

Every refusal is an ImageError whose message says what was wrong and what is allowed; the tests assert on fragments
of those messages. URL tests only ever talk to servers of their own on loopback (127.0.0.1, 127.0.0.2, ::1); the
non-loopback cases run with socket connections blocked and recorded.
"""

from __future__ import annotations

import base64
import http.server
import io
import os
import socket
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, features

from phi3v_tools import images as images_module
from phi3v_tools.errors import ImageError, Phi3VToolsError
from phi3v_tools.feature_cache import image_digest
from phi3v_tools.images import (
    HANDLE_PREFIX,
    ImagePolicy,
    ImageStore,
    LoadedImage,
    check_address,
    decode_bytes,
    load_image,
)
from tests.hostile import (
    HTML,
    PNG,
    Recorder,
    body_route,
    chunked_route,
    encode,
    noise,
    png_header_claiming,
    redirect_route,
    serving,
    trickle,
)

# ---------------------------------------------------------------------------------------------------------------------
# Helpers


def _refused(ref: Any, policy: ImagePolicy, *fragments: str, store: ImageStore | None = None) -> str:
    """Load ``ref`` expecting an ImageError whose message holds every fragment; return the message."""
    with pytest.raises(ImageError) as info:
        load_image(ref, policy, store)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    message.encode("utf-8")  # a clean message: printable and sendable as UTF-8 JSON
    return message


@pytest.fixture
def allowed(tmp_path: Path) -> Path:
    folder = tmp_path / "allowed"
    folder.mkdir()
    return folder


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    folder = tmp_path / "outside"
    folder.mkdir()
    return folder


@pytest.fixture
def policy(allowed: Path) -> ImagePolicy:
    return ImagePolicy(allowed_dirs=(allowed,))


# ---------------------------------------------------------------------------------------------------------------------
# Paths and file:// URLs


def test_a_path_inside_an_allowed_directory_loads_as_str_or_pathlike(allowed: Path, policy: ImagePolicy) -> None:
    path = allowed / "picture.png"
    path.write_bytes(PNG)
    for ref in (path, str(path)):
        loaded = load_image(ref, policy)
        assert (loaded.width, loaded.height) == (16, 12)
        assert loaded.image.mode == "RGB"
        assert loaded.digest == image_digest(noise())
        assert "picture.png" in loaded.source
    # a path is used exactly as given (a name may end with a space); the message says why it was not found
    _refused(f"{path} ", policy, "no image file at", "(the name ends with a space)")


def test_a_path_outside_the_allowed_directories_is_refused(allowed: Path, outside: Path, policy: ImagePolicy) -> None:
    path = outside / "picture.png"
    path.write_bytes(PNG)
    message = _refused(path, policy, "outside the allowed directories", str(allowed.resolve()), "PHI3V_ALLOWED_DIRS")
    assert "base64" in message  # and what to do instead


def test_dotdot_cannot_escape_the_allowed_directory(allowed: Path, outside: Path, policy: ImagePolicy) -> None:
    (outside / "picture.png").write_bytes(PNG)
    _refused(f"{allowed}/../outside/picture.png", policy, "outside the allowed directories")
    # sub/ does not exist: the path is normalised lexically and checked before the file system is asked
    _refused(f"{allowed}/sub/../../outside/picture.png", policy, "outside the allowed directories")


def test_a_symlink_inside_the_allowed_directory_pointing_outside_is_refused(
    allowed: Path, outside: Path, policy: ImagePolicy
) -> None:
    (outside / "secret.png").write_bytes(PNG)
    (allowed / "link.png").symlink_to(outside / "secret.png")
    (allowed / "dirlink").symlink_to(outside, target_is_directory=True)
    _refused(allowed / "link.png", policy, "is a symbolic link", "outside the allowed directories")
    _refused(allowed / "dirlink" / "secret.png", policy, "goes through a symbolic link ('dirlink')")


def test_a_symlink_inside_the_allowed_directory_is_not_followed_even_to_a_file_inside(
    allowed: Path, policy: ImagePolicy
) -> None:
    (allowed / "real.png").write_bytes(PNG)
    (allowed / "alias.png").symlink_to(allowed / "real.png")
    _refused(allowed / "alias.png", policy, "is a symbolic link; links are not followed", "give the path of the file")
    assert load_image(allowed / "real.png", policy).digest == image_digest(noise())


def test_a_directory_or_a_missing_file_is_an_error(allowed: Path, policy: ImagePolicy) -> None:
    (allowed / "folder").mkdir()
    _refused(allowed / "folder", policy, "is not a regular file")
    _refused(allowed / "missing.png", policy, "no image file at", "missing.png")


def test_proc_and_dev_files_are_outside_the_default_allowed_directories(allowed: Path, policy: ImagePolicy) -> None:
    for path in ("/proc/self/environ", "/dev/zero"):
        message = _refused(path, policy, "outside the allowed directories", "PHI3V_ALLOWED_DIRS")
        assert os.environ.get("PATH", "/no/path/set") not in message  # nothing of the environment leaks


def test_with_root_allowed_devices_are_not_regular_files_and_proc_text_is_not_an_image() -> None:
    everything = ImagePolicy(allowed_dirs=(Path("/"),))
    _refused("/dev/zero", everything, "is not a regular file")
    message = _refused(f"/proc/{os.getpid()}/status", everything, "not a readable image", "PNG, JPEG")
    assert "VmRSS" not in message and "Name:" not in message  # the file's text is not echoed back


def test_a_path_with_a_nul_byte_is_an_image_error(allowed: Path, policy: ImagePolicy) -> None:
    for ref in (f"{allowed}/a\x00b.png", f"file://{allowed}/a%00b.png"):
        with pytest.raises(Phi3VToolsError):
            load_image(ref, policy)


def test_non_utf8_file_names_load(allowed: Path, policy: ImagePolicy) -> None:
    raw = os.path.join(os.fsencode(allowed), b"caf\xe9-\xff.png")
    with open(raw, "wb") as f:
        f.write(PNG)
    name = os.fsdecode(raw)  # surrogate-escaped str, as os.listdir would give it
    assert load_image(name, policy).digest == image_digest(noise())
    assert load_image(Path(name), policy).digest == image_digest(noise())
    # bytes are image data, never a path: a bytes file name fails as "not an image", cleanly
    _refused(raw, policy, "not a readable image")
    # a file:// URL percent-encoding the raw bytes does not find it, and says so cleanly
    _refused("file://" + urllib.parse.quote(raw), policy, "no image file")


def test_a_corrupt_file_with_a_non_utf8_name_fails_with_an_encodable_message(
    allowed: Path, policy: ImagePolicy
) -> None:
    raw = os.path.join(os.fsencode(allowed), b"bad-\xff.png")
    with open(raw, "wb") as f:
        f.write(b"this is text, not an image")
    _refused(os.fsdecode(raw), policy, "not a readable image")


def test_file_urls_follow_the_same_rules(allowed: Path, outside: Path, policy: ImagePolicy) -> None:
    (allowed / "in side.png").write_bytes(PNG)
    (outside / "secret.png").write_bytes(PNG)
    (allowed / "link.png").symlink_to(outside / "secret.png")
    inside = urllib.parse.quote(str(allowed / "in side.png"))
    assert load_image(f"file://{inside}", policy).width == 16
    assert load_image(f"file://localhost{inside}", policy).width == 16
    _refused(f"file://{outside}/secret.png", policy, "outside the allowed directories", "PHI3V_ALLOWED_DIRS")
    _refused(f"file://{allowed}/../outside/secret.png", policy, "outside the allowed directories")
    _refused(f"file://{allowed}/link.png", policy, "outside the allowed directories")
    _refused(f"file://{allowed}", policy, "not a regular file")
    _refused(f"file://{allowed}/missing.png", policy, "no image file")


def test_a_file_url_naming_another_host_is_refused(policy: ImagePolicy) -> None:
    _refused("file://otherhost/x", policy, "otherhost", "file:///path")
    _refused("file://127.0.0.1/etc/passwd", policy, "must name a local file")


def test_other_reference_types_and_empty_strings_are_errors(policy: ImagePolicy) -> None:
    _refused(12345, policy, "not int", "path, URL, data: URI, base64")
    _refused("   ", policy, "empty", "path, URL, data: URI, base64 or image handle")


def test_a_long_path_without_a_dot_is_read_as_a_path(allowed: Path, policy: ImagePolicy) -> None:
    folder = allowed / ("a" * 100) / ("b" * 100)
    folder.mkdir(parents=True)
    path = folder / ("c" * 80)
    path.write_bytes(PNG)
    if "." in str(path):
        pytest.skip("the temporary directory has a '.' in its path")
    assert len(str(path)) > 256
    assert load_image(str(path), policy).digest == image_digest(noise())


# ---------------------------------------------------------------------------------------------------------------------
# data: URIs and base64


def test_a_png_data_uri_loads(policy: ImagePolicy) -> None:
    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert load_image(uri, policy).digest == image_digest(noise())
    # the media type is not trusted: a JPEG labelled image/png still decodes by its bytes
    jpeg = encode(noise(), "JPEG")
    assert load_image("DATA:image/png;base64," + base64.b64encode(jpeg).decode(), policy).width == 16


def test_bare_base64_loads_including_wrapped_lines(policy: ImagePolicy) -> None:
    text = base64.b64encode(PNG).decode()
    assert len(text) > 256
    assert load_image(text, policy).digest == image_digest(noise())
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    assert load_image(wrapped, policy).digest == image_digest(noise())
    assert load_image(text.rstrip("="), policy).digest == image_digest(noise())  # missing padding is tolerated


def _urlsafe_png(want_dash: bool) -> tuple[Image.Image, str]:
    """A PNG whose url-safe base64 holds '_' and, as asked, '-' or no '-'."""
    for seed in range(3000):  # a few hundred characters of base64: one in a few dozen has no '-'
        grey = np.random.default_rng(seed).integers(0, 256, size=(8, 8), dtype=np.uint8)
        image = Image.fromarray(grey).convert("RGB")
        text = base64.urlsafe_b64encode(encode(image)).decode()
        if "_" in text and ("-" in text) == want_dash and len(text) > 256:
            return image, text
    raise AssertionError("no suitable image found")


def test_urlsafe_base64_loads(policy: ImagePolicy) -> None:
    image, text = _urlsafe_png(want_dash=True)
    assert load_image(text, policy).digest == image_digest(image)
    assert load_image("data:image/png;base64," + text, policy).digest == image_digest(image)


def test_urlsafe_base64_with_underscores_but_no_dashes_loads(policy: ImagePolicy) -> None:
    image, text = _urlsafe_png(want_dash=False)
    assert load_image(text, policy).digest == image_digest(image)


def test_invalid_base64_is_an_error(policy: ImagePolicy) -> None:
    _refused("data:image/png;base64,AAAAA", policy, "data: URI is not valid base64")
    _refused("A" * 257, policy, "base64 data is not valid base64")
    _refused("data:image/png;base64,", policy, "empty")
    # decodable base64 that is not an image
    _refused("data:image/png;base64," + base64.b64encode(HTML).decode(), policy, "not a readable image")


def test_a_data_uri_that_is_not_base64_image_data_explains_the_format(policy: ImagePolicy) -> None:
    for uri in ("data:text/plain,hi", "data:image/png,rawbytes", "data:text/html;base64,PGI+", "data:"):
        _refused(uri, policy, "data:image/png;base64,<data>")


def test_huge_base64_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    small = ImagePolicy(max_bytes=2**20)
    decoded: list[int] = []

    def spy(*args: Any, **kwargs: Any) -> bytes:
        decoded.append(1)
        raise AssertionError("b64decode must not run")

    monkeypatch.setattr(images_module.base64, "b64decode", spy)
    huge = "QUFB" * (2**20 // 3 + 2048)  # ~1.4 MB of base64 for a 1 MiB limit
    _refused(huge, small, "larger than the 1 MiB image limit")
    _refused("data:image/png;base64," + huge, small, "data: URI is larger than the 1 MiB image limit")
    assert decoded == []


def test_the_base64_size_message_states_the_real_limit() -> None:
    limit = 3 * 2**19  # 1.5 MiB, e.g. PHI3V_MAX_IMAGE_MB=1.5
    message = _refused("QUFB" * (limit // 2), ImagePolicy(max_bytes=limit), "larger than")
    assert "1572864" in message or "1.5 MiB" in message


# ---------------------------------------------------------------------------------------------------------------------
# Handles


def test_a_handle_resolves_through_the_same_store_to_the_same_image(allowed: Path, policy: ImagePolicy) -> None:
    (allowed / "picture.png").write_bytes(PNG)
    store = ImageStore()
    loaded = load_image(allowed / "picture.png", policy, store)
    assert loaded.handle == HANDLE_PREFIX + loaded.digest
    again = load_image(loaded.handle, policy, store)
    assert again.digest == loaded.digest
    assert again.image.tobytes() == loaded.image.tobytes()
    # another store (another server) does not know it
    _refused(loaded.handle, policy, "unknown image handle", "send the image itself again", store=ImageStore())
    _refused(loaded.handle, policy, "send the image itself again")  # no store at all


def test_an_unknown_handle_says_to_resend(policy: ImagePolicy) -> None:
    _refused(HANDLE_PREFIX + "0" * 64, policy, "unknown image handle", "send the image", store=ImageStore())


def test_a_malformed_handle_is_an_error(policy: ImagePolicy) -> None:
    store = ImageStore()
    for ref in (
        "image://sha256/xyz",
        "image://sha256/" + "A" * 64,
        "image://sha256/" + "0" * 63,
        "image://md5/" + "0" * 32,
        "image://",
    ):
        _refused(ref, policy, "is not an image handle", "64 hex digits", store=store)


def test_the_store_is_a_bounded_lru() -> None:
    store = ImageStore(max_images=2)
    loaded = [LoadedImage(noise(4, 4, seed), image_digest(noise(4, 4, seed)), "test") for seed in range(3)]
    store.add(loaded[0])
    store.add(loaded[1])
    assert store.get(loaded[0].digest) is loaded[0]  # now the most recently used
    store.add(loaded[2])
    assert store.get(loaded[1].digest) is None  # the least recently used went
    assert store.get(loaded[0].digest) is loaded[0]
    assert store.get(loaded[2].digest) is loaded[2]
    store.add(loaded[2])  # re-adding does not grow it
    assert sum(store.get(x.digest) is not None for x in loaded) == 2


def test_the_store_is_bounded_in_pixel_bytes_as_well_as_count() -> None:
    flat = [LoadedImage(Image.new("RGB", (100, 100), (i, 0, 0)), f"{i:064x}", "test") for i in range(5)]
    store = ImageStore(max_images=64, max_bytes=100_000)  # 30000 bytes an image: three fit
    for loaded in flat:
        store.add(loaded)
    assert len(store) == 3 and store.nbytes == 90_000
    assert [store.get(x.digest) is not None for x in flat] == [False, False, True, True, True]
    store.add(flat[2])  # re-adding counts once
    assert store.nbytes == 90_000
    big = LoadedImage(Image.new("RGB", (200, 200)), "f" * 64, "big")  # 120000 bytes: larger than the store
    store.add(big)
    assert store.get(big.digest) is None and len(store) == 3 and store.nbytes == 90_000
    few = ImageStore(max_images=2, max_bytes=10**9)
    for loaded in flat:
        few.add(loaded)
    assert len(few) == 2 and few.nbytes == 60_000


def test_large_flat_pngs_keep_the_store_within_its_bytes(allowed: Path, policy: ImagePolicy) -> None:
    """Large flat PNGs are a few kilobytes each but 12 MB of pixels: the store keeps what fits in its bytes."""
    store = ImageStore(max_bytes=32 * 2**20)
    for i in range(8):
        data = encode(Image.new("RGB", (2000, 2000), (i, i, i)), optimize=True)
        load_image(data, policy, store)
    assert len(store) == 2 and store.nbytes == 2 * 2000 * 2000 * 3


def test_a_stored_image_is_our_own_plain_copy(policy: ImagePolicy) -> None:
    """Not the caller's image (which it may change later), nor the decoded file with its buffers and metadata."""
    mine = noise(8, 6)
    loaded = load_image(mine, policy)
    assert loaded.image is not mine
    mine.putpixel((0, 0), (1, 2, 3))
    assert image_digest(loaded.image) == loaded.digest
    decoded = load_image(encode(noise(8, 6), "JPEG", comment=b"x" * 1000), policy)
    assert type(decoded.image) is Image.Image and decoded.image.info == {}


# ---------------------------------------------------------------------------------------------------------------------
# Decoding


@pytest.fixture(scope="module")
def jpeg_bytes() -> bytes:
    return encode(noise(64, 48), "JPEG", quality=90)


def test_zero_bytes_are_an_error(policy: ImagePolicy) -> None:
    _refused(b"", policy, "is empty")
    with pytest.raises(ImageError, match="is empty"):
        decode_bytes(b"", "upload", policy)


def test_truncated_png_and_jpeg_are_errors(policy: ImagePolicy, jpeg_bytes: bytes) -> None:
    png = encode(noise(64, 48))
    for data in (png[: len(png) // 2], jpeg_bytes[: len(jpeg_bytes) // 2], png[:40]):
        _refused(data, policy, "not a readable image", "send a PNG, JPEG, GIF, WebP, BMP or TIFF file")


def test_a_text_file_named_png_is_an_error(allowed: Path, policy: ImagePolicy) -> None:
    (allowed / "notes.png").write_text("hello, I am text\n" * 20)
    _refused(allowed / "notes.png", policy, "not a readable image", "PNG, JPEG")


@pytest.mark.parametrize(
    "data",
    [
        b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>',
        HTML,
        b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n",
        encode(Image.new("RGB", (4, 4)), "PDF"),
    ],
    ids=["svg", "html", "pdf", "pillow-pdf"],
)
def test_non_raster_bytes_are_refused(data: bytes, policy: ImagePolicy) -> None:
    message = _refused(data, policy, "not a readable image")
    assert "PNG, JPEG, GIF, WebP, BMP or TIFF" in message


@pytest.mark.parametrize(
    ("data", "name"),
    [
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "EPS"),
        (encode(Image.new("RGB", (4, 4)), "PPM"), "PPM"),
        (encode(Image.new("RGB", (16, 16)), "ICO"), "ICO"),
    ],
    ids=["eps", "ppm", "ico"],
)
def test_raster_formats_outside_the_allowlist_are_refused_by_name(data: bytes, name: str, policy: ImagePolicy) -> None:
    _refused(data, policy, f"{name} file", "allowed formats:", "JPEG", "PNG", "WEBP")


def test_a_header_claiming_a_huge_image_is_refused_as_a_bomb(policy: ImagePolicy) -> None:
    start = time.perf_counter()
    _refused(png_header_claiming(100_000, 100_000), policy, "too many pixels", "decompression bomb")
    # over our own limit (40 MP by default) but under Pillow's: refused by the header, with the limit in the message
    _refused(png_header_claiming(7000, 7000), policy, "7000x7000 = 49000000 pixels", "the limit is 40000000")
    assert time.perf_counter() - start < 2


def test_a_real_large_image_over_max_pixels_is_refused_before_decoding() -> None:
    data = encode(Image.new("L", (8000, 8000), 7), "PNG")
    lowered = ImagePolicy(max_pixels=1_000_000)
    start = time.perf_counter()
    _refused(data, lowered, "8000x8000 = 64000000 pixels", "the limit is 1000000", "downscale")
    assert time.perf_counter() - start < 0.5  # only the header was read
    # PIL images handed in directly obey the same limit
    _refused(Image.new("L", (2000, 1000)), lowered, "2000x1000 = 2000000 pixels")


def test_an_extreme_aspect_ratio_is_fine(policy: ImagePolicy) -> None:
    loaded = load_image(encode(Image.new("RGB", (1, 10000), (9, 8, 7))), policy)
    assert (loaded.width, loaded.height) == (1, 10000)


def _modes() -> list[Any]:
    sixteen = Image.fromarray(np.full((5, 7), 0x8000, dtype=np.uint16))
    palette = Image.new("P", (7, 5), 1)
    palette.putpixel((0, 0), 0)  # one transparent pixel
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    la = Image.new("LA", (7, 5), (200, 255))
    la.putpixel((0, 0), (50, 0))
    cmyk = Image.new("CMYK", (7, 5), (0, 0, 0, 0))
    return [
        pytest.param(encode(sixteen), "I;16", (128, 128, 128), id="16-bit-grey-png"),
        pytest.param(encode(palette, transparency=0), "P", (10, 200, 30), id="palette-with-alpha"),
        pytest.param(encode(la), "LA", (200, 200, 200), id="LA"),
        pytest.param(encode(Image.new("RGBA", (7, 5), (1, 2, 3, 0))), "RGBA", None, id="RGBA"),
        pytest.param(encode(cmyk, "JPEG"), "CMYK", None, id="CMYK-jpeg"),
        pytest.param(encode(cmyk, "TIFF"), "CMYK", (255, 255, 255), id="CMYK-tiff"),
    ]


@pytest.mark.parametrize(("data", "mode", "colour"), _modes())
def test_other_modes_become_rgb(
    data: bytes, mode: str, colour: tuple[int, int, int] | None, policy: ImagePolicy
) -> None:
    assert Image.open(io.BytesIO(data)).mode == mode
    loaded = load_image(data, policy)
    assert loaded.image.mode == "RGB"
    assert (loaded.width, loaded.height) == (7, 5)
    if colour is not None:
        assert all(abs(a - b) <= 1 for a, b in zip(loaded.image.getpixel((3, 2)), colour, strict=True))


def test_an_animated_gif_uses_its_first_frame(policy: ImagePolicy) -> None:
    red, green, blue = (Image.new("RGB", (8, 6), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255)))
    data = encode(red, "GIF", save_all=True, append_images=[green, blue], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    loaded = load_image(data, policy)
    assert loaded.image.mode == "RGB"
    assert loaded.image.getpixel((4, 3)) == (255, 0, 0)


def test_an_exif_rotated_jpeg_is_rotated(policy: ImagePolicy) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    data = encode(Image.new("RGB", (40, 20), (50, 100, 150)), "JPEG", exif=exif.tobytes())
    loaded = load_image(data, policy)
    assert (loaded.width, loaded.height) == (20, 40)


def _lossless_formats() -> list[Any]:
    formats = [pytest.param("BMP", {}, id="BMP"), pytest.param("TIFF", {}, id="TIFF")]
    if features.check("webp"):
        formats.append(pytest.param("WEBP", {"lossless": True}, id="WEBP-lossless"))
    return formats


@pytest.mark.parametrize(("fmt", "options"), _lossless_formats())
def test_the_digest_is_the_same_for_the_same_pixels_in_any_format(
    fmt: str, options: dict[str, Any], policy: ImagePolicy
) -> None:
    image = noise(10, 9, seed=3)
    as_png = load_image(encode(image, "PNG"), policy)
    other = load_image(encode(image, fmt, **options), policy)
    assert other.digest == as_png.digest == load_image(image, policy).digest == image_digest(image)
    assert other.handle == as_png.handle


def test_the_digest_changes_when_one_pixel_changes(policy: ImagePolicy) -> None:
    image = noise(10, 9, seed=3)
    changed = image.copy()
    r, g, b = changed.getpixel((5, 5))
    changed.putpixel((5, 5), (r, g, (b + 1) % 256))
    assert load_image(encode(image), policy).digest != load_image(encode(changed), policy).digest
    # the size is part of the identity: the same bytes in another shape differ too
    reshaped = Image.frombytes("RGB", (9, 10), image.tobytes())
    assert image_digest(reshaped) != image_digest(image)


# ---------------------------------------------------------------------------------------------------------------------
# URLs: a recording server of our own on loopback


@pytest.fixture
def web() -> Iterator[Recorder]:
    with serving() as server:
        server.routes["/img.png"] = body_route(PNG)
        yield server


TRUSTED = ImagePolicy(trusted_hosts=frozenset({"127.0.0.1"}), url_timeout_s=5.0)


@pytest.fixture
def blocked_sockets(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every outgoing connection attempt is recorded and refused (no packet leaves the process)."""
    attempts: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        attempts.append(args[1:] if args and isinstance(args[0], socket.socket) else args)
        raise OSError("connections are blocked in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "localhost",
        "2130706433",  # 127.0.0.1 as one decimal number
        "0x7f000001",  # hexadecimal
        "017700000001",  # octal
        "127.1",  # short form
        "[::ffff:127.0.0.1]",  # IPv4-mapped IPv6
        "0.0.0.0",  # reaches the local host on Linux
    ],
)
def test_loopback_urls_are_refused_by_default_and_never_requested(web: Recorder, host: str) -> None:
    if host == "localhost" and "localhost" not in Path("/etc/hosts").read_text():
        pytest.skip("'localhost' is not in /etc/hosts: resolving it could query a DNS server")
    message = _refused(f"http://{host}:{web.port}/img.png", ImagePolicy(), "refusing to fetch")
    assert "only public internet addresses" in message and "base64" in message
    time.sleep(0.05)
    assert web.requests == []


def test_ipv6_loopback_is_refused_and_never_requested() -> None:
    if not _ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    with serving("::1", socket.AF_INET6) as server:
        server.routes["/img.png"] = body_route(PNG)
        _refused(f"http://[::1]:{server.port}/img.png", ImagePolicy(), "::1 is a loopback address")
        _refused(f"http://localhost:{server.port}/img.png", ImagePolicy(), "loopback")
        # the server works: trusted, it is fetched
        assert load_image(f"http://[::1]:{server.port}/img.png", ImagePolicy(trusted_hosts=frozenset({"::1"}))).width
        assert len(server.requests) == 1


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://169.254.169.254/latest/meta-data/", "169.254.0.0/16"),
        ("http://100.100.100.200/", "100.64.0.0/10"),
        ("http://10.0.0.1/", "private"),
        ("http://192.168.1.1/", "private"),
        ("http://172.16.5.4:8080/x.png", "private"),
        ("https://[fd00:ec2::254]/latest/meta-data/", "fd00:ec2::254"),
        ("http://[fe80::1]/", "fe80::1"),
        ("http://[::ffff:169.254.169.254]/", "169.254.169.254"),
        ("http://[64:ff9b::a9fe:a9fe]/", "64:ff9b::/96"),
        ("http://224.0.0.1/", "224.0.0.1"),
    ],
)
def test_special_addresses_are_refused_without_any_connection(
    blocked_sockets: list[Any], url: str, fragment: str
) -> None:
    _refused(url, ImagePolicy(), "refusing to fetch", fragment, "only public internet addresses")
    assert blocked_sockets == []


def test_the_connection_guard_would_see_a_connection(blocked_sockets: list[Any]) -> None:
    """Sanity check of the guard above: an allowed (public) address is attempted, and the guard blocks it."""
    public = ImagePolicy(resolver=lambda host, port: ["93.184.216.34"], url_timeout_s=1.0)
    _refused("http://public.test/img.png", public, "could not fetch")
    assert blocked_sockets and blocked_sockets[0][0][0] == "93.184.216.34"


def test_a_hostname_resolving_to_loopback_is_refused(web: Recorder, blocked_sockets: list[Any]) -> None:
    evil = ImagePolicy(resolver=lambda host, port: ["127.0.0.1"])
    _refused(f"http://evil.test:{web.port}/img.png", evil, "'evil.test'", "127.0.0.1 is a loopback address")
    assert web.requests == [] and blocked_sockets == []


def test_a_hostname_with_any_special_address_is_refused(blocked_sockets: list[Any]) -> None:
    for addresses in (["93.184.216.34", "10.0.0.1"], ["2606:4700::1111", "169.254.169.254"], ["::1"]):
        mixed = ImagePolicy(resolver=lambda host, port, a=addresses: a)
        _refused("http://mixed.test/img.png", mixed, "refusing to fetch", "only public internet addresses")
    _refused("http://empty.test/", ImagePolicy(resolver=lambda host, port: []), "has no addresses")

    def fails(host: str, port: int) -> list[str]:
        raise socket.gaierror("no such host")

    _refused("http://nx.test/", ImagePolicy(resolver=fails), "cannot resolve the host 'nx.test'")
    assert blocked_sockets == []


def test_a_trusted_host_is_fetched_and_decoded(web: Recorder) -> None:
    store = ImageStore()
    loaded = load_image(f"http://127.0.0.1:{web.port}/img.png", TRUSTED, store)
    assert loaded.digest == image_digest(noise())
    assert store.get(loaded.digest) is loaded
    assert "URL http://127.0.0.1" in loaded.source
    assert [path for path, _ in web.requests] == ["/img.png"]


def test_the_connection_is_pinned_to_the_checked_address_and_keeps_the_host_name(web: Recorder) -> None:
    pinned = ImagePolicy(resolver=lambda host, port: ["127.0.0.1"], trusted_hosts=frozenset({"images.test"}))
    assert load_image(f"http://images.test:{web.port}/img.png", pinned).width == 16
    assert web.requests == [("/img.png", f"images.test:{web.port}")]


def test_proxies_from_the_environment_are_ignored(web: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    with serving() as proxy:
        for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "ALL_PROXY"):
            monkeypatch.setenv(name, f"http://127.0.0.1:{proxy.port}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        assert load_image(f"http://127.0.0.1:{web.port}/img.png", TRUSTED).width == 16
        assert proxy.requests == []
        assert len(web.requests) == 1


def test_a_redirect_to_an_untrusted_loopback_server_is_refused_at_the_redirect(web: Recorder) -> None:
    with serving("127.0.0.2") as second:
        second.routes["/img.png"] = body_route(PNG)
        web.routes["/go"] = redirect_route(f"http://127.0.0.2:{second.port}/img.png")
        _refused(f"http://127.0.0.1:{web.port}/go", TRUSTED, "refusing to fetch '127.0.0.2'", "loopback")
        time.sleep(0.05)
        assert [path for path, _ in web.requests] == ["/go"]
        assert second.requests == []


def test_a_redirect_to_a_special_address_never_connects(web: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    web.routes["/meta"] = redirect_route("http://169.254.169.254/latest/meta-data/", 301)
    web.routes["/rel"] = redirect_route("/img.png", 307)
    web.routes["/ftp"] = redirect_route("ftp://example.com/x.png")
    connected: list[Any] = []
    real_connect = socket.socket.connect

    def recording(sock: socket.socket, address: Any) -> Any:
        connected.append(address)
        if address[0] != "127.0.0.1":
            raise OSError("only loopback here")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", recording)
    _refused(f"http://127.0.0.1:{web.port}/meta", TRUSTED, "169.254.169.254", "only public internet addresses")
    _refused(f"http://127.0.0.1:{web.port}/ftp", TRUSTED, "a redirect led to 'ftp'", "only http(s)")
    assert load_image(f"http://127.0.0.1:{web.port}/rel", TRUSTED).width == 16  # relative, same trusted host
    assert {address[0] for address in connected} == {"127.0.0.1"}


def test_redirect_chains_longer_than_max_redirects_are_refused(web: Recorder) -> None:
    for n in range(1, 4):
        web.routes[f"/hop{n}"] = redirect_route(f"/hop{n - 1}" if n > 1 else "/img.png")
    two = ImagePolicy(trusted_hosts=frozenset({"127.0.0.1"}), max_redirects=2, url_timeout_s=5.0)
    assert load_image(f"http://127.0.0.1:{web.port}/hop2", two).width == 16  # two redirects: allowed
    web.requests.clear()
    _refused(f"http://127.0.0.1:{web.port}/hop3", two, "redirected more than 2 times")
    assert [path for path, _ in web.requests] == ["/hop3", "/hop2", "/hop1"]  # the last hop is never requested
    web.routes["/loop"] = redirect_route("/loop")
    _refused(f"http://127.0.0.1:{web.port}/loop", two, "redirected more than 2 times")


def test_a_declared_length_over_max_bytes_is_refused(web: Recorder) -> None:
    web.routes["/big"] = body_route(PNG, length=10**9)
    _refused(f"http://127.0.0.1:{web.port}/big", TRUSTED, "is 1000000000 bytes", f"the limit is {TRUSTED.max_bytes}")


def test_a_body_over_max_bytes_is_stopped_whatever_the_headers_say(web: Recorder) -> None:
    limit = 256 * 1024
    small = ImagePolicy(trusted_hosts=frozenset({"127.0.0.1"}), max_bytes=limit, url_timeout_s=5.0)
    big = PNG + b"\0" * (4 * limit)
    web.routes["/nolength"] = body_route(big, length=None)
    web.routes["/chunked"] = chunked_route(iter([big[i : i + 8192] for i in range(0, len(big), 8192)]))
    web.routes["/lying"] = body_route(HTML + b"\0" * (4 * limit), length=100)
    start = time.perf_counter()
    _refused(f"http://127.0.0.1:{web.port}/nolength", small, f"sent more than the {limit}-byte limit")
    _refused(f"http://127.0.0.1:{web.port}/chunked", small, f"sent more than the {limit}-byte limit")
    _refused(f"http://127.0.0.1:{web.port}/lying", small, "not a readable image")  # only the 100 declared bytes
    assert time.perf_counter() - start < 5


def test_a_silent_server_is_stopped_by_the_timeout(web: Recorder) -> None:
    web.routes["/silent"] = lambda h: time.sleep(3.0)
    quick = ImagePolicy(trusted_hosts=frozenset({"127.0.0.1"}), url_timeout_s=1.0)
    start = time.perf_counter()
    _refused(f"http://127.0.0.1:{web.port}/silent", quick, "took longer than 1 s")
    assert time.perf_counter() - start < 2.5  # the server goes on for 3 s


def test_an_endless_chunked_body_is_stopped_by_the_timeout(web: Recorder) -> None:
    web.routes["/endless"] = chunked_route(trickle(3.0))
    quick = ImagePolicy(trusted_hosts=frozenset({"127.0.0.1"}), url_timeout_s=1.0)
    start = time.perf_counter()
    _refused(f"http://127.0.0.1:{web.port}/endless", quick, "took longer than 1 s")
    assert time.perf_counter() - start < 2.5  # the server goes on for 3 s


def test_a_trickling_body_is_stopped_by_the_timeout(web: Recorder) -> None:
    def trickle(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.send_header("Content-Length", "100000")
        h.end_headers()
        for piece in trickle(3.0):
            h.wfile.write(piece)
            h.wfile.flush()

    web.routes["/trickle"] = trickle
    quick = ImagePolicy(trusted_hosts=frozenset({"127.0.0.1"}), url_timeout_s=1.0)
    start = time.perf_counter()
    with pytest.raises(ImageError):
        load_image(f"http://127.0.0.1:{web.port}/trickle", quick)
    assert time.perf_counter() - start < 2.5  # the server goes on for 3 s


def test_trickling_headers_are_stopped_by_the_timeout(web: Recorder) -> None:
    def slow_headers(h: http.server.BaseHTTPRequestHandler) -> None:
        h.wfile.write(b"HTTP/1.0 200 OK\r\n")
        for _ in trickle(3.0):
            h.wfile.write(b"X-Padding: x\r\n")
            h.wfile.flush()

    web.routes["/slow-headers"] = slow_headers
    quick = ImagePolicy(trusted_hosts=frozenset({"127.0.0.1"}), url_timeout_s=1.0)
    start = time.perf_counter()
    with pytest.raises(ImageError):
        load_image(f"http://127.0.0.1:{web.port}/slow-headers", quick)
    assert time.perf_counter() - start < 2.5  # the server goes on for 3 s


def test_the_bytes_decide_not_the_content_type(web: Recorder) -> None:
    web.routes["/png-as-text"] = body_route(PNG, content_type="text/plain")
    web.routes["/html-as-png"] = body_route(HTML, content_type="image/png")
    assert load_image(f"http://127.0.0.1:{web.port}/png-as-text", TRUSTED).digest == image_digest(noise())
    _refused(f"http://127.0.0.1:{web.port}/html-as-png", TRUSTED, "not a readable image", "PNG, JPEG")


def test_an_http_error_status_is_reported(web: Recorder) -> None:
    _refused(f"http://127.0.0.1:{web.port}/missing.png", TRUSTED, "answered HTTP 404")
    web.routes["/teapot"] = lambda h: h.send_error(500)
    _refused(f"http://127.0.0.1:{web.port}/teapot", TRUSTED, "answered HTTP 500")


def test_urls_can_be_turned_off(web: Recorder) -> None:
    off = ImagePolicy(allow_urls=False, trusted_hosts=frozenset({"127.0.0.1"}))
    _refused(f"http://127.0.0.1:{web.port}/img.png", off, "fetching URLs is turned off", "base64")
    _refused(f"HTTPS://127.0.0.1:{web.port}/img.png", off, "fetching URLs is turned off")
    assert web.requests == []


@pytest.mark.parametrize("url", ["ftp://example.com/a.png", "gopher://127.0.0.1:70/1", "sftp://h/x", "ws://h/x"])
def test_other_schemes_are_refused(url: str, blocked_sockets: list[Any]) -> None:
    scheme = url.split(":", 1)[0]
    _refused(url, ImagePolicy(), f"URL scheme {scheme!r} is not supported", "http(s)://", "data:")
    assert blocked_sockets == []


def test_urls_with_credentials_are_refused(web: Recorder) -> None:
    for userinfo in ("user:secret@", "user@", ":secret@"):
        message = _refused(f"http://{userinfo}127.0.0.1:{web.port}/img.png", TRUSTED, "credentials")
        assert "secret" not in message
    assert web.requests == []


# ---------------------------------------------------------------------------------------------------------------------
# check_address


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2001:4860:4860::8888"])
def test_public_addresses_pass(address: str) -> None:
    assert check_address(address) is None


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.255.255.254",
        "::1",
        "10.0.0.1",
        "10.255.255.255",
        "172.16.0.1",
        "172.31.255.254",
        "192.168.0.1",
        "100.64.0.1",
        "100.127.255.254",
        "100.100.100.200",
        "169.254.169.254",
        "169.254.0.1",
        "fd00:ec2::254",
        "fd12:3456::1",
        "fe80::1",
        "::ffff:10.0.0.1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "::ffff:8.8.8.8",  # IPv4-mapped: refused whatever it maps to (give the IPv4 address itself)
        "0.0.0.0",
        "0.1.2.3",
        "::",
        "224.0.0.1",
        "239.255.255.250",
        "ff02::1",
        "240.0.0.1",
        "255.255.255.255",
        "198.18.0.1",
        "64:ff9b::808:808",
        "192.0.2.1",
        "2001:db8::1",
    ],
)
def test_special_addresses_are_refused_with_a_reason(address: str) -> None:
    reason = check_address(address)
    assert reason is not None
    assert address.removeprefix("::ffff:") in reason


def test_check_address_edges_of_the_private_ranges() -> None:
    assert check_address("172.15.255.255") is None
    assert check_address("172.32.0.1") is None
    assert check_address("100.63.255.255") is None
    assert check_address("100.128.0.1") is None
    assert check_address("11.0.0.1") is None
