"""SSRF guard: the HTTP client refuses to connect to internal addresses unless configured to.

The check runs on the addresses a host actually resolves to, at connect time, so it covers every
redirect hop and DNS answers that point inside (rebinding), for image URLs and webhook listeners alike.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import ResolveResult

from daemon.config import NetworkSettings

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

BLOCKED: tuple[tuple[Network, str], ...] = tuple(
    (ipaddress.ip_network(net), kind) for net, kind in (
        ("0.0.0.0/8", "unspecified"), ("::/128", "unspecified"),
        ("127.0.0.0/8", "loopback"), ("::1/128", "loopback"),
        ("10.0.0.0/8", "private"), ("172.16.0.0/12", "private"), ("192.168.0.0/16", "private"),
        ("100.64.0.0/10", "shared (carrier-grade NAT)"), ("fc00::/7", "private"),
        ("169.254.0.0/16", "link-local"), ("fe80::/10", "link-local"),
        ("224.0.0.0/4", "multicast"), ("ff00::/8", "multicast"),
        ("255.255.255.255/32", "broadcast"), ("240.0.0.0/4", "reserved"),
    )
)


# What the resolver's IDNA encoding refuses (UnicodeError): said the same at upload and on a redirect.
INVALID_HOST_NAME = "invalid host name (a label is empty or longer than 63 characters)"


class AddressNotAllowed(aiohttp.ClientError):
    """The host resolves to an address the daemon must not connect to; never retried."""


NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _unmapped(address: Address) -> Address:
    """The IPv4 address an IPv6 one stands for (mapped, 6to4, NAT64), so it is judged as that."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.sixtofour is not None:
            return address.sixtofour
        if address in NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


LOOPBACK_ONLY = "[network] loopback_only = true"


class AddressPolicy:
    def __init__(self, settings: NetworkSettings) -> None:
        self.allow_private = settings.allow_private
        self.loopback_only = settings.loopback_only
        self.allowed_hosts = {h.lower() for h in settings.allow if not _is_network(h)}
        self.allowed_networks = [ipaddress.ip_network(h, strict=False) for h in settings.allow if _is_network(h)]

    def name_refusal(self, host: str) -> str | None:
        """Why `host` is refused before it is looked up, or None. Only with loopback_only: a lookup of a name
        would itself leave the machine (a DNS query), so only localhost, literal addresses and names listed in
        [network] allow (an /etc/hosts entry, say) are looked up."""
        name = host.lower().rstrip(".")
        if (not self.loopback_only or name == "localhost" or name.endswith(".localhost")
                or name in self.allowed_hosts or literal_address(name) is not None):
            return None
        return f"refused to connect: {name} is not looked up, only loopback addresses are allowed ({LOOPBACK_ONLY})"

    def refusal(self, host: str, address: str) -> str | None:
        """Why connecting to `address` (resolved from `host`) is refused, or None."""
        ip = _unmapped(ipaddress.ip_address(address.split("%", 1)[0]))
        where = f"{host} resolves to {ip}" if host != address else f"{ip}"
        if self.loopback_only:
            return None if ip.is_loopback else f"refused to connect: {where}, not a loopback address ({LOOPBACK_ONLY})"
        if self.allow_private or host.lower().rstrip(".") in self.allowed_hosts:
            return None
        if any(ip in net for net in self.allowed_networks):
            return None
        kind = next((kind for net, kind in BLOCKED if ip.version == net.version and ip in net), None)
        if kind is None and not ip.is_global:
            kind = "reserved"  # everything else that is not publicly routable (benchmarking, documentation...)
        if kind is None:
            return None
        return (f"refused to connect: {where}, a {kind} address "
                "(set [network] allow_private = true or list it in [network] allow)")

    def url_refusal(self, url: str) -> str | None:
        """Why connecting to `url` is refused, as far as its host says without a lookup (a literal address, a
        localhost name), or None; names that resolve inside are still refused at connect time."""
        host = urlsplit(url).hostname or ""
        name = host.rstrip(".")
        if reason := self.name_refusal(name):
            return reason
        if name == "localhost" or name.endswith(".localhost"):  # loopback by definition (RFC 6761)
            return self.refusal(name, "127.0.0.1")
        address = literal_address(name)
        return None if address is None else self.refusal(name, address)


def literal_address(host: str) -> str | None:
    """The address a host that is an IP literal stands for, or None for a name."""
    try:
        return str(ipaddress.ip_address(host.split("%", 1)[0]))
    except ValueError:
        pass
    try:  # 127.1, 2130706433, 0x7f.1: shorthands the resolver reads as IPv4 addresses
        return socket.inet_ntoa(socket.inet_aton(host))
    except OSError:
        return None


def _is_network(value: str) -> bool:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return False
    return True


class GuardedConnector(aiohttp.TCPConnector):
    """A TCPConnector whose every resolution (first request and each redirect hop) passes the policy."""

    def __init__(self, policy: AddressPolicy, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._policy = policy

    async def _resolve_host(self, host: str, port: int, traces: Sequence[Any] | None = None) -> list[ResolveResult]:
        if reason := self._policy.name_refusal(host):
            raise AddressNotAllowed(reason)
        results = await super()._resolve_host(host, port, traces=traces)
        for result in results:
            if reason := self._policy.refusal(host.rstrip("."), result["host"]):
                raise AddressNotAllowed(reason)
        return results
