"""The daemon's listening sockets, bound before anything else starts.

A port in use is found before the event log is opened, the codec pool started or an inbox file taken, and
`daemon_started` is logged only once the sockets listen. Bound as aiohttp would bind them: every address the
host resolves to, SO_REUSEADDR (a restart need not wait out TIME_WAIT), IPv6 sockets IPv6-only.
"""

from __future__ import annotations

import errno
import socket

BACKLOG = 128  # aiohttp's default


class CannotListen(Exception):
    """The HTTP host and port cannot be listened on."""

    def __init__(self, host: str, port: int, error: OSError) -> None:
        self.in_use = error.errno == errno.EADDRINUSE
        reason = "the port is in use by another process" if self.in_use else (error.strerror or str(error))
        super().__init__(f"cannot listen on {host}:{port}: {reason}")
        self.event = "port_in_use" if self.in_use else "listen_failed"
        self.details: dict[str, object] = {"host": host, "port": port}
        if not self.in_use:
            self.details["error"] = reason


def listening_sockets(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to `host`:`port` and listening; CannotListen if any address cannot be taken."""
    sockets: list[socket.socket] = []
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, protocol, _, address in dict.fromkeys(addresses):
            sock = socket.socket(family, kind, protocol)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
    except OSError as exc:  # socket.gaierror too: a host name that does not resolve
        for sock in sockets:
            sock.close()
        raise CannotListen(host, port, exc) from None
    return sockets
