"""The composition root: builds pools and the API server in one AsyncExitStack.

Teardown runs in reverse: the server stops accepting and drains first, then
every pool destroys its sandboxes. systemd hears READY=1 only once every pool
is warm and the socket listens, then STATUS= lines and watchdog pings from the
event loop (a stuck loop stops them, and systemd restarts the service).
"""

from __future__ import annotations

import asyncio
import gc
import resource
import signal
import uuid
from collections.abc import Iterable
from contextlib import AsyncExitStack

import structlog
from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)

from api.connections import ThrottledLog, loop_exception_handler
from api.notify import Notifier, watchdog_interval_s
from api.remote import open_remote
from api.server import ApiServer, bind_remote, bind_sockets
from metrics import Metrics
from pool.backends import create_pool
from pool.config import Config, default_pools
from pool.daemon_cpu import DAEMON_WEIGHT, lower_daemon, raise_daemon
from pool.manager import Activity, PoolHandle
from pool.quotas import Holders
from pool.sessions import Sessions
from pool.uids import SandboxUids

log = structlog.get_logger("sandpool.daemon")

VERSION = "0.1.0"
WARM_TIMEOUT_S = 120.0  # listen anyway after this; /readyz says 503 until warm
STATUS_INTERVAL_S = 10.0


def build_metrics() -> Metrics:
    # A *_created series per counter and histogram child doubles what a scrape
    # carries and no rule or panel reads it (process-wide setting).
    disable_created_metrics()  # type: ignore[no-untyped-call]  # unannotated upstream
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return Metrics(registry)


def status_line(pools: Iterable[PoolHandle]) -> str:
    parts = []
    for pool in pools:
        counts = pool.counts()
        parts.append(f"{pool.name}: {counts['idle']} idle, {counts['busy']} busy")
    return "; ".join(parts)


async def heartbeat(notifier: Notifier, pools: Iterable[PoolHandle]) -> None:
    """Watchdog pings at half of WatchdogSec, and a STATUS= line every 10 s."""
    interval_s = watchdog_interval_s()
    period_s = min(interval_s, STATUS_INTERVAL_S) if interval_s else STATUS_INTERVAL_S
    loop = asyncio.get_running_loop()
    next_status = 0.0
    while True:
        fields = ["WATCHDOG=1"] if interval_s else []
        if loop.time() >= next_status:
            fields.append(f"STATUS={status_line(pools)}")
            next_status = loop.time() + STATUS_INTERVAL_S
        notifier.notify(*fields)
        await asyncio.sleep(period_s)


async def serve(config: Config, *, instance_id: str | None = None) -> None:
    """Run the daemon until SIGTERM or SIGINT; a second signal skips the drain.

    Raises SandpoolError when a pool's backend cannot start (image missing) or
    the socket or the metrics address is taken (found before any pool warms).
    """
    instance_id = instance_id or uuid.uuid4().hex[:12]
    warn_if_default_pools_dropped(config)
    raise_fd_limit()
    metrics = build_metrics()
    activity = Activity(idle_memory_mb=config.server.idle_memory_mb)
    stop, force_exit = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    notifier = Notifier()

    def on_signal() -> None:
        if stop.is_set():
            log.warning("second_signal_skipping_drain")
            force_exit.set()
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    # asyncio's default handler writes a traceback for every failed accept()
    # (once a second per listener while descriptors are short): this one writes
    # a line per kind of error per 10 s.
    loop.set_exception_handler(loop_exception_handler(ThrottledLog()))
    try:
        async with AsyncExitStack() as stack:
            # The TCP listener's certificate, key and tokens load before any pool starts.
            remote = open_remote(config)
            bound = bind_sockets(config.server)
            stack.callback(bound.close)
            if remote is not None:
                stack.callback(remote.close)
                bind_remote(remote)
            # Before the pools, so that they start beside the daemon's cgroup, and
            # lowered after they have closed (the stack unwinds in reverse).
            serves_wasm = any(p.backend == "wasm" for p in config.pools)
            unchanged = await asyncio.to_thread(raise_daemon, serves_wasm=serves_wasm)
            if unchanged:
                log.info("daemon_cpu_unchanged", reason=unchanged)
            else:
                log.info("daemon_cpu_raised", weight=DAEMON_WEIGHT)
            stack.push_async_callback(asyncio.to_thread, lower_daemon)
            pools: dict[str, PoolHandle] = {}
            uids = SandboxUids(config.server.sandbox_uid_base, config.server.sandbox_uid_count)
            holders = Holders.of(config.pools)
            for pool_config in config.pools:
                pool = create_pool(pool_config, instance_id, uids, holders, metrics, activity)
                pools[pool.name] = await stack.enter_async_context(pool)
            # Closed before the pools (the stack unwinds in reverse): every session's
            # sandbox is destroyed while its pool still runs; after the server's drain.
            sessions = Sessions(pools, config.server, metrics)
            stack.callback(sessions.close)
            metrics.watch_pools(lambda: [(p.name, p.counts(), p.waiters) for p in pools.values()])
            metrics.set_build_info(
                VERSION, {p.config.backend: p.backend_version() for p in pools.values()}
            )
            log.info("warming", instance=instance_id, pools=[repr(p) for p in pools.values()])
            await wait_warm(pools.values(), stop)
            if stop.is_set():
                return
            await stack.enter_async_context(ApiServer(config, pools, metrics, force_exit, bound,
                                                     remote, sessions))
            log.info(
                "listening",
                socket=config.server.socket,
                metrics=config.server.metrics_address,
                listen=config.server.listen,
                instance=instance_id,
            )
            # What start-up allocated (~50k objects) lives as long as the daemon:
            # frozen, a full collection no longer walks it (28 ms here, on
            # whichever request happens to trigger it).
            gc.collect()
            gc.freeze()
            notifier.notify("READY=1", f"STATUS={status_line(pools.values())}")
            async with asyncio.TaskGroup() as tasks:
                beating = tasks.create_task(heartbeat(notifier, pools.values()))
                await stop.wait()
                beating.cancel()
            log.info("stopping")
            notifier.notify("STOPPING=1")
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        loop.set_exception_handler(None)
        notifier.close()
    log.info("stopped")


def warn_if_default_pools_dropped(config: Config) -> None:
    """A config file's pools replace the default ones: say which defaults are not served."""
    served = {pool.name for pool in config.pools}
    dropped = [pool.name for pool in default_pools() if pool.name not in served]
    if dropped:
        log.warning("default_pools_replaced", not_served=dropped,
                    hint="the config file's [pools.NAME] tables replace the default pools; "
                    "add a table for each one to keep")


def raise_fd_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit: every fd the daemon may use is budgeted
    (wasm pools check theirs against the soft limit when they start)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log.info("fd_limit_raised", soft=soft, now=hard)


async def wait_warm(pools: Iterable[PoolHandle], stop: asyncio.Event) -> None:
    """Wait until every pool reached min_idle, a stop signal, or WARM_TIMEOUT_S."""
    waits = [asyncio.ensure_future(p.warmed.wait()) for p in pools]
    stopping = asyncio.ensure_future(stop.wait())
    try:
        async with asyncio.timeout(WARM_TIMEOUT_S):
            await asyncio.wait([asyncio.ensure_future(asyncio.wait(waits)), stopping],
                               return_when=asyncio.FIRST_COMPLETED)
    except TimeoutError:
        log.warning("pools_not_warm", waited_s=WARM_TIMEOUT_S)
    finally:
        for task in (*waits, stopping):
            task.cancel()
        await asyncio.gather(*waits, stopping, return_exceptions=True)
