"""Pool logic against the fake backend: queueing, cancellation, backoff, limits."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from metrics import Metrics
from pool.autosize import HOLD_S
from pool.backends.base import RunRequest
from pool.backends.fake import FakeBackend
from pool.config import PoolConfig
from pool.errors import SandboxLostError, UnavailableError
from pool.manager import QUIET_HORIZON_S, QUIET_WAIT_MAX_S, Activity, Pool

PoolFactory = Callable[..., Any]


def request(code: str = "hello", timeout_s: float = 5.0) -> RunRequest:
    return RunRequest(code=code, stdin="", timeout_s=timeout_s)


@asynccontextmanager
async def make_pool(**overrides: Any) -> AsyncIterator[tuple[Pool[Any], FakeBackend]]:
    start_delay_s = overrides.pop("start_delay_s", 0.0)
    activity = overrides.pop("activity", None)
    clock = overrides.pop("clock", time.monotonic)
    config = dataclasses.replace(
        PoolConfig(name="t", backend="fake", min_idle=2, max_size=4, acquire_timeout_s=2.0),
        **overrides,
    )
    backend = FakeBackend(config, "test")
    backend.start_delay_s = start_delay_s
    pool: Pool[Any] = Pool(config, backend, Metrics(CollectorRegistry()), activity, clock)
    await pool.start()
    try:
        yield pool, backend
    finally:
        await pool.close()
        # Every sandbox the pool started was destroyed: nothing leaks.
        assert backend.live == {}
        assert sorted(backend.started) == sorted(backend.destroyed)


async def settle(pool: Pool[Any], **expected: int) -> None:
    async with asyncio.timeout(5):
        while any(pool.counts()[k] != v for k, v in expected.items()):
            await asyncio.sleep(0.005)


async def test_warms_to_min_idle_and_reports_counts() -> None:
    async with make_pool() as (pool, _):
        await asyncio.wait_for(pool.warmed.wait(), 5)
        await settle(pool, idle=2, starting=0)
        assert repr(pool) == "<Pool t idle=2 busy=0 leased=0 starting=0 destroying=0 waiters=0>"


async def test_each_request_gets_a_fresh_sandbox_that_is_destroyed() -> None:
    async with make_pool() as (pool, backend):
        await pool.warmed.wait()
        ids = [(await pool.run(request())).sandbox_id for _ in range(6)]
        assert len(set(ids)) == 6
        await settle(pool, idle=2, busy=0, destroying=0)
        assert set(ids) <= set(backend.destroyed)


async def test_handout_from_idle_does_not_wait() -> None:
    async with make_pool(start_delay_s=0.2) as (pool, _):
        await pool.warmed.wait()
        run = await pool.run(request())
        # The sandbox was idle: the wait is the in-memory hand-out, far below a start.
        assert run.acquire_wait_s < 0.05
        assert run.result.stdout == b"hello"


async def test_never_exceeds_max_size_and_answers_every_request() -> None:
    async with make_pool(start_delay_s=0.01) as (pool, _):
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, pool.total)
                await asyncio.sleep(0)

        watcher = asyncio.create_task(watch())
        runs = await asyncio.gather(*(pool.run(request("sleep 0.02")) for _ in range(16)))
        watcher.cancel()
        assert len({r.sandbox_id for r in runs}) == 16
        assert all(r.result.exit_code == 0 for r in runs)
        assert 0 < peak <= 4


async def test_waiters_are_served_in_fifo_order() -> None:
    async with make_pool(min_idle=0, max_size=1, start_delay_s=0.01) as (pool, _):
        order: list[int] = []

        async def one(i: int) -> None:
            await pool.run(request("sleep 0.01"))
            order.append(i)

        tasks = []
        for i in range(5):
            tasks.append(asyncio.create_task(one(i)))
            await asyncio.sleep(0.001)  # enqueue in a known order
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2, 3, 4]


async def test_full_queue_is_rejected_with_retry_after() -> None:
    async with make_pool(min_idle=0, max_size=1, max_queue=2, start_delay_s=0.05) as (pool, _):
        blockers = [asyncio.create_task(pool.run(request("sleep 0.1"))) for _ in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(UnavailableError) as caught:
            await pool.run(request())
        assert caught.value.code == "pool_exhausted"
        assert caught.value.retry_after_s >= 1
        await asyncio.gather(*blockers)


async def test_acquire_timeout() -> None:
    async with make_pool(min_idle=0, max_size=1, acquire_timeout_s=0.1) as (pool, _):
        blocker = asyncio.create_task(pool.run(request("sleep 0.5")))
        await asyncio.sleep(0.02)
        with pytest.raises(UnavailableError) as caught:
            await pool.run(request())
        assert caught.value.code == "acquire_timeout"
        await blocker
        assert pool.waiters == 0


async def test_cancelled_run_destroys_its_sandbox() -> None:
    async with make_pool() as (pool, backend):
        await pool.warmed.wait()
        task = asyncio.create_task(pool.run(request("hang", timeout_s=30)))
        await settle(pool, busy=1)
        busy_id = backend.started[0]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await settle(pool, busy=0, destroying=0, idle=2)
        assert busy_id in backend.destroyed


async def test_cancelled_waiter_leaves_the_queue() -> None:
    async with make_pool(min_idle=0, max_size=1) as (pool, _):
        blocker = asyncio.create_task(pool.run(request("sleep 0.2")))
        await asyncio.sleep(0.01)
        waiter = asyncio.create_task(pool.run(request()))
        await asyncio.sleep(0.01)
        assert pool.waiters == 1
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert pool.waiters == 0
        await blocker


async def test_the_backend_hears_when_requests_start_and_stop_waiting() -> None:
    """A busy pool's refill waits for CPU until a request waits for it (process/cpu.py)."""
    async with make_pool(min_idle=0, max_size=1, acquire_timeout_s=0.1) as (pool, backend):
        blocker = asyncio.create_task(pool.run(request("sleep 0.3")))
        await settle(pool, busy=1)
        assert backend.waiting_told == [True, False]  # the first request waited for its start
        with pytest.raises(UnavailableError):  # waits, then gives up: told both, once each
            await pool.run(request())
        assert backend.waiting_told == [True, False, True, False]
        await blocker
        await pool.run(request())
        assert backend.waiting_told == [True, False] * 3


async def test_a_timed_out_sandbox_is_destroyed_never_handed_out_again() -> None:
    # The verdict itself comes from each backend's clock (tests/test_behaviour.py runs
    # that against the real engines); what the pool owes a timed-out run is that its
    # sandbox, in whatever state the code left it, serves nobody after it.
    async with make_pool(min_idle=1, max_size=1) as (pool, backend):
        timed_out = await pool.run(request("hang", timeout_s=0.05))
        assert timed_out.result.timed_out
        await settle(pool, idle=1, starting=0, destroying=0)
        assert timed_out.sandbox_id in backend.destroyed
        after = [await pool.run(request()) for _ in range(3)]
    assert [run.result.stdout for run in after] == [b"hello"] * 3
    ids = [timed_out.sandbox_id] + [run.sandbox_id for run in after]
    assert len(set(ids)) == len(ids), ids


async def test_backoff_after_repeated_start_failures() -> None:
    async with make_pool(min_idle=1) as (pool, backend):
        await settle(pool, idle=1)
        backend.down = True
        backend.kill_idle(pool._idle[0])
        await asyncio.sleep(1.8)
        # Exponential backoff (0.5 s, 1 s, then 2 s): three attempts so far, not more.
        assert pool._consecutive_failures == 3
        with pytest.raises(UnavailableError) as caught:
            await pool.run(request())
        assert caught.value.code == "backend_unavailable"
        backend.down = False
        await settle(pool, idle=1)
        assert (await pool.run(request())).result.exit_code == 0


async def test_repeated_failures_fail_queued_requests_fast() -> None:
    async with make_pool(min_idle=0, acquire_timeout_s=30) as (pool, backend):
        backend.failing_starts = 3
        with pytest.raises(UnavailableError) as caught:
            async with asyncio.timeout(5):  # far below acquire_timeout_s
                await pool.run(request())
        assert caught.value.code == "backend_unavailable"


async def test_sandbox_that_died_idle_is_replaced_not_handed_out() -> None:
    async with make_pool() as (pool, backend):
        await pool.warmed.wait()
        await settle(pool, idle=2)
        dead = pool._idle[0]
        backend.kill_idle(dead)
        run = await pool.run(request())
        assert run.sandbox_id != dead.id
        await settle(pool, destroying=0)
        assert dead.id in backend.destroyed
        await settle(pool, idle=2)


async def test_sandbox_lost_at_handout_is_retried_transparently() -> None:
    async with make_pool() as (pool, _):
        await pool.warmed.wait()
        await settle(pool, idle=2)
        pool._idle[0].mark_dead()  # died, and no event told the pool yet
        run = await pool.run(request())
        assert run.result.stdout == b"hello"


async def test_close_destroys_idle_and_cancels_starts() -> None:
    async with make_pool(start_delay_s=0.3) as (pool, backend):
        await asyncio.sleep(0.01)
        assert pool.counts()["starting"] == 2
    assert backend.live == {}


async def test_lost_error_after_retries_surfaces() -> None:
    async with make_pool(min_idle=1) as (pool, backend):
        await pool.warmed.wait()

        original = backend.run

        async def always_lost(sandbox: Any, req: RunRequest) -> Any:
            raise SandboxLostError("gone")

        backend.run = always_lost  # type: ignore[method-assign]
        with pytest.raises(SandboxLostError):
            await pool.run(request())
        backend.run = original  # type: ignore[method-assign]


async def test_refill_waits_until_the_run_in_flight_has_ended() -> None:
    # min_idle 2 with one idle sandbox left: the refill is not urgent, so it
    # waits for the quiet moment instead of competing with the run for CPU.
    async with make_pool() as (pool, backend):
        await settle(pool, idle=2, starting=0)
        run = asyncio.create_task(pool.run(request("sleep 0.3")))
        await asyncio.sleep(0.15)
        assert len(backend.started) == 2  # the refill has not begun during the run
        await run
        await settle(pool, idle=2, starting=0, destroying=0)
        assert len(backend.started) == 3


async def test_a_run_older_than_the_horizon_no_longer_holds_refills() -> None:
    # A neighbour's long run is always in flight on a busy daemon: were it to
    # hold refills for QUIET_WAIT_MAX_S, short pools would run dry.
    async with make_pool() as (pool, backend):
        await settle(pool, idle=2, starting=0)
        run = asyncio.create_task(pool.run(request(f"sleep {QUIET_WAIT_MAX_S * 0.8}")))
        await asyncio.sleep(QUIET_HORIZON_S / 2)
        assert len(backend.started) == 2  # young: the refill waits
        await settle(pool, idle=2, starting=0)  # within settle's timeout, before the run ends
        assert len(backend.started) == 3
        assert not run.done()
        await run


async def test_a_refill_waiting_for_quiet_begins_once_its_pool_runs_dry() -> None:
    async with make_pool() as (pool, backend):
        await settle(pool, idle=2, starting=0)
        first = asyncio.create_task(pool.run(request("sleep 0.2")))
        await asyncio.sleep(0.02)
        assert len(backend.started) == 2  # one idle left: the refill waits for quiet
        second = asyncio.create_task(pool.run(request("sleep 0.2")))
        await asyncio.sleep(0.05)
        # The pool is dry with both runs young: every refill has begun anyway.
        assert len(backend.started) == 4
        assert not first.done()
        assert not second.done()
        await asyncio.gather(first, second)


async def test_destroy_waits_briefly_for_quiet_but_not_for_long() -> None:
    async with make_pool(min_idle=1) as (pool, backend):
        await settle(pool, idle=1, starting=0)
        first = await pool.run(request())
        # Another run keeps the pool busy: the used sandbox is destroyed anyway,
        # after at most DESTROY_QUIET_WAIT_MAX_S.
        busy = asyncio.create_task(pool.run(request("sleep 0.5")))
        await settle(pool, destroying=0)
        assert first.sandbox_id in backend.destroyed
        assert not busy.done()
        await busy


# --- the idle target ---------------------------------------------------------


class FakeClock:
    """The pool's clock for arrivals and reviews of its idle target; refills keep real time."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sample(pool: Pool[Any], name: str, **labels: str) -> float | None:
    return pool.metrics.registry.get_sample_value(name, {"pool": pool.name, **labels})


async def burst(pool: Pool[Any], arrivals: int) -> list[asyncio.Task[Any]]:
    """``arrivals`` requests at one instant of the fake clock, left waiting or running."""
    runs = [asyncio.create_task(pool.run(request("hang", timeout_s=30))) for _ in range(arrivals)]
    await asyncio.sleep(0)  # each has arrived and taken or queued for a sandbox
    return runs


async def cancel(runs: list[asyncio.Task[Any]]) -> None:
    for run in runs:
        run.cancel()
    await asyncio.gather(*runs, return_exceptions=True)


async def test_a_refill_begins_at_once_when_demand_would_drain_the_pool_during_a_start() -> None:
    clock = FakeClock()
    # Starts take 0.5 s; 12 arrivals at one instant estimate 2.4 per second:
    # 2.4 x 0.5 x 1.5 = 1.8 arrivals while one starts, so one idle sandbox is short
    # and two are not.
    async with make_pool(min_idle=2, max_size=4, start_delay_s=0.5, clock=clock) as (
        pool, backend
    ):
        await settle(pool, idle=2, starting=0)
        await cancel(await burst(pool, 12))
        await settle(pool, idle=2, starting=0)
        begun = backend.begun
        run = asyncio.create_task(pool.run(request("sleep 0.3")))
        await asyncio.sleep(0.05)
        # One idle left and the run young: the refill began without waiting for quiet.
        assert backend.begun == begun + 1
        await run


async def test_a_burst_raises_the_idle_target_within_max_idle_then_idleness_decays_it() -> None:
    clock = FakeClock()
    # Refills take at least 0.2 s; 50 arrivals at once estimate 10 per second,
    # so Little's law asks for at least 10 x 0.2 x 1.5 = 3, and max_idle caps it at 3.
    async with make_pool(
        min_idle=1, max_idle=3, max_size=8, start_delay_s=0.2, clock=clock
    ) as (pool, _):
        await settle(pool, idle=1, starting=0)
        assert pool.idle_target == 1
        assert sample(pool, "sandpool_idle_target") == 1
        runs = await burst(pool, 50)
        assert pool.idle_target == 3
        assert sample(pool, "sandpool_idle_target") == 3
        await cancel(runs)
        # One request found the warm sandbox; the other 49 had to wait.
        assert sample(pool, "sandpool_acquisitions_total", result="hit") == 1
        assert sample(pool, "sandpool_acquisitions_total", result="miss") == 49
        await settle(pool, idle=3, starting=0, busy=0)
        assert pool._review_timer is not None  # the pool reviews the target on its own
        # The review timer's callback, run by hand at the fake clock's times:
        # through the window that saw the burst the target holds ...
        clock.now += HOLD_S
        pool._review_due()
        assert pool.idle_target == 3
        # ... and after a window without a request it is back at min_idle, and so is the pool.
        clock.now += HOLD_S
        pool._review_due()
        assert pool.idle_target == 1
        assert pool._review_timer is None
        await settle(pool, idle=1, destroying=0)
        assert sample(pool, "sandpool_idle_target") == 1


async def test_the_idle_memory_budget_caps_the_pools_together() -> None:
    clock = FakeClock()
    # 512 MiB for idle sandboxes of 128 MiB: four in all, whatever each pool
    # wants, of which the two floors hold two.
    activity = Activity(idle_memory_mb=512)
    shape: dict[str, Any] = {
        "min_idle": 1, "max_idle": 4, "max_size": 8, "memory_mb": 128, "start_delay_s": 0.2,
        "clock": clock, "activity": activity,
    }
    async with make_pool(name="a", **shape) as (a, _), make_pool(name="b", **shape) as (b, _):
        await settle(a, idle=1, starting=0)
        await settle(b, idle=1, starting=0)
        first = await burst(a, 50)
        assert (a.idle_target, b.idle_target) == (3, 1)
        await cancel(first)
        await settle(a, idle=3, starting=0, busy=0)
        second = await burst(b, 50)
        # b's demand takes half of the room: a gives back what no longer fits.
        assert (a.idle_target, b.idle_target) == (2, 2)
        await cancel(second)
        await settle(a, idle=2, starting=0, destroying=0)
        await settle(b, idle=2, starting=0, busy=0)
        assert (a.idle_target + b.idle_target) * 128 <= 512
    assert activity.idle_budget.memory_mb == 512


async def test_without_max_idle_the_idle_target_is_min_idle_whatever_the_demand() -> None:
    clock = FakeClock()
    async with make_pool(min_idle=2, max_size=8, start_delay_s=0.2, clock=clock) as (pool, _):
        await settle(pool, idle=2, starting=0)
        runs = await burst(pool, 50)
        assert pool.idle_target == 2
        assert pool._review_timer is None
        await cancel(runs)
        clock.now += 10 * HOLD_S
        await settle(pool, starting=0, busy=0, destroying=0)
        assert pool.idle_target == 2
        assert sample(pool, "sandpool_idle_target") == 2


async def test_hits_and_misses_are_counted_per_request() -> None:
    async with make_pool(min_idle=1, max_size=2) as (pool, _):
        await settle(pool, idle=1, starting=0)
        await pool.run(request())
        await settle(pool, idle=1, starting=0)
        await pool.run(request())
        assert sample(pool, "sandpool_acquisitions_total", result="hit") == 2
    async with make_pool(min_idle=0, max_size=1) as (pool, _):
        await pool.run(request())
        assert sample(pool, "sandpool_acquisitions_total", result="hit") == 0
        assert sample(pool, "sandpool_acquisitions_total", result="miss") == 1


async def test_a_failing_backend_is_down_with_its_last_error_until_a_start_succeeds() -> None:
    async with make_pool(min_idle=1) as (pool, backend):
        await settle(pool, idle=1)
        registry = pool.metrics.registry
        assert registry.get_sample_value("sandpool_backend_up", {"pool": "t"}) == 1
        backend.down = True
        backend.kill_idle(pool._idle[0])
        async with asyncio.timeout(5):
            while registry.get_sample_value("sandpool_backend_up", {"pool": "t"}) != 0:
                await asyncio.sleep(0.01)
        assert pool.problem() == "its backend is failing: fake start failure"
        assert pool.not_ready_reason() == pool.problem()
        with pytest.raises(UnavailableError, match="fake start failure"):
            await pool.run(request())
        backend.down = False
        await settle(pool, idle=1)
        assert registry.get_sample_value("sandpool_backend_up", {"pool": "t"}) == 1
        assert pool.problem() is None
