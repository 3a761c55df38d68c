"""The daemon's CPU standing: above its sandboxes, with busy wasm guests out of it.

Every request passes through the daemon's threads several times (the HTTP
request, the hand-out, the output, the answer, the destroy and the refill). In
a cgroup of ordinary weight they compete as one process with each pool, and a
tenant's request waits behind neighbours' sandbox starts at every hop
(docs/security.md, "The daemon stands above its sandboxes"). So at start-up
the daemon moves into a cpu cgroup of its own, weighted ``DAEMON_WEIGHT``
processes, beside its pools' directories:

- cgroup v1: ``sandpool-<pid>-daemon`` in the cpu hierarchy, below the cgroup
  the daemon was started in (where its pools' directories go too);
- cgroup v2: the leaf ``sandpool-daemon`` of a delegated cgroup, which the
  "no internal processes" rule already asks for (pool/backends/process/cgroups.py).

A thread alone in a cgroup takes the whole cgroup's weight, whatever its own:
the kernel divides a group's weight by its load, and a SCHED_IDLE thread is all
of it when the rest sleeps. A busy wasm guest's thread therefore leaves the
daemon's cgroup for ``sandpool-<pid>-guests`` beside it, of one process's
weight (v1 moves threads one by one): the standing it had before the daemon
was weighted. Not an idle cgroup: a busy guest's thread takes the GIL in its
host functions (the epoch callback among them), and preempted there in an idle
cgroup on a host whose cores are busy, it can stall the whole event loop (the
likely cause of one `make hostile` run where every tier's p99 rose to 0.4-1.1 s
at once; docs/security.md). Cgroup v2 moves whole
processes (a threaded subtree cannot hold the pools, which need the memory
controller), so there a daemon that serves wasm pools keeps an ordinary
weight: its busy guests would otherwise outrank every pool.

Best effort throughout: without root or delegation, a cpu controller, or on
any error, the daemon keeps the standing it was started with, which only
moves latency. Blocking (kernfs writes, a cgroup migration waits for an RCU
grace period): run in a thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass
from pathlib import Path

import structlog

from pool.backends.process.cgroups import (
    CGROUP_DAEMON_LEAF,
    CGROUP_ROOT,
    WEIGHT_OF_ONE,
    daemon_group_name,
    delegated_v2_base,
    own_cgroups,
    pools_base,
    sweep_stale_cgroups,
    unified_host,
)

log = structlog.get_logger("sandpool.cpu")

# In processes' weights; measured with 8 (docs/security.md). The daemon's few
# milliseconds per request come first. A wasm guest's start-up runs on the
# daemon's threads and shares this weight (a guest starting at a lower one
# would hold the GIL the event loop waits for: pool/backends/wasm/threads.py).
DAEMON_WEIGHT = 8


@dataclass(frozen=True, slots=True)
class DaemonCgroups:
    """Where the daemon stood and stands, in the cgroup tree that holds its cpu controller."""

    version: int
    home: Path  # the cgroup it was started in (v2: the delegated one, the leaf's parent)
    group: Path  # its own, weighted
    guests: Path | None  # v1, when it serves wasm pools: busy guests' threads, weight of one


_raised: DaemonCgroups | None = None  # this process's standing: one per process, like its pid


def raise_daemon(*, serves_wasm: bool) -> str:
    """Move the daemon into a cgroup weighted DAEMON_WEIGHT processes.

    Returns "" or why its standing is unchanged (logged by the caller).
    """
    global _raised
    try:
        own = own_cgroups()
        if unified_host():
            _raised = _raise_v2(own.get("", "/"), serves_wasm)
        else:
            _raised = _raise_v1(own, serves_wasm)
    except OSError as e:
        return e.strerror or str(e)
    return ""


def _raise_v1(own: dict[str, str], serves_wasm: bool) -> DaemonCgroups:
    if "cpu" not in own:
        raise OSError(errno.ENOENT, "no cgroup v1 cpu controller")
    home = pools_base(own["cpu"], CGROUP_ROOT / "cpu")
    sweep_stale_cgroups(home)
    name, one, _ = WEIGHT_OF_ONE[1]
    group = home / daemon_group_name()
    guests = home / daemon_group_name(role="guests") if serves_wasm else None
    made: list[Path] = []
    try:
        for directory in (group, guests):
            if directory is not None:
                directory.mkdir()
                made.append(directory)
        (group / name).write_text(str(one * DAEMON_WEIGHT))
        (group / "cgroup.procs").write_text(str(os.getpid()))  # v1: every thread moves
    except OSError:
        for directory in reversed(made):
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise
    return DaemonCgroups(1, home, group, guests)


def _raise_v2(own: str, serves_wasm: bool) -> DaemonCgroups:
    if serves_wasm:
        raise OSError(errno.EOPNOTSUPP, "cgroup v2 cannot move a busy wasm guest's thread "
                      "out of the daemon's cgroup, which would give it the daemon's weight")
    home = delegated_v2_base(own)
    if "cpu" not in (home / "cgroup.controllers").read_text().split():
        raise OSError(errno.ENOENT, f"no cpu controller delegated to {home}")
    group = home / CGROUP_DAEMON_LEAF
    group.mkdir(exist_ok=True)
    if Path(own).name != CGROUP_DAEMON_LEAF:
        (group / "cgroup.procs").write_text(str(os.getpid()))
    # Once the daemon has left it, its former cgroup may hand controllers down.
    (home / "cgroup.subtree_control").write_text("+cpu")
    name, one, _ = WEIGHT_OF_ONE[2]
    (group / name).write_text(str(one * DAEMON_WEIGHT))
    return DaemonCgroups(2, home, group, None)


def yield_guest_thread(thread_id: int) -> None:
    """Move a busy wasm guest's thread to the guests' cgroup (v1). Never raises.

    The thread is alive: the guest's worker lives until its sandbox is destroyed,
    which waits for this. Without that cgroup the thread stays in SCHED_IDLE
    within the daemon's (pool/backends/wasm/threads.py).
    """
    raised = _raised
    if raised is None or raised.guests is None:
        return
    try:
        (raised.guests / "tasks").write_text(str(thread_id))
    except OSError as e:
        if e.errno != errno.ESRCH:
            log.warning("wasm_guest_not_moved", error=e.strerror)


def lower_daemon() -> None:
    """Undo raise_daemon: the daemon back where it came from, its cgroups removed.

    Cgroup v2 keeps the daemon in its leaf, which the pools' "no internal
    processes" rule may still need; only the weight goes back. What stays busy
    is left to the next daemon's sweep (v1: named after this daemon's pid).
    """
    global _raised
    raised, _raised = _raised, None
    if raised is None:
        return
    name, one, _ = WEIGHT_OF_ONE[raised.version]
    if raised.version == 2:
        with contextlib.suppress(OSError):
            (raised.group / name).write_text(str(one))
        return
    with contextlib.suppress(OSError):
        (raised.home / "cgroup.procs").write_text(str(os.getpid()))
    for directory in (raised.guests, raised.group):
        if directory is not None:
            try:
                directory.rmdir()
            except OSError as e:
                log.warning("cgroup_not_removed", path=str(directory), error=e.strerror)
