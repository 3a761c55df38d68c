"""The calls to dockerd that aiodocker has no public way to make, and its errors.

This is the only module of sandpool that touches aiodocker's private API
(``Docker._query_json``, ``Docker._query``, ``Stream``'s setup callable). Each
use says why the public call does not do: readiness probes must not cost
dockerd an ``/info``, an attach must not cost it an inspect, the event
stream must run in a task of ours, not one aiodocker starts, and aiodocker
has no container update. An aiodocker
upgrade that changes them breaks here and nowhere else.

Every Docker call has a timeout: aiodocker's defaults never time out.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import asynccontextmanager

import aiodocker
import aiohttp
from aiodocker.stream import Stream
from yarl import URL

CALL_TIMEOUT_S = 15.0  # one Docker API call: far above a normal create or start
PING_TIMEOUT_S = 2.0
EVENTS_CONNECT_TIMEOUT_S = 5.0
DOCKER_SOCKET_URL = "unix:///var/run/docker.sock"
DOCKER_ERRORS = (aiodocker.DockerError, aiohttp.ClientError, OSError, TimeoutError)


async def ping(docker: aiodocker.Docker) -> None:
    """GET /_ping. Raises one of DOCKER_ERRORS, or ValueError on a garbled answer.

    /_ping, not /info (``docker.system.info()``): readiness probes come often
    and /info costs dockerd CPU on every call. aiodocker has no public /_ping.
    """
    async with asyncio.timeout(PING_TIMEOUT_S):
        await docker._query_json("_ping", versioned_api=False)


async def set_cpu_shares(docker: aiodocker.Docker, container_id: str, shares: int) -> None:
    """POST /containers/{id}/update with CpuShares (v1 cpu.shares; Docker maps it to
    cpu.weight on v2). Raises one of DOCKER_ERRORS. aiodocker has no update call."""
    async with asyncio.timeout(CALL_TIMEOUT_S):
        await docker._query_json(
            f"containers/{container_id}/update", "POST",
            data=json.dumps({"CpuShares": shares}),
            headers={"Content-Type": "application/json"},
        )


def attach(docker: aiodocker.Docker, container_id: str) -> Stream:
    """The container's stdin/stdout/stderr, to be entered before the container starts.

    aiodocker's own ``DockerContainer.attach()`` first inspects the container
    to learn whether it has a TTY; ours never does, and the inspect would cost
    dockerd CPU on every start. So the stream is built from its setup callable,
    which ``Stream`` takes but does not document.
    """

    async def setup() -> tuple[URL, bytes | None, bool]:
        query: dict[str, str | int] = {
            "detachKeys": "", "logs": 0, "stdin": 1, "stdout": 1, "stderr": 1, "stream": 1,
        }
        return URL(f"containers/{container_id}/attach").with_query(query), None, False

    return Stream(docker, setup, aiohttp.ClientTimeout(connect=CALL_TIMEOUT_S))


@asynccontextmanager
async def event_lines(
    docker: aiodocker.Docker, filters: dict[str, list[str]]
) -> AsyncIterator[AsyncIterable[bytes]]:
    """The raw lines of GET /events with ``filters``, for as long as dockerd sends them.

    ``docker.events.subscribe()`` starts a task of its own that nothing of
    ours supervises, on one channel shared by every pool of the client; the
    raw request stays in the follower's task, which sees an outage and
    reconnects. No read timeout: an idle pool may see no event for hours.
    """
    async with docker._query(
        "events",
        method="GET",
        params={"filters": json.dumps(filters)},
        timeout=aiohttp.ClientTimeout(
            total=None, sock_read=None, connect=EVENTS_CONNECT_TIMEOUT_S
        ),
    ) as response, response:  # the inner `with` releases the stream
        yield response.content


def describe(error: BaseException) -> str:
    """One line for a log or an error message about a failed Docker call."""
    if isinstance(error, aiodocker.DockerError):
        return str(error.message)
    if isinstance(error, TimeoutError):
        return "Docker did not answer in time"
    return str(error) or type(error).__name__
