"""What a warm sandbox holds in memory: RSS, PSS and USS of its processes, from /proc.

A Docker sandbox's processes are its container's (the tree under the
container's init, ``State.Pid``). A process-tier or fork-tier sandbox's are the
daemon's descendants in its cgroup: each has a directory of its own below its
pool's (``sandpool-<daemon pid>-<instance>-<pool>/<sandbox id>``), which every
process of it is born in (process tier) or moved to before it unshares (fork
tier); a fork pool's template is in ``template`` beside them.

RSS counts every page a process maps, shared or not; PSS divides each shared
page among the processes that map it, so the PSS of all sandboxes adds up to
what they cost together (pages of the image's files and of a runner's fork are
shared); USS counts only the pages no other process maps, what one more
sandbox adds. A fork sandbox's pages stay its template's until written, so its
PSS is a share of the template's that shrinks as more sandboxes are warm, and
its USS is what it copied or allocated.
"""

from __future__ import annotations

import asyncio
import json
import statistics
from pathlib import Path
from typing import Any

import aiodocker

from bench import docker_paths
from pool.backends.docker import LABEL_INSTANCE, LABEL_POOL


def process_tree(root: int) -> list[int]:
    """``root`` and its descendants that still exist (threads are not processes)."""
    found, pending = [], [root]
    while pending:
        pid = pending.pop()
        found.append(pid)
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:  # gone meanwhile
            continue
        for task in tasks:
            try:
                pending.extend(int(child) for child in (task / "children").read_text().split())
            except OSError:
                continue
    return found


def smaps_rollup_kib(pid: int) -> dict[str, int]:
    """Rss, Pss and the private pages of one process in KiB (zero if it is gone)."""
    fields = {"Rss": 0, "Pss": 0, "Private_Clean": 0, "Private_Dirty": 0}
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in fields:
            fields[key] = int(rest.split()[0])
    return fields


def processes_memory(pids: list[int]) -> dict[str, Any]:
    """RSS, PSS and USS (MiB) summed over ``pids``, and their count."""
    rollups = [smaps_rollup_kib(pid) for pid in pids]
    return {
        "processes": len(pids),
        "rss_mib": round(sum(r["Rss"] for r in rollups) / 1024, 1),
        "pss_mib": round(sum(r["Pss"] for r in rollups) / 1024, 1),
        "uss_mib": round(sum(r["Private_Clean"] + r["Private_Dirty"] for r in rollups) / 1024, 1),
    }


def tree_memory(root: int) -> dict[str, Any]:
    """RSS, PSS and USS (MiB) summed over the tree under ``root``, and its process count."""
    return processes_memory(process_tree(root))


async def docker_sandbox_roots(instance_id: str, pool: str) -> list[int]:
    """Host pids of the init process of every running container of ``pool``."""
    labels = [f"{LABEL_INSTANCE}={instance_id}", f"{LABEL_POOL}={pool}"]
    async with aiodocker.Docker(url=docker_paths.DOCKER_URL) as docker, asyncio.timeout(
        docker_paths.CALL_TIMEOUT_S
    ):
        containers = await docker.containers.list(filters=json.dumps({"label": labels}))
        roots = []
        for container in containers:
            details = await docker.containers.container(container.id).show()
            if details["State"].get("Running") and details["State"].get("Pid"):
                roots.append(int(details["State"]["Pid"]))
    return roots


TEMPLATE_CGROUP = "template"  # a fork pool's template, beside its sandboxes' cgroups


def pool_cgroup_members(daemon_pid: int, instance_id: str, pool: str) -> dict[str, list[int]]:
    """The daemon's descendants in ``pool``'s cgroups, by the directory below the pool's
    (a sandbox's id, or ``template``): one sandbox's processes each, for the process
    and fork tiers. Any controller's hierarchy will do (cgroup v1 or v2): every
    process of a sandbox is in its directory in each.
    """
    pool_dir = f"sandpool-{daemon_pid}-{instance_id}-{pool}"
    groups: dict[str, list[int]] = {}
    for pid in process_tree(daemon_pid)[1:]:
        try:
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        except OSError:  # gone meanwhile
            continue
        for line in lines:
            parts = line.split(":", 2)[-1].split("/")
            if pool_dir in parts[:-1]:
                groups.setdefault(parts[parts.index(pool_dir) + 1], []).append(pid)
                break
    return groups


def cgroup_sandboxes(daemon_pid: int, instance_id: str, pool: str) -> dict[str, Any]:
    """Per-sandbox memory of ``pool``'s warm sandboxes (process or fork tier), and of
    the fork template's processes (``template``), if the pool has one."""
    groups = pool_cgroup_members(daemon_pid, instance_id, pool)
    template = groups.pop(TEMPLATE_CGROUP, None)
    out = warm_sandbox_trees([processes_memory(pids) for pids in groups.values()])
    if template is not None:
        out["template"] = processes_memory(template)
    return out


def warm_sandboxes(roots: list[int]) -> dict[str, Any]:
    """Per-sandbox memory of the trees under ``roots`` (idle, warm sandboxes)."""
    return warm_sandbox_trees([tree_memory(root) for root in roots])


def warm_sandbox_trees(trees: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians and totals of per-sandbox memory (``processes_memory``'s)."""
    if not trees:
        return {"sandboxes": 0}
    return {
        "sandboxes": len(trees),
        "processes_per_sandbox": max(t["processes"] for t in trees),
        "rss_mib_median": round(statistics.median(t["rss_mib"] for t in trees), 1),
        "pss_mib_median": round(statistics.median(t["pss_mib"] for t in trees), 1),
        "uss_mib_median": round(statistics.median(t["uss_mib"] for t in trees), 1),
        "rss_mib_total": round(sum(t["rss_mib"] for t in trees), 1),
        "pss_mib_total": round(sum(t["pss_mib"] for t in trees), 1),
        "per_sandbox": trees,
    }
