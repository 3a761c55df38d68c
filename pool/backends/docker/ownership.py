"""Which daemon owns a container: the owner label it is made with, and the proof of death.

The reaper removes a container only when the daemon named by its owner label
is proven gone, so two daemons sharing one dockerd never reap each other's
sandboxes. Everything here reads /proc of this host and nothing of Docker.
"""

from __future__ import annotations

import os
import socket

import structlog

log = structlog.get_logger("sandpool.docker")


def _process_start_time(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot; None if it is gone.

    Raises OSError when the answer cannot be read (EMFILE, EACCES): that proves
    nothing about the process, so callers must not take it for "gone".
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat_line = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # Field 22, counted after the parenthesised command name, which may hold spaces.
    fields = stat_line.rpartition(")")[2].split()
    if len(fields) < 20:
        raise OSError(f"cannot parse /proc/{pid}/stat")
    return fields[19]


def _boot_id() -> str:
    """This boot's id. Raises OSError when it cannot be read."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot_id = f.read().strip()
    if not boot_id:
        raise OSError("empty /proc/sys/kernel/random/boot_id")
    return boot_id


def _pid_namespace() -> str:
    """This process's pid namespace inode (readlink: needs no file descriptor)."""
    return os.readlink("/proc/self/ns/pid").removeprefix("pid:[").rstrip("]")


def owner_label() -> str:
    """This daemon as host:boot-id:pid-namespace:pid:start-time.

    The start time guards against pid reuse, the boot id against a reboot, and
    the namespace against a daemon in a container that shares dockerd and the
    hostname, whose pids mean nothing here. Raises OSError when part of the
    identity cannot be read: a container must never carry a label that a
    reaper could later misjudge.
    """
    pid = os.getpid()
    start_time = _process_start_time(pid)
    if start_time is None:
        raise OSError("cannot read this process's own start time")
    return ":".join((socket.gethostname(), _boot_id(), _pid_namespace(), str(pid), start_time))


def owner_alive(label: str) -> bool:
    """Whether the daemon named by an owner label may still run.

    False only when its death is proven: a label from before this boot, or a
    pid that is gone or now belongs to a process started at another time (and
    a container no daemon ever claimed: no or a malformed label). True for
    another host or pid namespace, and whenever the proof fails (EMFILE, an
    unreadable /proc): a reaper that guessed "dead" would delete a live
    daemon's sandboxes.
    """
    parts = label.split(":")
    if len(parts) != 5:
        return False  # no owner label or an unknown format: nobody claims it
    host, boot_id, pid_namespace, pid, start_time = parts
    if host != socket.gethostname():
        return True
    try:
        if boot_id != _boot_id():
            return False  # the host rebooted since: that daemon is gone
        if pid_namespace != _pid_namespace():
            return True
        if not pid.isdigit():
            return False  # not a label any daemon wrote
        return _process_start_time(int(pid)) == start_time
    except OSError as e:
        log.warning("owner_unknown", owner=label, error=str(e), verdict="alive")
        return True
