"""The blocking client's Unix-socket transport: httpx's, with a failed connect() cleaned up.

httpcore's ``SyncBackend.connect_unix_socket`` (1.0.9) leaves the socket of a
failed ``connect()`` to the garbage collector: each "no daemon" costs an fd
until then and a ``ResourceWarning`` (an error under ``-W error``, as in this
repository's tests). The async side (anyio) closes it. The fix needs two
private names, touched here only: httpcore's ``SyncStream`` (the stream its
backend returns) and httpx's ``HTTPTransport._pool`` (to hand the pool this
backend, which ``HTTPTransport`` takes no argument for). Should either move,
``unix_transport`` falls back to httpx's transport as it is.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from typing import Any

import httpcore
import httpx

try:
    from httpcore._backends.sync import SyncStream

    HAVE_SYNC_STREAM = True
except ImportError:  # a later httpcore: its own backend, warning and all
    HAVE_SYNC_STREAM = False


class ClosingUnixBackend(httpcore.SyncBackend):
    """httpcore's blocking backend, closing the socket when a Unix-socket connect fails."""

    def connect_unix_socket(
        self, path: str, timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            for option in socket_options or ():
                sock.setsockopt(*option)
            sock.settimeout(timeout)
            sock.connect(path)
        except TimeoutError as e:  # an OSError too: first
            sock.close()
            raise httpcore.ConnectTimeout(e) from e
        except OSError as e:
            sock.close()
            raise httpcore.ConnectError(e) from e
        return SyncStream(sock)


def unix_transport(path: str) -> httpx.HTTPTransport:
    """httpx's transport to the Unix socket ``path``, its failed connects cleaned up."""
    transport = httpx.HTTPTransport(uds=path)
    pool = getattr(transport, "_pool", None)
    if HAVE_SYNC_STREAM and isinstance(pool, httpcore.ConnectionPool):
        pool._network_backend = ClosingUnixBackend()
    return transport
