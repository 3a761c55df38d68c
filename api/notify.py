"""systemd's notify protocol: one datagram per message on ``$NOTIFY_SOCKET``.

A few lines instead of a dependency (sd_notify(3)). Outside systemd, where the
variable is unset, every call is a cheap no-op.
"""

from __future__ import annotations

import os
import socket

import structlog

log = structlog.get_logger("sandpool.notify")


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # abstract namespace
            address = "\0" + address[1:]
        self.address = address
        self._socket: socket.socket | None = None
        if address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.setblocking(False)

    def notify(self, *fields: str) -> None:
        """Send ``READY=1``-style fields; a full or missing socket is logged, not raised."""
        if self._socket is None:
            return
        try:
            self._socket.sendto("\n".join(fields).encode(), self.address)
        except OSError as e:
            log.warning("notify_failed", error=str(e))

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdog_interval_s() -> float | None:
    """Half of systemd's WatchdogSec for this process, or None when no watchdog is set."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000
