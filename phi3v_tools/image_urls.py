"""URLs under an :class:`~phi3v_tools.images.ImagePolicy`: address checks and the fetch; the body bytes, not decoded.

URLs are fetched (if enabled) only from hosts whose every address is public: every entry of the IANA IPv4 and
IPv6 special-purpose registries, multicast and anything outside 2000::/3 are refused, the connection is pinned
to the checked address, every redirect is checked again, the body is streamed under a byte cap and a
deadline, and proxies from the environment are ignored. Malformed URLs are a clear error: non-ASCII paths are
percent-encoded and host names IDNA-encoded, as browsers do.

Decoding is left to :func:`phi3v_tools.images.decode_bytes`; every error is an
:class:`~phi3v_tools.errors.ImageError`.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urljoin, urlsplit

from phi3v_tools.errors import ImageError

if TYPE_CHECKING:
    from phi3v_tools.images import ImagePolicy

MAX_URL_CHARS = 16384
_HOST_NAME = re.compile(r"^[a-z0-9_.-]+$")

# Never fetched: every entry of the IANA special-purpose address registries (tests/data/iana-*.csv, checked by
# the tests), even those marked globally reachable (anycast relays and DNS sinks serve no images), plus
# multicast. IPv6 outside 2000::/3 (the global unicast space) is refused as a whole besides.
_SPECIAL_NETWORKS = (
    ("0.0.0.0/8", '"this network"'),
    ("10.0.0.0/8", "private-use"),
    ("100.64.0.0/10", "shared address space, carrier-grade NAT: Alibaba's metadata address 100.100.100.200"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local: the cloud metadata address 169.254.169.254"),
    ("172.16.0.0/12", "private-use"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation"),
    ("192.31.196.0/24", "AS112"),
    ("192.52.193.0/24", "AMT"),
    ("192.88.99.0/24", "6to4 relay anycast"),
    ("192.168.0.0/16", "private-use"),
    ("192.175.48.0/24", "AS112 direct delegation"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved, and the limited broadcast address"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::/96", "IPv4-compatible, deprecated"),
    ("::ffff:0:0/96", "IPv4-mapped"),
    ("64:ff9b::/96", "NAT64"),
    ("64:ff9b:1::/48", "local-use NAT64"),
    ("100::/64", "discard-only"),
    ("100:0:0:1::/64", "dummy IPv6 prefix"),
    ("2001::/23", "IETF protocol assignments: Teredo, AMT, AS112, ORCHID, benchmarking, anycast"),
    ("2001:db8::/32", "documentation"),
    ("2002::/16", "6to4"),
    ("2620:4f:8000::/48", "AS112 direct delegation"),
    ("3fff::/20", "documentation"),
    ("5f00::/16", "SRv6 SIDs"),
    ("fc00::/7", "unique-local: the AWS metadata address fd00:ec2::254"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local, deprecated"),
    ("ff00::/8", "multicast"),
)
_DENIED_NETWORKS = tuple((ipaddress.ip_network(net), name) for net, name in _SPECIAL_NETWORKS)
_GLOBAL_UNICAST_V6 = ipaddress.ip_network("2000::/3")
Resolver = Callable[[str, int], list[str]]


def _system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def check_address(address: str) -> str | None:
    """Why ``address`` may not be fetched, or None when it is a public unicast address."""
    ip = ipaddress.ip_address(address)
    for network, name in _DENIED_NETWORKS:
        if ip.version == network.version and ip in network:
            mapped = getattr(ip, "ipv4_mapped", None)
            if mapped is not None:
                inner = check_address(str(mapped))
                about = f"; {inner}" if inner else ""
                return f"{ip} is in the special-purpose network {network}, IPv4-mapped {mapped}{about}; give it as IPv4"
            if name == "loopback":
                return f"{ip} is a loopback address"
            return f"{ip} is in the special-purpose network {network} ({name})"
    if ip.version == 6 and ip not in _GLOBAL_UNICAST_V6:
        return f"{ip} is outside the global unicast space 2000::/3 (a reserved or special-purpose address)"
    if ip.is_private or ip.is_link_local or ip.is_multicast or ip.is_unspecified or not ip.is_global:
        return f"{ip} is a private or special-purpose address"
    return None


def _pinned_addresses(host: str, port: int, policy: ImagePolicy) -> list[str]:
    try:
        literal = ipaddress.ip_address(host.strip("[]"))
        addresses = [str(literal)]
    except ValueError:
        try:
            addresses = policy.resolver(host, port)
        except (OSError, UnicodeError) as exc:
            raise ImageError(f"cannot resolve the host {host!r} ({exc})") from exc
    if not addresses:
        raise ImageError(f"the host {host!r} has no addresses")
    if host.lower() in policy.trusted_hosts:
        return addresses
    for address in addresses:
        try:
            problem = check_address(address)
        except ValueError:
            problem = f"{address!r} is not an IP address"
        if problem is not None:
            raise ImageError(
                f"refusing to fetch {host!r}: {problem}; only public internet addresses may be fetched "
                "(send the image as base64 instead)"
            )
    return addresses


def fetch_bytes(url: str, policy: ImagePolicy) -> bytes:
    """GET a body over http(s) under the policy (address checks on every hop, byte cap, hard deadline)."""
    if not policy.allow_urls:
        raise ImageError("fetching URLs is turned off here; send the image as base64 or a data: URI")
    deadline = time.monotonic() + policy.url_timeout_s
    current = url
    for _hop in range(policy.max_redirects + 1):
        status, location, data = _get(current, policy, deadline)
        if status in (301, 302, 303, 307, 308):
            if not location:
                raise ImageError(f"{_short(current)} redirected without a Location")
            try:
                current = urljoin(current, _header_text(location))
            except ValueError as exc:
                raise ImageError(f"{_short(current)} redirected to an invalid URL ({exc})") from exc
            continue
        if status != 200:
            raise ImageError(f"{_short(current)} answered HTTP {status}")
        return data
    raise ImageError(f"{_short(url)} redirected more than {policy.max_redirects} times")


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str  # ASCII (IDNA-encoded), for DNS, the Host header and TLS SNI
    port: int
    path: str  # the request target, percent-encoded as browsers do


def _parse_url(url: str) -> _Target:
    """Split and check one URL: a clear ImageError for anything malformed, never another exception."""
    if len(url) > MAX_URL_CHARS:
        raise ImageError(f"the URL is {len(url)} characters long; at most {MAX_URL_CHARS} are fetched")
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        port_text = parts.port
    except ValueError as exc:  # an unclosed IPv6 bracket, a port that is not a number or out of range...
        what = "an invalid port" if "port" in str(exc).lower() else f"a malformed address ({exc})"
        raise ImageError(f"{_short(url)} has {what}") from exc
    if scheme not in ("http", "https"):
        raise ImageError(f"a redirect led to {scheme!r}; only http(s) URLs may be fetched")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise ImageError("URLs with credentials are not fetched")
    host = parts.hostname or ""
    if not host:
        raise ImageError(f"{_short(url)} has no host")
    if port_text == 0:
        raise ImageError(f"{_short(url)} has an invalid port (0)")
    port = port_text if port_text is not None else (443 if scheme == "https" else 80)
    if not _is_ip(host):
        try:
            host = host.encode("idna").decode("ascii").lower()  # a non-ASCII name: its IDNA form (xn--...)
        except UnicodeError as exc:
            raise ImageError(f"{_short(url)} has a host name that is not valid ({exc})") from exc
        if not _HOST_NAME.match(host):
            raise ImageError(f"{_short(url)} has a host name that is not valid ({host[:80]!r})")
    try:
        target = _percent_encode(parts.path or "/", '"#<>?`{} ')
        if parts.query:
            target += "?" + _percent_encode(parts.query, "\"#<>' ")
    except UnicodeError as exc:
        raise ImageError(f"{_short(url)} has characters that cannot be sent ({exc})") from exc
    return _Target(scheme, host, port, target)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _percent_encode(text: str, unsafe: str) -> str:
    """Non-ASCII, control and ``unsafe`` characters as UTF-8 percent-escapes, as browsers send them."""
    return "".join(
        "".join(f"%{b:02X}" for b in ch.encode("utf-8")) if ch > "\x7e" or ch < "\x21" or ch in unsafe else ch
        for ch in text
    )


def _header_text(value: str) -> str:
    """A header value as text: http.client decodes bytes as Latin-1, servers usually send UTF-8."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value


def _get(url: str, policy: ImagePolicy, deadline: float) -> tuple[int, str | None, bytes]:
    """One GET to the checked address of ``url``'s host: (status, Location, body capped at max_bytes).

    The socket is ours: it is connected to the pinned address (TLS still verifies the host name), proxies
    are never used, and a timer shuts it down at the deadline, however slowly the server trickles.
    """
    target = _parse_url(url)
    address = _pinned_addresses(target.host, target.port, policy)[0]
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise ImageError(f"{_short(url)} took longer than {policy.url_timeout_s:.0f} s")
    try:
        sock = socket.create_connection((address, target.port), timeout=min(remaining, 10.0))
    except OSError as exc:
        raise ImageError(f"could not fetch {_short(url)}: no connection ({type(exc).__name__})") from exc
    timer = threading.Timer(remaining, _shut, (sock,))
    timer.start()
    connection: http.client.HTTPConnection | None = None
    response: http.client.HTTPResponse | None = None
    try:
        if target.scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=target.host)
        connection = http.client.HTTPConnection(target.host, target.port, timeout=remaining)
        connection.sock = sock  # already connected (and pinned); http.client only speaks HTTP on it
        connection.request("GET", target.path, headers={"Accept": "image/*", "User-Agent": "phi3v-tools"})
        response = connection.getresponse()
        if response.status != 200:
            return response.status, response.getheader("Location"), b""
        _check_length(response.headers.get_all("Content-Length") or [], url, policy)
        chunks, total = [], 0
        while chunk := response.read1(65536):
            total += len(chunk)
            if total > policy.max_bytes:  # Content-Length may lie; count what arrives
                raise ImageError(f"{_short(url)} sent more than the {policy.max_bytes}-byte limit")
            chunks.append(chunk)
        if time.monotonic() > deadline:
            raise ImageError(f"{_short(url)} took longer than {policy.url_timeout_s:.0f} s")
        return 200, None, b"".join(chunks)
    except (OSError, http.client.HTTPException, ValueError) as exc:  # ValueError: http.client's InvalidURL...
        if isinstance(exc, ImageError):
            raise
        if time.monotonic() >= deadline - 0.05:
            raise ImageError(f"{_short(url)} took longer than {policy.url_timeout_s:.0f} s") from exc
        raise ImageError(f"could not fetch {_short(url)} ({type(exc).__name__}: {str(exc)[:200]})") from exc
    finally:
        timer.cancel()
        if response is not None:
            response.close()  # its file object holds a reference that keeps the socket open
        if connection is not None:
            connection.close()
        sock.close()


def _check_length(values: list[str], url: str, policy: ImagePolicy) -> None:
    """Content-Length must be one decimal number (repeated only identically) and within the byte cap."""
    declared = {v.strip() for value in values for v in value.split(",")}
    if not declared:
        return
    if len(declared) > 1:
        shown = ", ".join(sorted(repr(v[:30]) for v in declared)[:4])
        raise ImageError(f"{_short(url)} sent conflicting Content-Length headers ({shown})")
    (length,) = declared
    if not re.fullmatch(r"[0-9]{1,30}", length):
        raise ImageError(f"{_short(url)} sent an invalid Content-Length ({length[:40]!r})")
    if int(length) > policy.max_bytes:
        raise ImageError(f"{_short(url)} is {int(length)} bytes; the limit is {policy.max_bytes}")


def _shut(sock: socket.socket) -> None:
    """Wake any read blocked on ``sock`` (the deadline passed)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _short(url: str) -> str:
    return url if len(url) <= 120 else url[:117] + "..."
