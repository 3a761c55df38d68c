"""A Docker pool's own cpu cgroup, where the engine is this host's own dockerd.

Docker puts every container below one parent cgroup (``/docker`` with the
cgroupfs driver). All pools' containers then compete as one cgroup of one
process's weight among the daemon and the other tiers' pools, and on cgroup v1
that weight is split between the CPUs by where the group's load is: a busy
neighbour's container on one core leaves a tenant's container woken on the
other a sliver of it. Lowering a busy container's standing through dockerd is
a container update, a ``runc update`` of ~30 ms.

So where sandpool can hold the cgroup itself, each Docker pool's containers go
below a directory of its own (``HostConfig.CgroupParent``), named and placed
as the process tier's pools' are, beside them and the daemon, and
``PoolCpu`` (pool/backends/process/cpu.py) keeps it as it keeps theirs: a
busy run goes idle at ``BUSY_AFTER_S`` by one kernfs write at each level, a
start weighs. That needs (``refused``): root, a cgroup v1 cpu hierarchy, an
engine with the cgroupfs driver on cgroup v1, and that engine being this
host's dockerd seen from here: the socket's peer is a process named
``dockerd`` in this cgroup namespace, so the paths it makes are the paths
sandpool sees and removes. An engine on another host, behind a proxy, in
another pid namespace (the socket bind-mounted into a pod), with the systemd
driver or on cgroup v2 keeps its containers where it puts them; a busy
container's CpuShares are then lowered through dockerd (backend.py).

The engine makes the pool's directory in every v1 hierarchy it mounts (runc's
``mkdir -p``), not only cpu: ``remove_pool_cgroup`` and ``sweep_stale`` remove
it from every one. What makes, sweeps or removes cgroups blocks briefly: run
it in a thread.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pool.backends.process.cgroups import (
    CGROUP_ROOT,
    CgroupTree,
    SandboxCgroup,
    own_cgroups,
    pools_base,
    remove_pool_cgroups,
    sweep_stale_cgroups,
    unified_host,
)
from pool.procfs import socket_peer

ENGINE_COMMAND = "dockerd"


@dataclass(frozen=True, slots=True)
class EngineFacts:
    """What decides whether a Docker pool may hold its own cgroup."""

    root: bool  # this daemon runs as root
    own_cpu: str | None  # this daemon's v1 cpu cgroup; None without a v1 cpu hierarchy
    driver: str  # the engine's CgroupDriver (GET /info)
    engine_cgroup_version: str  # its CgroupVersion
    peer_command: str | None  # the socket's peer process, None where it cannot be seen
    same_cgroup_namespace: bool  # the peer's cgroup namespace is this daemon's


def refused(facts: EngineFacts) -> str:
    """Why the pool's containers stay where the engine puts them; "" when they need not."""
    if not facts.root:
        return "not root"
    if facts.own_cpu is None:
        return "no cgroup v1 cpu hierarchy"
    if facts.driver != "cgroupfs" or facts.engine_cgroup_version != "1":
        return (f"the engine's cgroup driver is {facts.driver or 'unknown'} on cgroup "
                f"v{facts.engine_cgroup_version or '?'}, not cgroupfs on v1")
    if facts.peer_command != ENGINE_COMMAND:
        return ("the Docker socket's peer is not a dockerd process visible here "
                f"({facts.peer_command or 'another host or pid namespace'})")
    if not facts.same_cgroup_namespace:
        return "dockerd runs in another cgroup namespace"
    return ""


def engine_facts(url: str, info: Mapping[str, Any]) -> EngineFacts:
    """The facts for the engine at ``url`` whose ``GET /info`` answered ``info``.
    Blocking (a socket connect and /proc reads): run in a thread."""
    own_cpu = None
    if not unified_host():
        with contextlib.suppress(OSError):
            own_cpu = own_cgroups().get("cpu")
    peer = _socket_peer(url)
    command = same_namespace = None
    if peer is not None:
        with contextlib.suppress(OSError):
            command = Path(f"/proc/{peer}/comm").read_text().strip()
            same_namespace = (os.readlink(f"/proc/{peer}/ns/cgroup")
                              == os.readlink("/proc/self/ns/cgroup"))
    return EngineFacts(
        root=os.geteuid() == 0,
        own_cpu=own_cpu,
        driver=str(info.get("CgroupDriver") or ""),
        engine_cgroup_version=str(info.get("CgroupVersion") or ""),
        peer_command=command,
        same_cgroup_namespace=bool(same_namespace),
    )


def _socket_peer(url: str) -> int | None:
    """The pid of the process serving the unix socket ``url``; None for another
    scheme, an unreachable socket, or a peer in another pid namespace (pid 0)."""
    if not url.startswith("unix://"):
        return None
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(url.removeprefix("unix://"))
            pid = socket_peer(s).pid
    except OSError:
        return None
    return pid if pid > 0 else None


@dataclass(frozen=True, slots=True)
class PoolCgroup:
    """A Docker pool's own directory: the tree PoolCpu keeps, and the engine's name for it."""

    tree: CgroupTree  # its v1 cpu directory
    parent: str  # HostConfig.CgroupParent: the path below each hierarchy's root

    def sandbox(self, container_id: str) -> SandboxCgroup | None:
        """A started container's cpu cgroup, for its idle flag; None where it is not
        below the pool's directory (an engine that ignored CgroupParent). One stat
        of a kernfs file, fine on the event loop: a start awaits nothing after its
        sandbox exists. Docker removes the directory with the container."""
        idle_file = self.tree.pool_dirs["cpu"] / container_id / "cpu.idle"
        return SandboxCgroup(dirs=[], idle_file=idle_file) if idle_file.exists() else None


def prepare_pool_cgroup(dir_name: str, own_cpu: str) -> PoolCgroup:
    """Make the pool's cpu directory beside the daemon's (``pools_base``), after
    sweeping what dead daemons left there. Raises OSError."""
    hierarchy = CGROUP_ROOT / "cpu"
    base = pools_base(own_cpu, hierarchy)
    sweep_stale(base.relative_to(hierarchy))
    directory = base / dir_name
    directory.mkdir(exist_ok=True)
    return PoolCgroup(CgroupTree(version=1, pool_dirs={"cpu": directory}),
                      "/" + str(directory.relative_to(hierarchy)))


def hierarchies() -> list[Path]:
    """Every mounted v1 hierarchy's root, once each (cpu and cpuacct are one mount,
    reached by symlinks too)."""
    seen: dict[Path, Path] = {}
    with contextlib.suppress(OSError):
        for entry in sorted(CGROUP_ROOT.iterdir()):
            if entry.is_dir() and (entry / "cgroup.procs").exists():
                seen.setdefault(entry.resolve(), entry)
    return list(seen.values())


def remove_pool_cgroup(pool: PoolCgroup) -> None:
    """Remove the pool's directory from every hierarchy, once the engine has
    removed its containers (``remove_pool_cgroups``). Blocking: run in a thread.

    Only this pool's containers are put there, so what is still below it then
    is the engine's leftover of them: killed, and the directories the engine
    left (empty ones too) removed. Seen in CI after a dockerd restart: the pool
    had removed every container the engine listed, and rmdir said EBUSY in
    every hierarchy.
    """
    relative = pool.parent.lstrip("/")
    remove_pool_cgroups(CgroupTree(version=1, pool_dirs={
        hierarchy.name: hierarchy / relative for hierarchy in hierarchies()}))


def sweep_stale(relative_base: Path) -> None:
    """Remove dead daemons' cgroups at ``relative_base`` from every hierarchy
    (``sweep_stale_cgroups``, which the process tier runs on its three).

    What still runs in them is a dead daemon's orphan, a container among them:
    the engine shares this pid namespace (``refused``), so every daemon using
    it is visible here, and one that reads as dead is. The reaper removes such
    containers (reaper.py); killed first, they cannot hold the directories.
    """
    for hierarchy in hierarchies():
        sweep_stale_cgroups(hierarchy / relative_base)
