"""No network for any Python process of the test suite, the pytest process included.

The suite puts this folder on PYTHONPATH and sets `VISION_TL_TEST_OFFLINE=1`, so every
Python process it starts (CLI commands, DDP ranks, notebook kernels, pip) runs
`sitecustomize`, which calls `install()`. Connections to this machine (DDP rendezvous, a
kernel's ports) and Unix sockets (DataLoader workers) stay allowed.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

ENV = "VISION_TL_TEST_OFFLINE"


class NetworkBlocked(RuntimeError):
    """A test process tried to reach another machine."""


def _is_local(address: Any) -> bool:
    host = address[0] if isinstance(address, tuple) else address
    if host in ("localhost", "", None):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False  # a host name: resolving it would already use the network


def install() -> None:
    """Make every non-local connection raise `NetworkBlocked`, for the rest of the process."""
    if getattr(socket.socket.connect, "_vision_tl_guard", False):
        return
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def refuse(address: Any) -> None:
        raise NetworkBlocked(f"network access in tests: {address}")

    def connect(sock: socket.socket, address: Any) -> None:
        if sock.family != socket.AF_UNIX and not _is_local(address):
            refuse(address)
        return real_connect(sock, address)

    def connect_ex(sock: socket.socket, address: Any) -> int:
        if sock.family != socket.AF_UNIX and not _is_local(address):
            refuse(address)
        return real_connect_ex(sock, address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if not _is_local(host):
            refuse(host)
        return real_getaddrinfo(host, *args, **kwargs)

    real_getaddrinfo = socket.getaddrinfo
    connect._vision_tl_guard = True  # type: ignore[attr-defined]
    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
    socket.getaddrinfo = getaddrinfo
