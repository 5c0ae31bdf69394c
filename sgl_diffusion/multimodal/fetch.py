"""Fetch an http(s) media URL without reaching anything the operator did not allow.

- Only http and https. With an allow-list of domains, the host must be on it.
- Every address the host resolves to must be public: loopback, private, link-local (cloud metadata at
  169.254.169.254), shared, multicast, reserved and unspecified addresses are refused, also when embedded in an
  IPv6 address, unless they are inside a network the operator allowed.
- The connection goes to the address that was checked, so a second DNS answer cannot differ (DNS rebinding);
  TLS still verifies the certificate against the host name.
- Redirects are followed here, one hop at a time, and every hop is checked again; at most ``max_redirects``.
- The body is capped at ``max_bytes`` and the whole fetch, DNS and redirects included, at ``timeout_s``.
  Nothing is decompressed (no Accept-Encoding), and proxy variables are ignored.
"""

from __future__ import annotations

import dataclasses
import http.client
import ipaddress
import socket
import ssl
import threading
import time
from urllib.parse import urljoin, urlsplit

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 1 << 16


class FetchRefused(ValueError):
    """A media URL that is not fetched, or whose fetch failed (HTTP 400)."""


@dataclasses.dataclass(frozen=True)
class FetchRules:
    domains: tuple[str, ...]  # lower case; "*.example.com" matches its subdomains; empty: any host
    networks: tuple[Network, ...]  # non-public addresses that may be fetched all the same
    max_bytes: int
    timeout_s: float
    max_redirects: int


def fetch(url: str, rules: FetchRules) -> bytes:
    """The body of ``url`` (status 200), after following at most ``rules.max_redirects`` redirects."""
    deadline = time.monotonic() + rules.timeout_s
    for _ in range(rules.max_redirects + 1):
        try:
            status, location, body = _get_once(url, rules, deadline)
        except TimeoutError:
            raise FetchRefused(f"fetching the media URL took more than {rules.timeout_s:g} s "
                               "(SGL_DIFFUSION_MEDIA_FETCH_TIMEOUT_S)") from None  # fmt: skip
        if status in REDIRECTS and location:
            url = urljoin(url, location)
            continue
        if status != 200:
            raise FetchRefused(f"could not fetch the media URL {url}: HTTP {status}")
        return body
    raise FetchRefused(f"the media URL redirects more than {rules.max_redirects} times "
                       "(SGL_DIFFUSION_MEDIA_MAX_REDIRECTS)")


def is_public(ip: Address) -> bool:
    """True for an address on the public internet; False for loopback, private, link-local, shared (100.64/10),
    multicast, reserved, unspecified and documentation ranges, and for IPv6 addresses that embed such an IPv4."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return is_public(ip.ipv4_mapped)
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = [ip.sixtofour, *(ip.teredo or ())]
        if any(e is not None and not is_public(e) for e in embedded):
            return False
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)


def address_allowed(ip: Address, networks: tuple[Network, ...]) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1, for the allowed networks too
    return is_public(ip) or any(ip in net for net in networks)  # `in` is False across IP versions


def host_allowed(host: str, domains: tuple[str, ...]) -> bool:
    if not domains:
        return True
    host = host.lower().rstrip(".")
    return any(host == d or (d.startswith("*.") and host.endswith(d[1:])) for d in domains)


def _get_once(url: str, rules: FetchRules, deadline: float) -> tuple[int, str | None, bytes]:
    parts = urlsplit(url)
    scheme, host = parts.scheme.lower(), parts.hostname
    if scheme not in ("http", "https") or not host:
        raise FetchRefused(f"media URLs must be http(s) with a host (got {url[:200]!r})")
    if not host_allowed(host, rules.domains):
        raise FetchRefused(f"the media URL host {host!r} is not among the allowed domains "
                           "(SGL_DIFFUSION_ALLOWED_MEDIA_DOMAINS)")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise FetchRefused(f"the media URL {url[:200]!r} has an invalid port") from None
    addresses = _resolve(host, port, deadline)
    if not all(address_allowed(ip, rules.networks) for ip in addresses):
        raise FetchRefused(f"the media URL host {host!r} is not a public address; the operator can allow networks "
                           "with SGL_DIFFUSION_ALLOWED_MEDIA_NETWORKS")  # fmt: skip
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    expired = threading.Event()
    try:
        conn = _connect(scheme, host, port, addresses, deadline)
        # NOTE: socket timeouts bound each read, not a server that trickles bytes; the watchdog closes the
        # connection at the deadline, and `expired` tells a cut-off body from a complete one
        watchdog = threading.Timer(_remaining(deadline), _cut, (conn, expired))
        watchdog.start()
        try:
            conn.request("GET", path, headers={"Accept-Encoding": "identity", "User-Agent": "sgl-diffusion"})
            resp = conn.getresponse()
            if resp.status in REDIRECTS:
                answer = resp.status, resp.getheader("Location"), b""
            else:
                answer = resp.status, None, _read_body(resp, rules.max_bytes) if resp.status == 200 else b""
        finally:
            watchdog.cancel()
            conn.close()
        if expired.is_set():
            raise TimeoutError
        return answer
    except (OSError, http.client.HTTPException) as e:
        if isinstance(e, TimeoutError) or expired.is_set():
            raise TimeoutError from None
        raise FetchRefused(f"could not fetch the media URL {url[:200]}: {e}") from None


def _cut(conn, expired: threading.Event) -> None:
    expired.set()
    try:
        # NOTE: the plain socket's shutdown, also under TLS: SSLSocket.shutdown drops its TLS state, which the
        # reading thread may be using right now
        socket.socket.shutdown(conn.sock, socket.SHUT_RDWR)
    except (OSError, TypeError):  # already closed, or not connected yet (sock is None)
        pass


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _resolve(host: str, port: int, deadline: float) -> list[Address]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    answer: list = []

    def lookup():
        try:
            answer.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except (OSError, UnicodeError) as e:
            answer.append(e)

    # NOTE: getaddrinfo has no timeout of its own; a slow resolver is left behind, not waited for
    thread = threading.Thread(target=lookup, name="sgl-diffusion-dns", daemon=True)
    thread.start()
    thread.join(_remaining(deadline))
    if not answer:
        raise TimeoutError
    if isinstance(answer[0], Exception) or not answer[0]:
        raise FetchRefused(f"could not resolve the media URL host {host!r}")
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in answer[0]]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to one checked address; the Host header keeps the URL's host."""

    def __init__(self, host, port, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self):
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """An HTTPS connection to one checked address; SNI and certificate checks use the URL's host."""

    def __init__(self, host, port, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self):
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _connect(scheme: str, host: str, port: int, addresses: list[Address], deadline: float):
    cls = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
    error: OSError | None = None
    for ip in addresses:
        conn = cls(host, port, str(ip), _remaining(deadline))
        try:
            conn.connect()
            return conn
        except TimeoutError:
            raise
        except OSError as e:
            error = e
    raise error


def _read_body(resp, max_bytes: int) -> bytes:
    length = resp.getheader("Content-Length")
    if length and length.isdigit() and int(length) > max_bytes:
        raise FetchRefused(f"the media URL's body is {int(length)} bytes; at most {max_bytes} are allowed "
                           "(SGL_DIFFUSION_MAX_MEDIA_BYTES)")  # fmt: skip
    chunks, size = [], 0
    while chunk := resp.read1(_CHUNK):
        size += len(chunk)
        if size > max_bytes:
            raise FetchRefused(f"the media URL's body is more than {max_bytes} bytes (SGL_DIFFUSION_MAX_MEDIA_BYTES)")
        chunks.append(chunk)
    return b"".join(chunks)
