"""This process's mount table, and lazy unmounting: what removing a directory that
may hold mounts needs before it deletes anything."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

_MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


def mount_points() -> list[str]:
    """Every mount point in this process's mount namespace, in mount order.

    Reads /proc/self/mountinfo (raises OSError if it cannot).
    """
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # Field 5 is the mount point, with space, tab, newline and backslash
            # octal-escaped.
            points.append(line.split()[4].encode().decode("unicode_escape"))
    return points


def mount_points_under(directory: Path) -> list[str]:
    """The mount points at ``directory`` or below it."""
    prefix = f"{directory}/"
    return [
        point for point in mount_points() if point == str(directory) or point.startswith(prefix)
    ]


def detach(target: Path | str) -> None:
    """Lazily unmount ``target`` (``MNT_DETACH``); one that is not a mount point (any
    more) is fine. Raises OSError for any other failure."""
    if _libc.umount2(os.fsencode(target), _MNT_DETACH) != 0:
        error = ctypes.get_errno()
        if error not in (errno.EINVAL, errno.ENOENT):
            raise OSError(error, f"umount {target}: {os.strerror(error)}")
