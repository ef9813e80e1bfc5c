"""The server's URL policy and fetch deadline, on loopback: 127.0.0.2 plays a public host, 127.0.0.1 the server's own network."""

from __future__ import annotations

import http.server
import ipaddress
import threading
import time

import pytest
from requests.adapters import HTTPAdapter

from qwen2vl_cli.errors import MediaError
from qwen2vl_cli.sources import SourceResolver
from qwen2vl_cli.urlpolicy import GuardedAdapter, UrlPolicy

UNREACHABLE = "cannot fetch it: the host is unreachable or not a public address"


@pytest.mark.parametrize("address", [
    "127.0.0.1", "10.1.2.3", "169.254.169.254", "::1", "fe80::1", "fc00::1",
    "::ffff:127.0.0.1", "::127.0.0.1", "::ffff:0:127.0.0.1", "64:ff9b::7f00:1", "64:ff9b:1::7f00:1",
    "2002:7f00:1::", "fec0::1", "::a00:1", "ff02::1", "224.0.0.1", "0.0.0.0",
])
def test_private_addresses_in_every_notation_are_refused(address):
    assert not UrlPolicy().permits(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "2001:4860:4860::8888", "::ffff:8.8.8.8", "64:ff9b::808:808"])
def test_public_addresses_are_permitted(address):
    assert UrlPolicy().permits(ipaddress.ip_address(address))


class _Handler(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).hits.append(self.path)
        try:
            if self.path == "/slow-headers":  # a header byte every 0.2 s: each read succeeds, the whole never ends
                self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                for _ in range(100):
                    self.wfile.write(b"X")
                    self.wfile.flush()
                    time.sleep(0.2)
                return
            body = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass


def _serve(address: str):
    handler = type("Handler", (_Handler,), {"hits": []})
    server = http.server.ThreadingHTTPServer((address, 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, handler.hits


@pytest.fixture(scope="module")
def hosts():
    public, public_hits = _serve("127.0.0.2")
    private, private_hits = _serve("127.0.0.1")
    yield f"http://127.0.0.2:{public.server_address[1]}", public_hits, f"http://127.0.0.1:{private.server_address[1]}", private_hits
    public.shutdown()
    private.shutdown()


def _fetch(url: str, deadline_s: float = 10.0):
    with SourceResolver(policy=UrlPolicy.parse(["127.0.0.2/32"]), deadline_s=deadline_s, timeout=(2.0, 2.0)) as resolver:
        return resolver.resolve(url).path.read_bytes()


def test_the_pinning_hook_runs_on_the_installed_requests(hosts, monkeypatch):
    public, _, private, _ = hosts
    pinned: list[str] = []
    original = GuardedAdapter.build_connection_pool_key_attributes

    def spy(self, request, *args, **kwargs):
        pinned.append(request.url)
        return original(self, request, *args, **kwargs)

    monkeypatch.setattr(GuardedAdapter, "build_connection_pool_key_attributes", spy)
    assert _fetch(f"{public}/photo.png").startswith(b"\x89PNG")
    assert pinned == [f"{public}/photo.png"]


def test_the_policy_holds_where_requests_never_calls_the_pinning_hook(hosts, monkeypatch):
    """requests 2.31 connects without calling build_connection_pool_key_attributes: the peer check still refuses."""
    public, _, private, private_hits = hosts
    monkeypatch.setattr(GuardedAdapter, "build_connection_pool_key_attributes", HTTPAdapter.build_connection_pool_key_attributes)
    with pytest.raises(MediaError, match=UNREACHABLE):
        _fetch(f"{private}/photo.png")
    assert private_hits == []  # refused before a byte was sent
    assert _fetch(f"{public}/photo.png").startswith(b"\x89PNG")


def test_proxy_variables_do_not_carry_a_servers_fetches(hosts, monkeypatch):
    public, public_hits, private, private_hits = hosts
    monkeypatch.setenv("HTTP_PROXY", private)  # a proxy on the server's own network would fetch anything
    monkeypatch.setenv("http_proxy", private)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert _fetch(f"{public}/direct.png").startswith(b"\x89PNG")
    assert "/direct.png" in public_hits and private_hits == []


def test_the_deadline_holds_while_headers_drip(hosts):
    public, *_ = hosts
    started = time.monotonic()
    with pytest.raises(MediaError, match="download took longer than 1 s"):
        _fetch(f"{public}/slow-headers", deadline_s=1.0)
    assert time.monotonic() - started < 5  # the drip would last 20 s


def test_the_deadline_holds_over_tls(tmp_path, monkeypatch):
    """TLS takes the socket object over: the watchdog must still reach the connection."""
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "1",
                    "-subj", "/CN=127.0.0.2", "-addext", "subjectAltName=IP:127.0.0.2"], check=True, capture_output=True)
    server, _ = _serve("127.0.0.2")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))  # a server's session ignores the environment but for its CA bundle
    try:
        assert _fetch(f"https://127.0.0.2:{server.server_address[1]}/photo.png").startswith(b"\x89PNG")
        started = time.monotonic()
        with pytest.raises(MediaError, match="download took longer than 1 s"):
            _fetch(f"https://127.0.0.2:{server.server_address[1]}/slow-headers", deadline_s=1.0)
        assert time.monotonic() - started < 5  # the drip would last 20 s
    finally:
        server.shutdown()
