"""What one pool's backend lost track of, and what dead daemons left behind, removed.

Both are found by label (``definition.py``), so a container is found whatever
happened to the request or the daemon that made it. A container is removed
only when proven abandoned: untracked by this backend at two sweeps in a row,
or made by a daemon proven gone (``ownership.owner_alive``). A labelled volume
(a sandbox's devpts) is removed only when no container refers to it: dockerd
records the reference when it makes the volume for the container, so a
dangling one has lost its container for good.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

import structlog

from pool.backends.base import Sandbox
from pool.backends.docker.containers import Containers
from pool.backends.docker.definition import LABEL_INSTANCE, LABEL_OWNER, LABEL_POOL, labels_of
from pool.backends.docker.ownership import owner_alive
from pool.errors import BackendError

log = structlog.get_logger("sandpool.docker")

SandboxT = TypeVar("SandboxT", bound=Sandbox)


class Reaper:
    """The sweeps of one pool's backend; keeps what one sweep must remember for the next."""

    def __init__(self, pool_name: str, instance_id: str, containers: Containers) -> None:
        self.pool_name = pool_name
        self.instance_id = instance_id
        self.containers = containers
        self._leak_suspects: set[str] = set()  # untracked at the last sweep
        self._unremovable_logged: set[str] = set()  # orphans dockerd refused to remove

    async def reap_orphans(self) -> int:
        """Remove sandpool containers whose daemon is gone (crashed or SIGKILLed),
        and sandpool volumes whose container is gone.

        One that dockerd cannot remove (a root filesystem left busy by a dockerd
        restart stays so until reboot) is logged and skipped: it must not keep
        the others. Returns how many containers were removed; raises BackendError only
        when the containers or volumes cannot be listed.
        """
        reaped = 0
        unremovable: dict[str, str] = {}
        for info in await self.containers.list(LABEL_POOL):
            labels = labels_of(info)
            if labels.get(LABEL_INSTANCE) == self.instance_id or owner_alive(
                labels.get(LABEL_OWNER, "")
            ):
                continue
            try:
                await self.containers.remove(str(info["Id"]))
            except BackendError as e:
                unremovable[str(info["Id"])[:12]] = e.message
                continue
            reaped += 1
        volumes = await self.remove_dangling_volumes(LABEL_POOL, unremovable=unremovable)
        if reaped or volumes:
            log.info("reaped_orphans", pool=self.pool_name, containers=reaped, volumes=volumes)
        if unremovable and unremovable.keys() != self._unremovable_logged:
            # Once per set, not at every sweep: dockerd says the same each time.
            log.warning("orphans_not_removed", pool=self.pool_name, containers=unremovable)
        self._unremovable_logged = set(unremovable)
        return reaped

    async def remove_dangling_volumes(
        self, *labels: str, unremovable: dict[str, str] | None = None
    ) -> int:
        """Remove the volumes with ``labels`` whose container is gone; how many.

        A sandbox's devpts volume can outlive its container: across a dockerd
        restart the container goes and its volume stays, dangling (seen with
        Docker 20.10 when the daemon's removal meets the engine's shutdown). One
        dockerd refuses to remove goes into ``unremovable`` (name: why).
        Raises BackendError only when the volumes cannot be listed.
        """
        removed = 0
        for name in await self.containers.dangling_volumes(*labels):
            try:
                await self.containers.remove_volume(name)
            except BackendError as e:
                if unremovable is not None:
                    unremovable[name[:12]] = e.message
                continue
            removed += 1
        return removed

    async def sweep(
        self,
        tracked: Mapping[str, SandboxT],
        creating: set[str],
        report_died: Callable[[SandboxT], None],
    ) -> None:
        """Remove this pool's containers the backend does not track; report dead idle ones.

        ``tracked`` maps container ids to the backend's sandboxes, ``creating``
        holds the names of containers being made (not tracked yet, not leaked).
        Raises BackendError when the containers cannot be listed.
        """
        untracked: set[str] = set()
        for info in await self.containers.list(f"{LABEL_INSTANCE}={self.instance_id}"):
            if labels_of(info).get(LABEL_POOL) != self.pool_name:
                continue
            container_id = str(info["Id"])
            names = [n.lstrip("/") for n in info["Names"] or []]
            sandbox = tracked.get(container_id)
            if sandbox is None and not creating.intersection(names):
                # The listing is a snapshot: a container being destroyed right now
                # looks untracked too. Only one untracked in two sweeps is a leak.
                untracked.add(container_id)
                if container_id in self._leak_suspects:
                    log.warning("leaked_container_removed", pool=self.pool_name,
                                container=container_id[:12])
                    await self.containers.remove(container_id)
            elif sandbox is not None and info["State"] != "running" and sandbox.alive:
                report_died(sandbox)
        self._leak_suspects = untracked
