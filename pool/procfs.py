"""Facts about host processes that several modules need, read without guessing."""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """The process at the other end of a Unix socket; -1s when the kernel said nothing."""

    pid: int
    uid: int
    gid: int


NO_PEER = PeerCredentials(-1, -1, -1)


def socket_peer(sock: socket.socket) -> PeerCredentials:
    """SO_PEERCRED of a connected Unix socket: taken at connect(), so not forgeable
    later. A pid of 0 is a peer in another pid namespace; NO_PEER if the peer is gone."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return NO_PEER
    return PeerCredentials(*struct.unpack("3i", raw))


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user's counts: EPERM means it is there).

    A reused pid reads as alive: callers that remove what a dead daemon left
    err towards keeping it.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_names(pids: list[int]) -> list[str]:
    """``"<pid> <comm>"`` for each process still there, to say in a log what was
    found where nothing should run; one gone meanwhile is left out."""
    names = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/comm") as comm:
                names.append(f"{pid} {comm.read().strip()}")
        except OSError:
            continue
    return names
