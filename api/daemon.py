"""The composition root: builds pools and the API server in one AsyncExitStack.

Teardown runs in reverse: the server stops accepting and drains first, then
every pool destroys its sandboxes.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import uuid
from contextlib import AsyncExitStack
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

from api.server import ApiServer
from metrics import Metrics
from pool.backends import create_backend
from pool.config import Config
from pool.manager import Activity, Pool

log = structlog.get_logger("sandpool.daemon")

VERSION = "0.1.0"
WARM_TIMEOUT_S = 120.0  # listen anyway after this; /readyz says 503 until warm


def build_metrics() -> Metrics:
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return Metrics(registry)


async def serve(config: Config, *, instance_id: str | None = None) -> None:
    """Run the daemon until SIGTERM or SIGINT; a second signal skips the drain.

    Raises SandpoolError when a pool's backend cannot start (image missing,
    Docker unreachable) or the socket is taken.
    """
    instance_id = instance_id or uuid.uuid4().hex[:12]
    metrics = build_metrics()
    activity = Activity()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()

    def on_signal() -> None:
        if stop.is_set() and main_task is not None:
            log.warning("second_signal_forcing_exit")
            main_task.cancel()
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    try:
        async with AsyncExitStack() as stack:
            pools: dict[str, Pool[Any]] = {}
            for pool_config in config.pools:
                backend = create_backend(pool_config, instance_id)
                pool: Pool[Any] = Pool(pool_config, backend, metrics, activity)
                pools[pool.name] = await stack.enter_async_context(pool)
            metrics.watch_pools(lambda: [(p.name, p.counts(), p.waiters) for p in pools.values()])
            metrics.set_build_info(
                VERSION, {p.config.backend: p.backend.version() for p in pools.values()}
            )
            log.info("warming", instance=instance_id, pools=[repr(p) for p in pools.values()])
            await wait_warm(pools.values())
            await stack.enter_async_context(ApiServer(config, pools, metrics))
            log.info(
                "listening",
                socket=config.server.socket,
                metrics=config.server.metrics_address,
                instance=instance_id,
            )
            await stop.wait()
            log.info("stopping")
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    log.info("stopped")


async def wait_warm(pools: Any) -> None:
    waits = [asyncio.ensure_future(p.warmed.wait()) for p in pools]
    if not waits:
        return
    try:
        _, pending = await asyncio.wait(waits, timeout=WARM_TIMEOUT_S)
    finally:
        for task in waits:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*waits, return_exceptions=True)
    if pending:
        log.warning("pools_not_warm", waited_s=WARM_TIMEOUT_S)
