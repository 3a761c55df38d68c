"""The Docker backend's own bookkeeping against real dockerd: reaper and leak sweep."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import AsyncIterator
from typing import cast

import pytest
from structlog.testing import capture_logs

from pool.backends.docker import (
    LABEL_INSTANCE,
    LABEL_OWNER,
    LABEL_POOL,
    DockerBackend,
    owner_label,
)
from pool.backends.docker.containers import Containers
from pool.backends.docker.reaper import Reaper
from pool.config import PoolConfig
from pool.errors import BackendError
from tests.support import docker_containers, docker_volumes


def docker(*args: str) -> None:
    # Synchronous on purpose: the test's own loop has nothing else to do meanwhile.
    subprocess.run(["docker", *args], check=True, capture_output=True, timeout=60)


def pts_volume(container_id: str) -> str:
    """The name of the volume mounted at the container's /dev/pts."""
    pts = '{{range .Mounts}}{{if eq .Destination "/dev/pts"}}{{.Name}}{{end}}{{end}}'
    done = subprocess.run(["docker", "inspect", "-f", pts, container_id], check=True,
                          capture_output=True, text=True, timeout=60)
    return done.stdout.strip()


def stray_container(pool: str, instance: str, owner: str) -> str:
    """A container labelled like a sandbox, as a crashed or foreign daemon would leave."""
    done = subprocess.run(
        ["docker", "create", "--label", f"{LABEL_POOL}={pool}",
         "--label", f"{LABEL_INSTANCE}={instance}", "--label", f"{LABEL_OWNER}={owner}",
         "--network", "none", "sandpool/python:bookworm", "true"],
        check=True, capture_output=True, text=True, timeout=60,
    )
    return done.stdout.strip()[:12]  # the short id `docker ps -q` lists


@pytest.fixture
async def backend() -> AsyncIterator[DockerBackend]:
    name = f"t{uuid.uuid4().hex[:8]}"
    docker_backend = DockerBackend(PoolConfig(name=name), f"test-{uuid.uuid4().hex[:8]}")
    await docker_backend.start()
    try:
        yield docker_backend
    finally:
        await docker_backend.close()
        leftovers = docker_containers(f"{LABEL_POOL}={name}")
        if leftovers:
            docker("rm", "-f", "-v", *leftovers)
        assert leftovers == []


async def test_reaper_removes_containers_of_dead_daemons_only(backend: DockerBackend) -> None:
    host, boot, pidns, pid, _ = owner_label().split(":")
    dead = [
        stray_container(backend.config.name, "crashed", f"{host}:{boot}:{pidns}:{pid}:0"),
        stray_container(backend.config.name, "before-reboot", f"{host}:old-boot:{pidns}:1:1"),
        stray_container(backend.config.name, "unlabelled", ""),
    ]
    alive = [
        stray_container(backend.config.name, "other-live-daemon", owner_label()),
        stray_container(backend.config.name, "other-host", "elsewhere:b:1:1:1"),
        # Another pid namespace (a daemon in a container): its pids mean nothing here.
        stray_container(backend.config.name, "in-a-container", f"{host}:{boot}:1:{pid}:0"),
    ]
    try:
        # No count: a daemon running beside this test (the suite's shared one)
        # sweeps every 10 s with the same rule and may reap them first.
        await backend.reap_orphans()
        remaining = set(docker_containers(f"{LABEL_POOL}={backend.config.name}"))
        assert remaining.isdisjoint(dead)
        assert set(alive) <= remaining
    finally:
        docker("rm", "-f", "-v", *alive)


async def test_sweep_removes_an_untracked_container_on_the_second_look(
    backend: DockerBackend,
) -> None:
    sandbox = await backend.start_sandbox()
    leak = stray_container(backend.config.name, backend.instance_id, owner_label())
    await backend.sweep()
    assert leak in docker_containers(f"{LABEL_INSTANCE}={backend.instance_id}")  # suspect only
    await backend.sweep()
    mine = docker_containers(f"{LABEL_INSTANCE}={backend.instance_id}")
    assert leak not in mine
    assert sandbox.container_id[:12] in mine  # the tracked sandbox is untouched
    await backend.destroy_sandbox(sandbox)


async def test_reaper_removes_the_volume_a_sandbox_lost_its_container_without(
    backend: DockerBackend,
) -> None:
    """A container that went without its volumes (a dockerd restart, `docker rm`
    without -v) leaves its devpts volume; the reaper removes that one only."""
    kept, lost = await backend.start_sandbox(), await backend.start_sandbox()
    instance = f"{LABEL_INSTANCE}={backend.instance_id}"
    kept_volume, lost_volume = pts_volume(kept.container_id), pts_volume(lost.container_id)
    # One devpts volume per sandbox, labelled like it.
    assert sorted(docker_volumes(instance)) == sorted([kept_volume, lost_volume])
    docker("rm", "-f", lost.container_id)  # no -v: its volume stays, dangling
    await backend.reap_orphans()
    assert docker_volumes(instance) == [kept_volume]
    await backend.destroy_sandbox(kept)
    await backend.destroy_sandbox(lost)
    assert docker_volumes(instance) == []


async def test_sweep_marks_a_dead_idle_sandbox(backend: DockerBackend) -> None:
    sandbox = await backend.start_sandbox()
    died: list[str] = []
    backend.listener = lambda s, event: died.append(event)
    docker("kill", sandbox.container_id)
    await backend.sweep()
    assert sandbox.alive is False
    assert "died" in died
    await backend.destroy_sandbox(sandbox)


class RefusingContainers:
    """Dockerd's container calls as the reaper uses them, with one container it cannot remove.

    A fake on purpose: any daemon on this host (the suite's shared one sweeps
    every 10 s) reaps a real container whose owner is dead, by the same rule,
    so only a listing no other daemon can touch shows what this reaper skipped.
    """

    def __init__(self, dead_owner: str, stuck: str, other: str) -> None:
        labels = {LABEL_POOL: "crashed", LABEL_INSTANCE: "crashed", LABEL_OWNER: dead_owner}
        self.listing: list[dict[str, object]] = [
            {"Id": cid, "Labels": labels} for cid in (stuck, other)
        ]
        self.stuck = stuck
        self.removed: list[str] = []

    async def list(self, label: str) -> list[dict[str, object]]:
        return [info for info in self.listing if info["Id"] not in self.removed]

    async def remove(self, name_or_id: str) -> None:
        if name_or_id == self.stuck:
            # What dockerd answers for a root filesystem a restart left mounted.
            raise BackendError(f"cannot remove container {name_or_id}: device or resource busy")
        self.removed.append(name_or_id)

    async def dangling_volumes(self, label: str) -> list[str]:
        return []


async def test_reaper_skips_a_container_dockerd_cannot_remove() -> None:
    host, boot, pidns, pid, _ = owner_label().split(":")
    stuck, other = "a" * 64, "b" * 64
    containers = RefusingContainers(f"{host}:{boot}:{pidns}:{pid}:0", stuck, other)
    reaper = Reaper("crashed", "this-daemon", cast(Containers, containers))
    with capture_logs() as logs:
        assert await reaper.reap_orphans() == 1  # no exception: the stuck one is skipped
        assert await reaper.reap_orphans() == 0  # and tried again at the next sweep
    assert containers.removed == [other]
    warnings = [entry for entry in logs if entry["event"] == "orphans_not_removed"]
    assert [list(w["containers"]) for w in warnings] == [[stuck[:12]]]  # once, not per sweep
