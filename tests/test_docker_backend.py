"""The Docker backend's own bookkeeping against real dockerd: reaper and leak sweep."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import AsyncIterator

import pytest

from pool.backends.docker import (
    LABEL_INSTANCE,
    LABEL_OWNER,
    LABEL_POOL,
    DockerBackend,
    owner_label,
)
from pool.config import PoolConfig
from pool.errors import BackendError
from tests.support import docker_containers


def docker(*args: str) -> None:
    # Synchronous on purpose: the test's own loop has nothing else to do meanwhile.
    subprocess.run(["docker", *args], check=True, capture_output=True, timeout=60)


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
            docker("rm", "-f", *leftovers)
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
        docker("rm", "-f", *alive)


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


async def test_sweep_marks_a_dead_idle_sandbox(backend: DockerBackend) -> None:
    sandbox = await backend.start_sandbox()
    died: list[str] = []
    backend.listener = lambda s, event: died.append(event)
    docker("kill", sandbox.container_id)
    await backend.sweep()
    assert sandbox.alive is False
    assert "died" in died
    await backend.destroy_sandbox(sandbox)


async def test_reaper_skips_a_container_dockerd_cannot_remove(
    backend: DockerBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    host, boot, pidns, pid, _ = owner_label().split(":")
    dead_owner = f"{host}:{boot}:{pidns}:{pid}:0"
    stuck = stray_container(backend.config.name, "crashed-stuck", dead_owner)
    other = stray_container(backend.config.name, "crashed-other", dead_owner)
    remove = backend._containers.remove

    async def refuse_stuck(name_or_id: str) -> None:
        # What dockerd answers for a root filesystem a restart left mounted.
        if name_or_id.startswith(stuck):
            raise BackendError(f"cannot remove container {name_or_id}: device or resource busy")
        await remove(name_or_id)

    monkeypatch.setattr(backend._containers, "remove", refuse_stuck)
    try:
        await backend.reap_orphans()  # no exception: the stuck one is skipped
        remaining = set(docker_containers(f"{LABEL_POOL}={backend.config.name}"))
        assert other not in remaining
        assert stuck in remaining
    finally:
        docker("rm", "-f", stuck)
