"""Per-user kernel quotas that sandboxes of one host uid hold together: each gets a share.

Some kernel quotas are counted per uid in a user namespace *and*, level by
level, against the uid that made each namespace, up to the host: inotify
instances and watches (``/proc/sys/user``), and the bytes of POSIX message
queues, pending signals and locked memory (rlimits the kernel checks at every
level against the maker's value). A root daemon gives every Docker and process
sandbox a host uid of its own (``pool/uids.py``), so each has the whole quota.
Where sandboxes cannot each have one, one sandbox could take the quota of
every other:

- a fork pool's sandboxes are counted against the template's uid;
- a daemon that is not root makes each process sandbox's user namespace
  itself, so every one of them is counted against the daemon's uid.

There each sandbox gets a share: the limit over the most that can hold it at
once (``holders``, the template or the daemon included). What goes over its
share fails in the sandbox with the error of a spent quota (``EMFILE``), and
the others keep theirs.

PTYs are not counted per user at all: every devpts instance but the host's
own draws from one pool, ``kernel.pty.max`` less the ``kernel.pty.reserve``
kept for the host (3072 of 4096 by default), and one sandbox's processes held
all of them (a process may hold as many as its fds). So every Docker, process
and fork sandbox gets a devpts instance with a ``max`` of its own: that pool
over the most sandboxes the daemon holds at once (``pty_share``); past it,
opening ``/dev/ptmx`` fails with ``ENOSPC`` in that sandbox only.
"""

from __future__ import annotations

import resource
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pool.config import PoolConfig
from pool.uids import HOST_UID_BACKENDS
from pool.wire import USER_QUOTAS

# Rlimits, shared out from the daemon's own soft values (a sandbox's runner sets them)...
SHARED_RLIMITS = ("RLIMIT_MSGQUEUE", "RLIMIT_SIGPENDING", "RLIMIT_MEMLOCK")
# ... and the rest from the host's (wire.USER_QUOTAS, in the same order), which
# a sandbox's user namespace gets as its /proc/sys/user limits.
HOST_QUOTAS = ("/proc/sys/fs/inotify/max_user_instances", "/proc/sys/fs/inotify/max_user_watches")
PTY_MAX, PTY_RESERVE = "/proc/sys/kernel/pty/max", "/proc/sys/kernel/pty/reserve"

Limits = dict[str, tuple[int, int]]


@dataclass(frozen=True)
class Holders:
    """How many of the daemon's sandboxes can hold one of these at once.

    0 is unknown (a backend built alone, as tests and benchmarks build them):
    then a pool counts only its own ``max_size``.
    """

    # Process sandboxes, which run as the daemon's own uid when it is not root.
    own_uid: int = 0
    # Docker, process and fork sandboxes: each has a devpts instance.
    ptys: int = 0

    @classmethod
    def of(cls, pools: Iterable[PoolConfig]) -> Holders:
        """The holders among the daemon's ``pools``, each at its ``max_size``."""
        pools = list(pools)
        return cls(
            own_uid=sum(p.max_size for p in pools if p.backend == "process"),
            ptys=sum(p.max_size for p in pools if p.backend in HOST_UID_BACKENDS),
        )

    def of_own_uid(self, pool: PoolConfig) -> int:
        """Who holds the daemon's uid's quotas when it is not root: its process
        sandboxes, or ``pool``'s alone when unknown, and the daemon itself."""
        return (self.own_uid or pool.max_size) + 1

    def of_ptys(self, pool: PoolConfig) -> int:
        """Who holds the host's PTYs: the daemon's sandboxes, or ``pool``'s alone when unknown."""
        return self.ptys or pool.max_size


def share(limit: int, holders: int) -> int:
    """One holder's part of ``limit``; at least 1, and no limit stays no limit."""
    if limit == resource.RLIM_INFINITY:
        return limit
    return max(1, limit // max(1, holders))


def rlimit_shares(limits: Limits, holders: int) -> Limits:
    """``limits`` (a runner's rlimits) plus each sandbox's share of SHARED_RLIMITS."""
    shared = {}
    for name in SHARED_RLIMITS:
        soft, _ = resource.getrlimit(getattr(resource, name))
        shared[name] = (share(soft, holders), share(soft, holders))
    return {**limits, **shared}


def user_quota_shares(holders: int) -> dict[str, int]:
    """Each sandbox's share of HOST_QUOTAS, by wire.USER_QUOTAS name. Blocking (procfs reads)."""
    return {
        name: share(int(Path(path).read_text()), holders)
        for name, path in zip(USER_QUOTAS, HOST_QUOTAS, strict=True)
    }


def pty_share(holders: int) -> int:
    """One sandbox's ``max`` for its devpts instance: the PTYs outside the host's
    reserve over ``holders``. Blocking (procfs reads)."""
    pool = int(Path(PTY_MAX).read_text()) - int(Path(PTY_RESERVE).read_text())
    return share(max(1, pool), holders)


# What a share should not fall below for ordinary code, and what raises it.
# A share under its floor is still enforced; the daemon says so at start
# (``small_shares``), since code then fails in a way its author will not
# expect: a file watcher (Node's fs.watch, watchdog) wants an inotify
# instance per process, and POSIX message queues of the kernel's default size
# (10 messages of 8 KiB) need 83,000 bytes each with the kernel's bookkeeping
# (measured on 6.18: 82,800 refused, 83,000 enough).
FLOORS: dict[str, tuple[int, str]] = {
    "max_inotify_instances": (4, "the sysctl fs.inotify.max_user_instances"),
    "max_inotify_watches": (1024, "the sysctl fs.inotify.max_user_watches"),
    "RLIMIT_MSGQUEUE": (84 * 1024, "the daemon's RLIMIT_MSGQUEUE (LimitMSGQUEUE= in its unit)"),
    "ptys": (8, "the sysctl kernel.pty.max"),
}


def sandbox_shares(user_quotas: dict[str, int], limits: Limits, ptys: int) -> dict[str, int]:
    """What one sandbox gets of each shared quota, by FLOORS' names."""
    return {**user_quotas, "RLIMIT_MSGQUEUE": limits["RLIMIT_MSGQUEUE"][0], "ptys": ptys}


def small_shares(shares: dict[str, int]) -> list[str]:
    """A readable line for each share in ``shares`` (FLOORS' names) under its
    floor; none when all are at least their floors."""
    lines = []
    for name, value in shares.items():
        least, setting = FLOORS[name]
        if value != resource.RLIM_INFINITY and value < least:
            lines.append(f"{name}: {value} per sandbox (under {least}); raise {setting}, "
                         "or lower the max_size of the pools that share it")
    return lines
