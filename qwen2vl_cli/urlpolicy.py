"""Which addresses a server may fetch from, checked on the connection itself, and a deadline every fetch keeps.

The host of every request (the first and each redirect) is resolved once, each address is
checked, and the connection goes to the checked address (no second lookup: DNS rebinding
cannot swap it), with the original name kept for the Host header, TLS SNI and the certificate.
Then the socket's own peer address is checked again before a byte is sent, so the policy holds
even where requests does not call the pinning hook (it does from 2.32.2): it fails closed.
Written here rather than taken from requests-hardened, which has the same pinning but no
allow-list of networks.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

import requests
from requests.adapters import HTTPAdapter
from urllib3 import connection, connectionpool

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class RefusedAddress(requests.exceptions.ConnectionError):
    """The host resolves only to addresses the policy refuses."""


@dataclass(frozen=True)
class UrlPolicy:
    """Public addresses only, plus `allowed` networks; `allow_private` opens everything."""

    allowed: tuple[IPNetwork, ...] = ()
    allow_private: bool = False

    @classmethod
    def parse(cls, networks: Iterable[str], allow_private: bool = False) -> UrlPolicy:
        """From CIDR strings such as 10.0.0.0/8 or 192.168.1.20 (a bare address is a /32 or /128)."""
        return cls(tuple(ipaddress.ip_network(n.strip(), strict=False) for n in networks), allow_private)

    def permits(self, address: IPAddress) -> bool:
        if self.allow_private or any(address in n for n in self.allowed):
            return True
        embedded = _embedded_ipv4(address)  # ::ffff:127.0.0.1, ::127.0.0.1, 2002:7f00:1::, 64:ff9b::7f00:1: the IPv4 decides
        if embedded:
            return all(self.permits(e) for e in embedded)
        # Python counts reserved IPv6 space (64:ff9b:1::/48, ::/8 ...) and site-local fec0::/10 as global.
        return address.is_global and not (address.is_multicast or address.is_reserved or getattr(address, "is_site_local", False))


def _embedded_ipv4(address: IPAddress) -> list[ipaddress.IPv4Address]:
    """Every IPv4 address an IPv6 one carries: mapped, translated, compatible, NAT64, 6to4, Teredo."""
    if address.version != 6:
        return []
    found = [a for a in (address.ipv4_mapped, address.sixtofour) if a is not None]
    if address.teredo is not None:
        found.append(address.teredo[1])
    if any(address in n for n in _LOW_32_BITS) and int(address) > 1:  # :: and ::1 are themselves
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


# Forms whose last 32 bits are an IPv4 address: NAT64's well-known prefix, IPv4-translated
# (::ffff:0:a.b.c.d) and IPv4-compatible (::a.b.c.d) addresses.
_LOW_32_BITS = tuple(ipaddress.ip_network(n) for n in ("64:ff9b::/96", "::ffff:0:0:0/96", "::/96"))


def resolve(host: str, port: int, policy: UrlPolicy) -> str:
    """The first permitted address of `host`; RefusedAddress when it has none."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise RefusedAddress(f"cannot resolve {host}") from e
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            address = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
            if policy.permits(address):
                return str(address)
    raise RefusedAddress(f"{host} has no address this server may fetch from")


class Deadline:
    """Shuts every connection of one fetch once its time is up. A socket timeout starts again with
    each byte, so a server sending its headers or body a byte at a time would never meet it."""

    def __init__(self, seconds: float):
        self.expired = False
        self._copies: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._ends = time.monotonic() + seconds

    def __enter__(self) -> Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        with self._lock:
            for copy in self._copies:
                copy.close()
            self._copies.clear()

    @property
    def passed(self) -> bool:
        """Whether the time is up (the watchdog's own word, or the clock's)."""
        return self.expired or time.monotonic() > self._ends

    def track(self, sock: socket.socket) -> None:
        """Watch a new connection. A duplicate of its descriptor is kept: TLS takes the socket
        object over (leaving it closed), and shutting the duplicate shuts the connection."""
        copy = socket.socket(fileno=os.dup(sock.fileno()))
        with self._lock:
            self._copies.append(copy)
            if not self.expired:
                return
        _shut(copy)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            copies = list(self._copies)
        for copy in copies:
            _shut(copy)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # a read blocked in another thread returns at once
    except OSError:
        pass


def fetch_session(policy: UrlPolicy | None, deadline: Deadline) -> requests.Session:
    """A requests session whose every connection keeps `deadline` and, with a `policy`, goes
    only to addresses it permits. A server's session ignores proxy settings: a proxy resolves
    the name itself, so neither the pin nor the peer check would see where it connects."""
    session = requests.Session()
    guarded = policy if policy is not None and not policy.allow_private else None
    adapter = GuardedAdapter(guarded, deadline)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    if policy is not None:
        session.trust_env = False
        session.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True  # what trust_env would give
    return session


class GuardedAdapter(HTTPAdapter):
    """Connects to the address `resolve` checked, for every request and redirect of the session,
    refuses a socket whose peer the policy does not permit, and hands each socket to the deadline."""

    def __init__(self, policy: UrlPolicy | None, deadline: Deadline):
        self.policy, self.deadline = policy, deadline
        super().__init__()  # calls init_poolmanager, which reads them

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self._guard(self.poolmanager)

    def proxy_manager_for(self, proxy, **proxy_kwargs):
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        # The CLI's HTTP proxies keep the deadline; a SOCKS proxy has connection classes of its own.
        return manager if type(manager).__name__ == "SOCKSProxyManager" else self._guard(manager)

    def _guard(self, manager):
        manager.pool_classes_by_scheme = {
            "http": type("GuardedPool", (connectionpool.HTTPConnectionPool,), {"ConnectionCls": _guarded(connection.HTTPConnection, self)}),
            "https": type("GuardedPool", (connectionpool.HTTPSConnectionPool,), {"ConnectionCls": _guarded(connection.HTTPSConnection, self)}),
        }
        return manager

    def check_peer(self, sock: socket.socket) -> None:
        self.deadline.track(sock)
        if self.policy is None:
            return
        try:
            peer = ipaddress.ip_address(sock.getpeername()[0].split("%", 1)[0])
        except (OSError, ValueError):
            peer = None
        if peer is None or not self.policy.permits(peer):
            sock.close()
            raise RefusedAddress(f"{peer} is not an address this server may fetch from")

    def build_connection_pool_key_attributes(self, request, verify, cert=None):
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, verify, cert)
        if self.policy is None:
            return host_params, pool_kwargs
        host, port = host_params["host"], host_params["port"]
        default_port = 443 if host_params["scheme"] == "https" else 80
        address = resolve(host, port or default_port, self.policy)
        netloc = f"[{host}]" if ":" in host else host
        request.headers["Host"] = netloc if port in (None, default_port) else f"{netloc}:{port}"
        if host_params["scheme"] == "https":
            pool_kwargs["server_hostname"] = host  # SNI and the certificate check use the name, not the address
            pool_kwargs["assert_hostname"] = host
        host_params["host"] = f"[{address}]" if ":" in address else address
        return host_params, pool_kwargs


def _guarded(base: type, adapter: GuardedAdapter) -> type:
    """urllib3's connection class whose new sockets the adapter checks before any byte is sent."""

    class Guarded(base):
        def _new_conn(self):
            sock = super()._new_conn()
            adapter.check_peer(sock)
            return sock

    return Guarded
