"""Which addresses a server may fetch from: public ones only, checked on the address it connects to.

The host of every request (the first and each redirect) is resolved once, each address is
checked, and the connection goes to the checked address (no second lookup: DNS rebinding
cannot swap it), with the original name kept for the Host header, TLS SNI and the certificate.
Written here rather than taken from requests-hardened, which has the same pinning but no
allow-list of networks.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

import requests
from requests.adapters import HTTPAdapter

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
        embedded = _embedded_ipv4(address)  # ::ffff:127.0.0.1, 2002:7f00:1::, 64:ff9b::7f00:1: the IPv4 decides
        if embedded:
            return all(self.permits(e) for e in embedded)
        return address.is_global and not address.is_multicast

    def session(self) -> requests.Session:
        """A requests session whose every connection goes through this policy."""
        session = requests.Session()
        if not self.allow_private:
            adapter = PinnedAdapter(self)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
        return session


def _embedded_ipv4(address: IPAddress) -> list[ipaddress.IPv4Address]:
    if address.version != 6:
        return []
    found = [a for a in (address.ipv4_mapped, address.sixtofour) if a is not None]
    if address.teredo is not None:
        found.append(address.teredo[1])
    if address in _NAT64:
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


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


class PinnedAdapter(HTTPAdapter):
    """Connects to the address `resolve` checked, for every request and redirect of the session."""

    def __init__(self, policy: UrlPolicy):
        super().__init__()
        self.policy = policy

    def build_connection_pool_key_attributes(self, request, verify, cert=None):
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, verify, cert)
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
