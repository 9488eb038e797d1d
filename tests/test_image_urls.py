"""URLs (phi3v_tools.images): every entry of the IANA special-purpose registries is refused, directly and behind a
redirect; malformed URLs and responses get a clear ImageError (never another exception); non-ASCII paths are
percent-encoded and non-ASCII hosts IDNA-encoded, as browsers do. Servers are our own, on loopback.
"""

from __future__ import annotations

import csv
import http.server
import ipaddress
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phi3v_tools.errors import ImageError
from phi3v_tools.images import ImagePolicy, check_address, load_image
from tests.hostile import PNG, Recorder, body_route, redirect_route, serving

DATA = Path(__file__).parent / "data"


def _registry(name: str) -> list[dict[str, str]]:
    with open(DATA / name, newline="") as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


REGISTRIES = _registry("iana-ipv4-special-registry.csv") + _registry("iana-ipv6-special-registry.csv")


def test_the_registry_files_are_complete() -> None:
    assert len(REGISTRIES) == 26 + 25
    assert {row["globally_reachable"] for row in REGISTRIES} == {"True", "False", "N/A"}
    for row in REGISTRIES:
        ipaddress.ip_network(row["prefix"])  # each a valid prefix


@pytest.mark.parametrize("row", REGISTRIES, ids=[row["prefix"] for row in REGISTRIES])
def test_every_iana_special_purpose_entry_is_refused_first_and_last_address(row: dict[str, str]) -> None:
    network = ipaddress.ip_network(row["prefix"])
    for address in (network[0], network[-1]):
        assert check_address(str(address)) is not None, f"{address} ({row['name']}) is allowed"


@pytest.mark.parametrize("prefix", ["224.0.0.0/4", "ff00::/8", "fec0::/10", "::/8", "4000::/3", "e000::/4"])
def test_multicast_and_ipv6_outside_global_unicast_are_refused(prefix: str) -> None:
    network = ipaddress.ip_network(prefix)
    for address in (network[0], network[1], network[-1]):
        assert check_address(str(address)) is not None, address


@pytest.mark.parametrize(
    "address",
    ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "8.8.8.8", "1.1.1.1", "2001:4860:4860::8888", "2a00::1"],
)
def test_real_public_addresses_are_allowed(address: str) -> None:
    assert check_address(address) is None


@pytest.fixture
def web() -> Iterator[Recorder]:
    with serving() as server:
        server.routes["/img.png"] = body_route(PNG)
        yield server


def _documentation_only(host: str, port: int) -> list[str]:
    return ["192.0.2.1"]  # no DNS query ever leaves these tests: every name resolves to a refused address


TRUSTED = ImagePolicy(trusted_hosts=frozenset({"127.0.0.1"}), url_timeout_s=5.0, resolver=_documentation_only)


def test_local_use_nat64_is_refused_directly_and_through_a_redirect(web: Recorder, monkeypatch: Any) -> None:
    connected: list[Any] = []
    real_connect = socket.socket.connect

    def recording(sock: socket.socket, address: Any) -> Any:
        connected.append(address)
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", recording)
    with pytest.raises(ImageError, match=r"64:ff9b:1::/48"):
        load_image("http://[64:ff9b:1::a9fe:a9fe]/latest/meta-data/", ImagePolicy())
    web.routes["/nat64"] = redirect_route("http://[64:ff9b:1:0:0:0:a9fe:a9fe]/x.png")
    with pytest.raises(ImageError, match=r"refusing to fetch .*local-use NAT64"):
        load_image(f"http://127.0.0.1:{web.port}/nat64", TRUSTED)
    named = ImagePolicy(resolver=lambda host, port: ["64:ff9b:1::a00:1"])
    with pytest.raises(ImageError, match=r"64:ff9b:1::/48"):
        load_image("http://nat64.test/x.png", named)
    assert {address[0] for address in connected} == {"127.0.0.1"}


# ---------------------------------------------------------------------------------------------------------------------
# Malformed URLs


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://[::1/x.png", "malformed address"),
        ("http://127.0.0.1:99999/x.png", "invalid port"),
        ("http://127.0.0.1:-1/x.png", "invalid port"),
        ("http://127.0.0.1:abc/x.png", "invalid port"),
        ("http://127.0.0.1:0/x.png", "invalid port (0)"),
        ("http:///x.png", "has no host"),
        ("http://a..b/x.png", "host name that is not valid"),
        ("http://exa mple.test/x.png", "host name that is not valid"),
        ("http://" + "a" * 70 + ".test/", "host name that is not valid"),
        ("http://host\ud800.test/", "host name that is not valid"),
        ("http://127.0.0.1/\ud800.png", "characters that cannot be sent"),
        ("http://" + "a" * 20000, "at most 16384 are fetched"),
    ],
)
def test_malformed_urls_get_a_clear_image_error(url: str, fragment: str) -> None:
    with pytest.raises(ImageError) as info:
        load_image(url, TRUSTED)
    assert fragment in str(info.value), str(info.value)


def test_non_ascii_paths_and_queries_are_percent_encoded_as_browsers_do(web: Recorder) -> None:
    for path in ("/caf%C3%A9.png", "/a%20b.png", "/q.png?name=%C3%A9t%C3%A9&x=%22y%22", "/%7Bx%7D%60.png"):
        web.routes[path] = body_route(PNG)
    base = f"http://127.0.0.1:{web.port}"
    for url in (f"{base}/café.png", f"{base}/a b.png", f'{base}/q.png?name=été&x="y"', f"{base}/{{x}}`.png#frag"):
        assert load_image(url, TRUSTED).width == 16
    assert [path for path, _ in web.requests] == [
        "/caf%C3%A9.png",
        "/a%20b.png",
        "/q.png?name=%C3%A9t%C3%A9&x=%22y%22",
        "/%7Bx%7D%60.png",
    ]


def test_a_non_ascii_host_is_idna_encoded_for_dns_and_the_host_header(web: Recorder) -> None:
    asked: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        asked.append(host)
        return ["127.0.0.1"]

    policy = ImagePolicy(resolver=resolver, trusted_hosts=frozenset({"xn--caf-dma.test"}), url_timeout_s=5.0)
    assert load_image(f"http://café.test:{web.port}/img.png", policy).width == 16
    assert asked == ["xn--caf-dma.test"]
    assert web.requests == [("/img.png", f"xn--caf-dma.test:{web.port}")]


def _raw(response: bytes) -> Any:
    def route(h: http.server.BaseHTTPRequestHandler) -> None:
        h.wfile.write(response)

    return route


@pytest.mark.parametrize(
    ("headers", "fragment"),
    [
        (b"Content-Length: abc\r\n", "invalid Content-Length ('abc')"),
        (b"Content-Length: -5\r\n", "invalid Content-Length ('-5')"),
        (b"Content-Length: 99\r\nContent-Length: 100\r\n", "conflicting Content-Length headers"),
        (b"Content-Length: 99, 100\r\n", "conflicting Content-Length headers"),
        (b"Content-Length: 1e3\r\n", "invalid Content-Length"),
        (b"Content-Length: \xd9\xa3\r\n", "invalid Content-Length"),  # an Arabic-Indic digit: isdigit() but not ASCII
        (b"Content-Length: " + b"9" * 5000 + b"\r\n", "invalid Content-Length"),
    ],
)
def test_bad_content_lengths_are_refused(web: Recorder, headers: bytes, fragment: str) -> None:
    web.routes["/bad"] = _raw(b"HTTP/1.0 200 OK\r\nContent-Type: image/png\r\n" + headers + b"\r\n" + PNG)
    with pytest.raises(ImageError) as info:
        load_image(f"http://127.0.0.1:{web.port}/bad", TRUSTED)
    assert fragment in str(info.value), str(info.value)


def test_a_repeated_identical_content_length_is_accepted(web: Recorder) -> None:
    length = str(len(PNG)).encode()
    web.routes["/twice"] = _raw(
        b"HTTP/1.0 200 OK\r\nContent-Length: " + length + b"\r\nContent-Length: " + length + b"\r\n\r\n" + PNG
    )
    assert load_image(f"http://127.0.0.1:{web.port}/twice", TRUSTED).width == 16


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 302 Found\r\nLocation: http://[::1/x\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:99999/\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 302 Found\r\nLocation: \xc3\xa9\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nxxxxx\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 999 Whatever\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 abc\r\n\r\n",
        b"NOT HTTP AT ALL\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 200 + b"\r\n",
        b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70000 + b"\r\n\r\n",
        b"",
    ],
)
def test_malformed_responses_get_a_clear_image_error(web: Recorder, response: bytes) -> None:
    web.routes["/weird"] = _raw(response)
    start = time.perf_counter()
    with pytest.raises(ImageError):
        load_image(f"http://127.0.0.1:{web.port}/weird", TRUSTED)
    assert time.perf_counter() - start < 5


FUZZ_POLICY = ImagePolicy(trusted_hosts=frozenset({"127.0.0.1"}), url_timeout_s=2.0, resolver=_documentation_only)
PIECES = list("[]:@%#?/\\ .-_~!$&'()*+,;=\"<>`{}|^\t\r\n\x00\x7féü日\ud800") + ["%zz", "%2e%2e", "xn--", ".."]
WEIRD = st.lists(st.sampled_from(PIECES), max_size=12).map("".join)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    prefix=st.sampled_from(["http://127.0.0.1:{port}", "http://[", "http://127.0.0.1:", "https://", "HTTP://"]),
    middle=WEIRD,
    tail=WEIRD,
)
def test_fuzzed_urls_load_or_fail_with_an_image_error(web: Recorder, prefix: str, middle: str, tail: str) -> None:
    url = prefix.format(port=web.port) + middle + "/" + tail
    try:
        load_image(url, FUZZ_POLICY)
    except ImageError as exc:
        assert str(exc)
