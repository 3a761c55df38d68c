"""dockerd's events for one pool's containers, and the oom verdicts they carry.

The runner reports a SIGKILLed child (137) before dockerd's oom event may have
reached the daemon, so a run that ends that way waits a short grace for the
event (``OomEvents.reported``) before it says "not OOM".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

import aiodocker
import structlog

from pool.backends.docker.definition import LABEL_INSTANCE, LABEL_POOL
from pool.backends.docker.engine import DOCKER_ERRORS, describe, event_lines

log = structlog.get_logger("sandpool.docker")

OOM_EVENT_GRACE_S = 0.25
EVENTS_RETRY_S = 1.0


class OomEvents:
    """Per container: set once dockerd (or the container's state) says it was OOM-killed."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}  # container id -> set on its oom event

    def event(self, container_id: str) -> asyncio.Event:
        return self._events.setdefault(container_id, asyncio.Event())

    async def reported(self, container_id: str, *, wait: bool) -> bool:
        """Whether the container was OOM-killed; with ``wait``, give the event its grace first."""
        event = self.event(container_id)
        if event.is_set() or not wait:
            return event.is_set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(OOM_EVENT_GRACE_S):
                await event.wait()
        return event.is_set()

    def forget(self, container_id: str) -> None:
        self._events.pop(container_id, None)


async def follow_events(
    docker: aiodocker.Docker,
    pool_name: str,
    instance_id: str,
    on_event: Callable[[dict[str, Any]], None],
) -> None:
    """Call ``on_event`` for each oom and die event of the pool's containers; runs until cancelled.

    Reconnects after an outage, every EVENTS_RETRY_S.
    """
    filters = {
        "type": ["container"],
        "event": ["oom", "die"],
        "label": [f"{LABEL_INSTANCE}={instance_id}", f"{LABEL_POOL}={pool_name}"],
    }
    while True:
        try:
            async with event_lines(docker, filters) as lines:
                async for line in lines:
                    if line.strip():
                        on_event(json.loads(line))
        except (*DOCKER_ERRORS, ValueError) as e:
            log.debug("docker_events_reconnect", pool=pool_name, error=describe(e))
        await asyncio.sleep(EVENTS_RETRY_S)
