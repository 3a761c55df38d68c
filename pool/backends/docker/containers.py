"""One backend's connection to dockerd, and the container calls its lifecycle and reaper share.

Every call has a timeout (aiodocker's defaults never time out) and raises
BackendError for what dockerd refused or never answered.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import os
from typing import Any

import aiodocker
import aiohttp
from aiodocker.volumes import DockerVolume

from pool.backends.docker.engine import CALL_TIMEOUT_S, DOCKER_SOCKET_URL, describe
from pool.errors import BackendError


class Containers:
    """The Docker client of one backend, from ``connect()`` to ``close()``."""

    def __init__(self) -> None:
        self._docker: aiodocker.Docker | None = None

    @property
    def docker(self) -> aiodocker.Docker:
        """The connected client. Raises BackendError before ``connect()`` or after ``close()``."""
        if self._docker is None:
            raise BackendError("the Docker backend is not started")
        return self._docker

    @property
    def connected(self) -> bool:
        return self._docker is not None

    @property
    def url(self) -> str:
        """Where the engine is: ``DOCKER_HOST``, or Docker's own socket."""
        return os.environ.get("DOCKER_HOST") or DOCKER_SOCKET_URL

    def connect(self) -> aiodocker.Docker:
        """Make the client; it connects at its first call, so dockerd may still be down."""
        # An explicit URL: aiodocker's own discovery asserts when no socket exists
        # yet, and a daemon started before dockerd must wait for it, not crash.
        self._docker = aiodocker.Docker(url=self.url)
        return self._docker

    async def close(self) -> None:
        if self._docker is not None:
            await self._docker.close()
            self._docker = None

    async def list(self, label: str) -> list[Any]:
        """Every container, running or not, with ``label`` (``key`` or ``key=value``)."""
        async with asyncio.timeout(CALL_TIMEOUT_S):
            containers: list[Any] = await self.docker.containers.list(
                all=True, filters=json.dumps({"label": [label]})
            )
        return containers

    async def dangling_volumes(self, *labels: str) -> builtins.list[str]:
        """The names of volumes with every one of ``labels`` that no container,
        running or not, refers to."""
        async with asyncio.timeout(CALL_TIMEOUT_S):
            volumes: Any = self.docker.volumes  # aiodocker's volume calls are untyped
            listed = await volumes.list(
                filters={"label": builtins.list(labels), "dangling": ["true"]}
            )
        return [str(v["Name"]) for v in listed.get("Volumes") or []]

    async def remove_volume(self, name: str) -> None:
        """Remove a volume; one already gone, or in use again, is left as it is."""
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                volume: Any = DockerVolume(self.docker, name)  # type: ignore[no-untyped-call]
                await volume.delete()
        except aiodocker.DockerError as e:
            if e.status == 404 or e.status == 409:  # gone, or a container refers to it
                return
            raise BackendError(f"cannot remove volume {name}: {e.message}") from None
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise BackendError(f"cannot remove volume {name}: {describe(e)}") from None

    async def remove(self, name_or_id: str) -> None:
        """Force-remove a container; one that is already gone is fine."""
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                await self.docker.containers.container(name_or_id).delete(force=True, v=True)
        except aiodocker.DockerError as e:
            if e.status == 404 or e.status == 409:  # gone, or removal already in progress
                return
            raise BackendError(f"cannot remove container {name_or_id}: {e.message}") from None
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise BackendError(f"cannot remove container {name_or_id}: {describe(e)}") from None
