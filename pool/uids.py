"""Host uids for sandboxes: one of its own per live sandbox.

The kernel keeps per-user quotas per host uid (inotify instances, POSIX message
queue bytes, pending signals, RLIMIT_NPROC): sandboxes that share a uid share
those quotas, and one could use them all up for the others. (PTYs are one pool
for the whole host whatever the uid: pool/quotas.py gives each sandbox a share.)
So every Docker and process sandbox runs as a uid of a range reserved for this
daemon, held from its start until its destroy has returned (its processes are
gone by then). Uids are handed out in order and a released one goes to the
back of the line, so a uid is reused as late as the range allows.

Invariant: a uid is held by at most one sandbox of this daemon at a time. Two
daemons on one host need ranges that do not overlap (``sandbox_uid_base``).
"""

from __future__ import annotations

from collections import deque

from pool.errors import BackendError

# Above the subordinate-id ranges useradd hands out (100000 + 65536 n), the
# dynamic users of systemd (61184-65519) and 16-bit uids; below 2^31, which
# some tools still read as a signed number.
# The backends whose sandboxes are host processes, each run as a uid of its
# own; wasm guests run inside the daemon's process and have no uid.
HOST_UID_BACKENDS = frozenset({"docker", "process", "fork"})
DEFAULT_BASE = 1_900_000_000
DEFAULT_COUNT = 65536
MAX_UID = 2**31 - 1


class SandboxUids:
    """Allocates host uids from ``[base, base + count)``; synchronous, for one event loop."""

    def __init__(self, base: int = DEFAULT_BASE, count: int = DEFAULT_COUNT) -> None:
        if base < 65536 or count < 1 or base + count - 1 > MAX_UID:
            raise ValueError(f"bad sandbox uid range {base}+{count}")
        self.base = base
        self.count = count
        self._next_fresh = base
        self._released: deque[int] = deque()
        self._held: set[int] = set()

    def __repr__(self) -> str:
        return f"<SandboxUids {self.base}+{self.count} held={len(self._held)}>"

    def acquire(self) -> int:
        """A uid no live sandbox of this daemon has. Raises BackendError when none is left."""
        if self._next_fresh < self.base + self.count:
            uid = self._next_fresh
            self._next_fresh += 1
        elif self._released:
            uid = self._released.popleft()
        else:
            raise BackendError(
                f"all {self.count} sandbox uids are in use (server.sandbox_uid_count)",
                code="sandbox_uids_exhausted",
            )
        self._held.add(uid)
        return uid

    def release(self, uid: int) -> None:
        """Give a uid back once its sandbox's processes are gone; idempotent."""
        if uid in self._held:
            self._held.remove(uid)
            self._released.append(uid)

    def __contains__(self, uid: int) -> bool:
        return self.base <= uid < self.base + self.count


_default: SandboxUids | None = None


def default_uids() -> SandboxUids:
    """The range of a backend built without one (tests, benchmarks): one per process."""
    global _default
    if _default is None:
        _default = SandboxUids()
    return _default
