"""What a warm sandbox holds in memory: RSS and PSS of its processes, from /proc.

A Docker sandbox's processes are its container's (the tree under the
container's init, ``State.Pid``); a process-tier sandbox's are the tree under
its outermost ``bwrap``, a child of the daemon. RSS counts every page a
process maps, shared or not; PSS divides each shared page among the processes
that map it, so the PSS of all sandboxes adds up to what they cost together
(pages of the image's files and of a runner's fork are shared).
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
    """Rss and Pss of one process in KiB (zero if it is gone)."""
    fields = {"Rss": 0, "Pss": 0}
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in fields:
            fields[key] = int(rest.split()[0])
    return fields


def tree_memory(root: int) -> dict[str, Any]:
    """RSS and PSS (MiB) summed over the tree under ``root``, and its process count."""
    pids = process_tree(root)
    rollups = [smaps_rollup_kib(pid) for pid in pids]
    return {
        "processes": len(pids),
        "rss_mib": round(sum(r["Rss"] for r in rollups) / 1024, 1),
        "pss_mib": round(sum(r["Pss"] for r in rollups) / 1024, 1),
    }


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


def bwrap_roots(daemon_pid: int) -> list[int]:
    """The daemon's children that are bubblewrap: one per process-tier sandbox."""
    roots = []
    for pid in process_tree(daemon_pid)[1:]:
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if comm == "bwrap" and parent == daemon_pid:
            roots.append(pid)
    return roots


def warm_sandboxes(roots: list[int]) -> dict[str, Any]:
    """Per-sandbox RSS and PSS of the trees under ``roots`` (idle, warm sandboxes)."""
    trees = [tree_memory(root) for root in roots]
    if not trees:
        return {"sandboxes": 0}
    return {
        "sandboxes": len(trees),
        "processes_per_sandbox": max(t["processes"] for t in trees),
        "rss_mib_median": round(statistics.median(t["rss_mib"] for t in trees), 1),
        "pss_mib_median": round(statistics.median(t["pss_mib"] for t in trees), 1),
        "rss_mib_total": round(sum(t["rss_mib"] for t in trees), 1),
        "pss_mib_total": round(sum(t["pss_mib"] for t in trees), 1),
        "per_sandbox": trees,
    }
