"""The guarded media fetcher against a local HTTP server (allowed explicitly: it is on loopback)."""

import http.server
import ipaddress
import shutil
import socket
import ssl
import subprocess
import threading
from urllib.parse import parse_qs, urlsplit

import pytest

from sgl_diffusion.multimodal import fetch as fetch_module
from sgl_diffusion.multimodal.fetch import FetchRefused, FetchRules, address_allowed, fetch, host_allowed, is_public

LOOPBACK = (ipaddress.ip_network("127.0.0.1/32"),)
BODY = b"media bytes " * 100


def rules(networks=LOOPBACK, domains=(), max_bytes=1 << 20, timeout_s=10.0, max_redirects=3) -> FetchRules:
    return FetchRules(tuple(domains), networks, max_bytes, timeout_s, max_redirects)


class _Handler(http.server.BaseHTTPRequestHandler):
    release: threading.Event  # set by the fixture at teardown

    def do_GET(self):
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        if parts.path == "/media":
            self._send(200, BODY)
        elif parts.path == "/host":
            self._send(200, self.headers["Host"].encode())
        elif parts.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", query["to"][0])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif parts.path == "/chunked":  # no Content-Length: the cap must count what arrives
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(4):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(BODY), BODY))
            self.wfile.write(b"0\r\n\r\n")
        elif parts.path == "/hang":  # headers never come
            self.release.wait(60)
        elif parts.path == "/trickle":  # a header byte every 50 ms for 5 s: no single read is slow
            self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Trickle: ")
            for _ in range(100):
                if self.release.wait(0.05):
                    return
                self.wfile.write(b"x")
                self.wfile.flush()
            self.wfile.write(b"\r\nContent-Length: 2\r\n\r\nok")
        else:
            self._send(404, b"no")

    def _send(self, status, body):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def origin():
    """The base URL of a local HTTP server (127.0.0.1)."""
    release = threading.Event()
    handler = type("Handler", (_Handler,), {"release": release})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    release.set()
    httpd.shutdown()


@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.255.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.100.100.200",
    "0.0.0.0", "224.0.0.1", "239.255.255.250", "255.255.255.255", "192.0.2.1", "::1", "::", "fe80::1",
    "fd00:ec2::254", "ff02::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "2002:7f00:1::", "64:ff9b::7f00:1",
])  # fmt: skip
def test_non_public_addresses(address):
    """Loopback, private, link-local (cloud metadata), shared, multicast, reserved, unspecified, documentation,
    and IPv6 forms of those (mapped, 6to4, NAT64) are not public."""
    assert not is_public(ipaddress.ip_address(address))
    assert not address_allowed(ipaddress.ip_address(address), ())


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses(address):
    assert is_public(ipaddress.ip_address(address))


def test_allowed_networks_admit_their_addresses_only():
    """An allowed network admits its addresses (IPv4-mapped IPv6 too), not its neighbours nor another IP version."""
    ip = ipaddress.ip_address
    assert address_allowed(ip("127.0.0.1"), LOOPBACK) and address_allowed(ip("::ffff:127.0.0.1"), LOOPBACK)
    assert not address_allowed(ip("127.0.0.2"), LOOPBACK)
    assert not address_allowed(ip("::1"), (ipaddress.ip_network("0.0.0.0/0"),))
    assert not address_allowed(ip("0.0.0.1"), (ipaddress.ip_network("::/0"),))


def test_domain_allow_list():
    domains = ("example.com", "*.cdn.example.org")
    assert host_allowed("example.com", domains) and host_allowed("EXAMPLE.com.", domains)
    assert host_allowed("a.b.cdn.example.org", domains) and not host_allowed("cdn.example.org", domains)
    assert not host_allowed("www.example.com", domains) and not host_allowed("evil-example.com", domains)
    assert not host_allowed("example.com.evil.net", domains) and host_allowed("anything", ())


def test_fetch_reads_an_allowed_host(origin):
    assert fetch(f"{origin}/media", rules()) == BODY
    assert fetch(f"{origin}/redirect?to=/media", rules()) == BODY  # a relative redirect


def test_loopback_is_refused_unless_allowed(origin):
    """The origin itself (127.0.0.1) and a DNS name that resolves to loopback ("localhost") are refused by
    default, before any connection."""
    port = urlsplit(origin).port
    for url in (f"{origin}/media", f"http://localhost:{port}/media", f"http://127.1:{port}/media"):
        with pytest.raises(FetchRefused, match="not a public address.*SGL_DIFFUSION_ALLOWED_MEDIA_NETWORKS"):
            fetch(url, rules(networks=()))


def test_every_redirect_hop_is_checked(origin):
    """A redirect from an allowed host to loopback it may not reach (127.0.0.2, ::1, localhost) is refused."""
    port = urlsplit(origin).port
    for target in (f"http://127.0.0.2:{port}/media", f"http://[::1]:{port}/media", "http://169.254.169.254/"):
        with pytest.raises(FetchRefused, match="not a public address"):
            fetch(f"{origin}/redirect?to={target}", rules())
    with pytest.raises(FetchRefused, match="not among the allowed domains"):
        fetch(f"{origin}/redirect?to=http://localhost:{port}/media", rules(domains=("127.0.0.1",)))
    with pytest.raises(FetchRefused, match="http\\(s\\)"):
        fetch(f"{origin}/redirect?to=file:///etc/passwd", rules())


def test_redirects_are_counted(origin):
    hops = f"{origin}/redirect?to=/redirect%3Fto%3D/media"  # two redirects, then the body
    assert fetch(hops, rules(max_redirects=2)) == BODY
    with pytest.raises(FetchRefused, match="more than 1 times.*SGL_DIFFUSION_MEDIA_MAX_REDIRECTS"):
        fetch(hops, rules(max_redirects=1))


def test_connection_goes_to_the_checked_address(monkeypatch):
    """DNS rebinding: the host is resolved once per hop and the connection goes to that answer, whatever a later
    lookup would say; the Host header keeps the name."""
    lookups, connects = [], []

    def getaddrinfo(host, port, *args, **kwargs):
        lookups.append(host)
        address = "93.184.216.34" if len(lookups) == 1 else "127.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    def create_connection(address, *args, **kwargs):
        connects.append(address)
        raise ConnectionRefusedError("test")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(fetch_module.socket, "create_connection", create_connection)
    with pytest.raises(FetchRefused, match="could not fetch"):
        fetch("http://rebind.example:8080/x.png", rules(networks=()))
    assert lookups == ["rebind.example"] and connects == [("93.184.216.34", 8080)]


def test_a_name_with_any_non_public_address_is_refused(monkeypatch):
    """A name whose answers mix a public and a loopback address is refused: the connection could go to either."""
    def getaddrinfo(host, port, *args, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in ("93.184.216.34", "127.0.0.1")]

    def create_connection(*args, **kwargs):
        raise AssertionError("connected")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(fetch_module.socket, "create_connection", create_connection)
    with pytest.raises(FetchRefused, match="not a public address"):
        fetch("http://mixed.example/x.png", rules(networks=()))


def test_host_header_keeps_the_name(origin, monkeypatch):
    port = urlsplit(origin).port
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo",
                        lambda host, *a, **k: real("127.0.0.1" if host == "media.test" else host, *a, **k))
    assert fetch(f"http://media.test:{port}/host", rules()) == f"media.test:{port}".encode()


@pytest.fixture(scope="module")
def tls_origin(tmp_path_factory):
    """An HTTPS server on 127.0.0.1 whose self-signed certificate names media.test; (port, certificate path)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    tmp = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", tmp / "key.pem", "-out", tmp / "cert.pem", "-days", "1", "-subj", "/CN=media.test",
                    "-addext", "subjectAltName=DNS:media.test"], check=True, capture_output=True)  # fmt: skip
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp / "cert.pem", tmp / "key.pem")
    release = threading.Event()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_Handler,), {"release": release}))
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1], tmp / "cert.pem"
    release.set()
    httpd.shutdown()


def test_https_checks_the_certificate_against_the_name(tls_origin, monkeypatch):
    """Over TLS the connection still goes to the checked address, and the certificate is verified against the
    URL's host name (SNI): media.test is fetched; the same server as 127.0.0.1 is not (the name does not match)."""
    port, certificate = tls_origin
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate))  # trusted by ssl.create_default_context
    real, lookups = socket.getaddrinfo, []

    def getaddrinfo(host, *args, **kwargs):
        lookups.append(host)
        return real("127.0.0.1" if host == "media.test" else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    assert fetch(f"https://media.test:{port}/media", rules()) == BODY
    assert lookups.count("media.test") == 1  # the connection used the checked answer, not a new lookup
    with pytest.raises(FetchRefused, match="could not fetch.*(?i:certificate|hostname)"):
        fetch(f"https://127.0.0.1:{port}/media", rules())
    monkeypatch.delenv("SSL_CERT_FILE")
    with pytest.raises(FetchRefused, match="could not fetch.*(?i:certificate)"):
        fetch(f"https://media.test:{port}/media", rules())


def test_body_size_is_capped(origin):
    """Over max_bytes is refused, with a Content-Length or without one (chunked)."""
    assert fetch(f"{origin}/chunked", rules()) == BODY * 4
    for path in ("/media", "/chunked"):
        with pytest.raises(FetchRefused, match="more than 1000 bytes|is 1200 bytes.*SGL_DIFFUSION_MAX_MEDIA_BYTES"):
            fetch(f"{origin}{path}", rules(max_bytes=1000))


@pytest.mark.parametrize("path", ["/hang", "/trickle"])
def test_fetch_time_is_capped(origin, path):
    """A server that never answers, or trickles its headers so that no single read times out, is given up on at
    the deadline."""
    with pytest.raises(FetchRefused, match="more than 0.5 s.*SGL_DIFFUSION_MEDIA_FETCH_TIMEOUT_S"):
        fetch(f"{origin}{path}", rules(timeout_s=0.5))


@pytest.mark.parametrize("url, word", [
    ("ftp://example.com/a.png", "http\\(s\\)"), ("http:///a.png", "with a host"), ("/media", "http\\(s\\)"),
])  # fmt: skip
def test_bad_urls(url, word):
    with pytest.raises(FetchRefused, match=word):
        fetch(url, rules())


def test_error_status_is_refused(origin):
    with pytest.raises(FetchRefused, match="HTTP 404"):
        fetch(f"{origin}/missing", rules())
