"""The pool manager: warm, single-use sandboxes handed out in memory.

State changes happen in plain synchronous methods and I/O happens afterwards in
tasks the pool owns (httpcore's ``_assign_requests_to_connections``): on one
event loop that keeps the counts consistent without locks. The pool knows
nothing of Docker; it talks to a ``Backend``.

One concept, kept in one module past the usual size: every change of a pool's
counts is here, where the invariants between them can be read together. The
arithmetic of demand-driven sizing lives apart, in ``pool/autosize.py``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Generic, Protocol

import structlog

from metrics import Metrics
from pool.autosize import DemandSizer, IdleBudget
from pool.backends.base import Backend, RunRequest, RunResult, Sandbox, SandboxEvent, SandboxT
from pool.backends.runtime import Runtime
from pool.config import PoolConfig
from pool.errors import BackendError, SandboxLostError, UnavailableError

log = structlog.get_logger("sandpool.pool")

HANDOUT_ATTEMPTS = 3  # a sandbox that died parked is replaced transparently, this often
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
# After this many starts in a row failed, the backend counts as down: requests
# that would wait for a start fail fast with 503 instead. One failure (a
# container killed while starting) only delays the next start.
FAILING_AFTER = 3
# Refills wait for a moment with no request in flight, at most this long: on 2
# cores a container start beside a hand-out raises its latency several-fold.
# They stop waiting as soon as their pool runs dry or has a request queued.
QUIET_WAIT_MAX_S = 1.0
# Only a request younger than this holds refills back. A start's CPU barely
# moves the latency of one that has run longer, and neighbours' long runs,
# always in flight, would otherwise hold every refill of every pool for the
# whole QUIET_WAIT_MAX_S and run the short pools dry (docs/autosize.md).
QUIET_HORIZON_S = 0.25
# Destroys wait for it too, but only this long: a used sandbox must not linger.
DESTROY_QUIET_WAIT_MAX_S = 0.02
# The quiet moment starts this long after the last run ends: its response has
# still to be written and read, and a spawn or a kill started at once takes the
# CPU for that (a Docker delete is ~20 ms of dockerd CPU); docs/performance.md
# has what the pause was measured to save.
SETTLE_S = 0.002


class InFlight:
    """One request counted by ``Activity`` from ``begin`` to ``end``."""

    __slots__ = ("timer", "young")

    def __init__(self) -> None:
        self.young = True  # began less than QUIET_HORIZON_S ago and has not ended
        self.timer: asyncio.TimerHandle | None = None


class Activity:
    """What the pools of one daemon share.

    It counts requests in flight across all pools so refills can wait for a
    quiet moment, and holds the idle memory budget (``server.idle_memory_mb``;
    None: no budget) that the pools' demand-driven idle targets share.

    Invariant: ``young`` is the number of requests begun less than
    QUIET_HORIZON_S ago and not ended; the quiet event is set only while it is
    0 (SETTLE_S after it became 0).
    """

    def __init__(self, idle_memory_mb: int | None = None) -> None:
        self.idle_budget = IdleBudget(idle_memory_mb)
        self.young = 0
        self._quiet = asyncio.Event()
        self._quiet.set()

    def begin(self) -> InFlight:
        """Count a request in flight; pass what it returns to ``end``."""
        self.young += 1
        self._quiet.clear()
        run = InFlight()
        run.timer = asyncio.get_running_loop().call_later(QUIET_HORIZON_S, self._grown, run)
        return run

    def end(self, run: InFlight) -> None:
        if run.timer is not None:
            run.timer.cancel()
        self._grown(run)

    def _grown(self, run: InFlight) -> None:
        """The request has ended or aged past the horizon: it no longer holds refills."""
        if not run.young:
            return
        run.young = False
        self.young -= 1
        if self.young == 0:
            asyncio.get_running_loop().call_later(SETTLE_S, self._settled)

    def _settled(self) -> None:
        if self.young == 0:
            self._quiet.set()

    async def wait_quiet(self, max_wait_s: float, hurry: asyncio.Event | None = None) -> None:
        """Until no young request is in flight, ``hurry`` is set, or ``max_wait_s`` passed."""
        if self._quiet.is_set() or (hurry is not None and hurry.is_set()):
            return
        waits = [asyncio.ensure_future(self._quiet.wait())]
        if hurry is not None:
            waits.append(asyncio.ensure_future(hurry.wait()))
        try:
            # Under steady load there may be no quiet moment: refill anyway.
            await asyncio.wait(waits, timeout=max_wait_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()


@dataclass(frozen=True, slots=True)
class PoolRun:
    """A finished run with the pool's own timings."""

    result: RunResult
    sandbox_id: str
    acquire_wait_s: float


class PoolHandle(Protocol):
    """A pool of any backend, as the daemon holds it: what it uses, no sandbox type."""

    name: str
    config: PoolConfig
    warmed: asyncio.Event

    async def __aenter__(self) -> PoolHandle: ...

    async def __aexit__(self, *exc_info: object) -> None: ...

    async def run(self, request: RunRequest) -> PoolRun: ...

    async def lease(self, on_died: Callable[[], None]) -> Any: ...

    async def run_leased(self, sandbox: Any, request: RunRequest) -> PoolRun: ...

    def end_lease(self, sandbox: Any) -> None: ...

    async def ready(self) -> bool: ...

    def not_ready_reason(self) -> str: ...

    def problem(self) -> str | None: ...

    def counts(self) -> dict[str, int]: ...

    @property
    def waiters(self) -> int: ...

    def backend_version(self) -> str: ...

    def runtime(self) -> Runtime: ...


class Pool(Generic[SandboxT]):
    """Keeps an idle target of sandboxes warm, never more than ``max_size`` in all states.

    The idle target is ``min_idle``, or, with ``max_idle`` above it, what the
    measured demand asks for between the two within the daemon's idle memory
    budget (pool/autosize.py). ``clock`` times arrivals and reviews of that
    target; tests pass a fake one.
    """

    def __init__(
        self,
        config: PoolConfig,
        backend: Backend[SandboxT],
        metrics: Metrics,
        activity: Activity | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.name = config.name
        self.backend = backend
        self.metrics = metrics
        self.activity = activity if activity is not None else Activity()
        self._idle: deque[SandboxT] = deque()
        self._busy: set[SandboxT] = set()
        # Sessions' sandboxes (pool/sessions.py), each with what to call if it dies.
        self._leased: dict[SandboxT, Callable[[], None]] = {}
        self._starting = 0
        self._destroying = 0
        self._waiters: deque[asyncio.Future[SandboxT]] = deque()
        self._told_waiting = False  # what the backend last heard (_tell_waiting)
        # Set while the pool has a request queued, no idle sandbox, or fewer
        # than arrive while one starts: starts waiting for a quiet moment then
        # begin at once. Invariant kept by _refill.
        self._short = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._start_tasks: set[asyncio.Task[None]] = set()
        self._consecutive_failures = 0
        self._last_start_error: str | None = None  # cleared by the next sandbox that starts
        self._backoff_until = 0.0
        self._backoff_timer: asyncio.TimerHandle | None = None
        self._closing = False
        self.warmed = asyncio.Event()  # reached min_idle at least once
        self._clock = clock
        ceiling = config.min_idle if config.max_idle is None else config.max_idle
        self._sizer = DemandSizer(config.min_idle, ceiling, clock())
        self._idle_target = config.min_idle
        self._review_at: float | None = None
        self._review_timer: asyncio.TimerHandle | None = None
        backend.listener = self._on_sandbox_event
        metrics.pool_created(self.name)
        metrics.idle_target_set(self.name, self._idle_target)

    def __repr__(self) -> str:
        return (
            f"<Pool {self.name} idle={len(self._idle)} busy={len(self._busy)} "
            f"leased={len(self._leased)} starting={self._starting} destroying={self._destroying} "
            f"waiters={len(self._waiters)}>"
        )

    # --- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Check the backend and begin warming; does not wait for ``min_idle``."""
        await self.backend.start()
        self.activity.idle_budget.join(
            self, self.name, self.config.memory_mb, self.config.min_idle, self._grant_changed
        )
        if self.config.min_idle == 0:
            self.warmed.set()
        self._maintain()

    async def close(self) -> None:
        """Stop refilling, cancel starts, destroy every sandbox; waits for the destroys."""
        self._closing = True
        self.activity.idle_budget.leave(self)
        for timer in (self._backoff_timer, self._review_timer):
            if timer is not None:
                timer.cancel()
        for waiter in self._waiters:
            waiter.cancel()
        for task in self._start_tasks:
            task.cancel()
        while self._idle:
            self._destroy(self._idle.popleft())
        # Sessions end before the pools close (the daemon's order); any left is destroyed.
        for sandbox in list(self._leased):
            self.end_lease(sandbox)
        # Busy sandboxes are destroyed by their requests' own release, which the
        # server's drain has already awaited or cancelled.
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.backend.close()

    async def __aenter__(self) -> Pool[SandboxT]:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- counts ------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        return {
            "idle": len(self._idle),
            "busy": len(self._busy),
            "leased": len(self._leased),
            "starting": self._starting,
            "destroying": self._destroying,
        }

    @property
    def waiters(self) -> int:
        return len(self._waiters)

    @property
    def idle_target(self) -> int:
        """Idle sandboxes the pool keeps warm now: min_idle, or what demand was granted."""
        return self._idle_target

    @property
    def total(self) -> int:
        return (len(self._idle) + len(self._busy) + len(self._leased) + self._starting
                + self._destroying)

    def backend_version(self) -> str:
        return self.backend.version()

    def runtime(self) -> Runtime:
        return self.backend.runtime()

    async def ready(self) -> bool:
        """Warmed once and the backend answers now."""
        return self.warmed.is_set() and await self.backend.ping()

    def not_ready_reason(self) -> str:
        """Why ``ready()`` said False, for /readyz: what is missing, and the backend's last
        start error when sandboxes fail to start."""
        return self.problem() or "its backend does not answer"

    def problem(self) -> str | None:
        """What keeps the pool from serving at once, None when nothing does; no I/O.

        The backend's last start error once starts keep failing (``sandpool_backend_up``
        is 0), or the warm-up still under way.
        """
        if self._consecutive_failures >= FAILING_AFTER:
            return f"its backend is failing: {self._last_start_error}"
        if not self.warmed.is_set():
            reason = f"warming: {len(self._idle)} of {self.config.min_idle} idle"
            if self._last_start_error is not None:
                reason += f"; sandboxes fail to start: {self._last_start_error}"
            return reason
        return None

    # --- running -----------------------------------------------------------

    async def run(self, request: RunRequest) -> PoolRun:
        """Run one request in a fresh sandbox, then destroy that sandbox.

        Raises UnavailableError (queue full, acquire timeout, backend failing)
        and BackendError. Cancellation destroys the sandbox too.
        """
        began = time.monotonic()
        self._sizer.arrived(self._clock())
        waited = False  # a hit: every hand-out of this request came from the idle sandboxes
        try:
            for attempt in range(1, HANDOUT_ATTEMPTS + 1):
                sandbox = self._take_idle()
                if sandbox is None:
                    waited = True
                    sandbox = await self._wait_for_sandbox()
                wait_s = time.monotonic() - began
                try:
                    result = await self._execute(sandbox, request)
                except SandboxLostError:
                    log.info(
                        "sandbox_lost_at_handout",
                        pool=self.name,
                        sandbox=sandbox.id,
                        attempt=attempt,
                    )
                    if attempt == HANDOUT_ATTEMPTS:
                        raise
                    continue
                finally:
                    self._release(sandbox)
                self.metrics.sandbox_acquired(self.name, wait_s)
                return PoolRun(result=result, sandbox_id=sandbox.id, acquire_wait_s=wait_s)
            raise AssertionError("unreachable")  # pragma: no cover
        finally:
            # Refused and timed-out requests count as misses: they were not served at once.
            self.metrics.acquisition(self.name, hit=not waited)

    # --- sessions (pool/sessions.py) ---------------------------------------

    async def lease(self, on_died: Callable[[], None]) -> SandboxT:
        """A warm sandbox of this pool, leased to a session until ``end_lease``.

        It counts against ``max_size`` and the pool refills its idle target
        behind it. ``on_died`` is called if it dies by itself while leased.
        Raises UnavailableError as ``run`` does, and SandboxLostError if every
        sandbox handed out was dead.
        """
        for _ in range(HANDOUT_ATTEMPTS):
            sandbox = self._take_idle()
            if sandbox is None:
                sandbox = await self._wait_for_sandbox()
            self._busy.discard(sandbox)
            if sandbox.lease():
                self._leased[sandbox] = on_died
                self._maintain()
                return sandbox
            self._destroy(sandbox)  # died in the instant it was handed out
        raise SandboxLostError(f"every sandbox of pool {self.name!r} handed out had died")

    async def run_leased(self, sandbox: SandboxT, request: RunRequest) -> PoolRun:
        """Run one of a session's requests in its leased sandbox, which stays leased.

        Raises SandboxLostError if the sandbox (its code's process) has ended.
        """
        result = await self._execute(sandbox, request)
        return PoolRun(result=result, sandbox_id=sandbox.id, acquire_wait_s=0.0)

    async def _execute(self, sandbox: SandboxT, request: RunRequest) -> RunResult:
        """One request in a sandbox the caller holds (a single-use or a leased one):
        counted in flight, ``on_start`` told, its execution time recorded."""
        in_flight = self.activity.begin()
        if request.on_start is not None:
            request.on_start()
        try:
            result = await self.backend.run(sandbox, request)
        finally:
            self.activity.end(in_flight)
        self.metrics.sandbox_ran(self.name, result.execution_s)
        return result

    def end_lease(self, sandbox: SandboxT) -> None:
        """The session is over: destroy its sandbox; the pool refills."""
        if self._leased.pop(sandbox, None) is not None:
            self._destroy(sandbox)
            self._maintain()

    async def _wait_for_sandbox(self) -> SandboxT:
        if self._failing():
            raise UnavailableError(
                f"pool {self.name!r} cannot start sandboxes: its backend is failing "
                f"({self._last_start_error})",
                code="backend_unavailable",
                retry_after_s=max(1, round(self._backoff_until - time.monotonic())),
            )
        if len(self._waiters) >= self.config.max_queue:
            raise UnavailableError(
                f"pool {self.name!r} is exhausted: {len(self._waiters)} requests already queued"
            )
        waiter: asyncio.Future[SandboxT] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._maintain()
        try:
            async with asyncio.timeout(self.config.acquire_timeout_s):
                return await waiter
        except BaseException as e:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
                self._tell_waiting()
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # Handed a sandbox in the same instant we gave up: it is unused, keep it.
                self._give_back(waiter.result())
            if isinstance(e, TimeoutError):
                raise UnavailableError(
                    f"no sandbox of pool {self.name!r} became free within "
                    f"{self.config.acquire_timeout_s:g} s",
                    code="acquire_timeout",
                ) from None
            if isinstance(e, asyncio.CancelledError) and self._closing:
                raise UnavailableError("sandpool is shutting down", code="shutting_down") from None
            raise

    def _take_idle(self) -> SandboxT | None:
        while self._idle:
            sandbox = self._idle.popleft()
            if sandbox.alive:
                self._busy.add(sandbox)
                self._maintain()
                return sandbox
            self._destroy(sandbox)
        return None

    def _give_back(self, sandbox: SandboxT) -> None:
        # Only called from _wait_for_sandbox when the waiter raised, so the
        # sandbox never reached a caller.
        self._busy.discard(sandbox)
        self._idle.appendleft(sandbox)
        self._hand_to_waiters()

    def _release(self, sandbox: SandboxT) -> None:
        self._busy.discard(sandbox)
        self._destroy(sandbox)

    # --- state machine -----------------------------------------------------

    def _maintain(self) -> None:
        """Bring the idle target up to date, then start sandboxes until idle +
        starting covers it and the waiters."""
        if self._closing:
            return
        self._resize()
        self._refill()

    def _resize(self) -> None:
        if self._sizer.fixed:
            return  # min_idle == max_idle: the target is min_idle, as it always was
        now = self._clock()
        self._apply_grant(self.activity.idle_budget.want(self, self._sizer.target(now)))
        review_at = self._sizer.review_at
        if review_at != self._review_at:
            if self._review_timer is not None:
                self._review_timer.cancel()
                self._review_timer = None
            if review_at is not None:
                self._review_timer = asyncio.get_running_loop().call_later(
                    max(0.0, review_at - now), self._review_due
                )
            self._review_at = review_at

    def _review_due(self) -> None:
        self._review_timer = None
        self._review_at = None
        self._maintain()

    def _grant_changed(self) -> None:
        # Another pool's demand moved this pool's share of the idle budget.
        if self._closing:
            return
        self._apply_grant(self.activity.idle_budget.grant(self))
        self._refill()

    def _apply_grant(self, target: int) -> None:
        if target != self._idle_target:
            log.info(
                "idle_target_changed",
                pool=self.name,
                target=target,
                previous=self._idle_target,
                arrivals_per_s=round(self._sizer.rate(self._clock()), 3),
                refill_s=self._sizer.refill_s,
            )
            self._idle_target = target
            self.metrics.idle_target_set(self.name, target)
        # Demand added what exceeds the target now: give its memory back. The
        # oldest first, the likeliest to have gone stale while parked.
        while len(self._idle) > self._idle_target:
            self._destroy(self._idle.popleft())

    def _tell_waiting(self) -> None:
        """Tell the backend when requests start or stop waiting: its CPU standing
        lets a busy pool's refills wait, but not one a request waits for."""
        waiting = bool(self._waiters)
        if waiting != self._told_waiting:
            self._told_waiting = waiting
            self.backend.requests_waiting(waiting)

    def _refill(self) -> None:
        self._tell_waiting()
        if self._waiters or not self._idle or self._sizer.short(len(self._idle), self._clock()):
            self._short.set()
        else:
            self._short.clear()
        if self._backing_off():
            if self._backoff_timer is None:
                delay = self._backoff_until - time.monotonic()
                self._backoff_timer = asyncio.get_running_loop().call_later(
                    delay, self._backoff_over
                )
            return
        wanted = self._idle_target + len(self._waiters)
        while (
            len(self._idle) + self._starting < wanted
            and self.total < self.config.max_size
            and self._starting < self.config.start_concurrency
        ):
            self._starting += 1
            urgent = bool(self._waiters) or not self._idle
            task = self._spawn(self._start_sandbox(urgent))
            self._start_tasks.add(task)
            task.add_done_callback(self._start_tasks.discard)

    def _backing_off(self) -> bool:
        return time.monotonic() < self._backoff_until

    def _failing(self) -> bool:
        return self._consecutive_failures >= FAILING_AFTER and self._backing_off()

    def _backoff_over(self) -> None:
        self._backoff_timer = None
        self._maintain()

    def _hand_to_waiters(self) -> None:
        while self._idle and self._waiters:
            waiter = self._waiters.popleft()
            if waiter.done():
                continue
            sandbox = self._idle.popleft()
            if not sandbox.alive:
                self._waiters.appendleft(waiter)
                self._destroy(sandbox)
                continue
            self._busy.add(sandbox)
            waiter.set_result(sandbox)

    def _sandbox_started(self, sandbox: SandboxT) -> None:
        self._starting -= 1
        if self._consecutive_failures >= FAILING_AFTER:
            log.info("backend_recovered", pool=self.name)
        self._consecutive_failures = 0
        self._last_start_error = None
        self.metrics.backend_state(self.name, up=True)
        if self._closing:
            self._destroy(sandbox)
            return
        self._idle.append(sandbox)
        self._hand_to_waiters()
        if len(self._idle) >= self.config.min_idle:
            self.warmed.set()
        self._maintain()

    def _start_failed(self, error: BaseException) -> None:
        self._starting -= 1
        self._consecutive_failures += 1
        self._last_start_error = str(error) or type(error).__name__
        self.metrics.sandbox_start_failed(self.name)
        if self._consecutive_failures >= FAILING_AFTER:
            self.metrics.backend_state(self.name, up=False)
        backoff_s = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (self._consecutive_failures - 1))
        self._backoff_until = time.monotonic() + backoff_s
        log.warning(
            "sandbox_start_failed",
            pool=self.name,
            error=str(error),
            consecutive_failures=self._consecutive_failures,
            backoff_s=backoff_s,
        )
        if self._consecutive_failures >= FAILING_AFTER and not self._idle and not self._starting:
            # Nothing is coming for the queue: fail it now instead of at its timeout.
            unavailable = UnavailableError(
                f"pool {self.name!r} cannot start sandboxes: {error}",
                code="backend_unavailable",
                retry_after_s=max(1, round(backoff_s)),
            )
            while self._waiters:
                waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_exception(unavailable)
        self._maintain()

    def _destroy(self, sandbox: SandboxT) -> None:
        self._destroying += 1
        self._spawn(self._destroy_sandbox(sandbox))

    def _on_sandbox_event(self, sandbox: Sandbox, event: SandboxEvent) -> None:
        if event == "oom":
            self.metrics.oom_killed(self.name)
            log.info("sandbox_oom", pool=self.name, sandbox=sandbox.id)
            return
        for idle in self._idle:  # typed as this pool's sandboxes, unlike the event's
            if idle is sandbox:
                self._idle.remove(idle)
                log.warning("sandbox_died_idle", pool=self.name, sandbox=idle.id)
                self._destroy(idle)
                self._maintain()
                return
        for leased, on_died in self._leased.items():
            if leased is sandbox:
                on_died()  # the session ends it (end_lease), after a run in flight
                return

    # --- I/O ---------------------------------------------------------------

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        # Pool tasks live in a set the pool owns rather than a TaskGroup: one
        # failed start must not cancel its siblings or in-flight destroys.
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _start_sandbox(self, urgent: bool) -> None:
        # A refill lasts from this decision to the sandbox parked, quiet wait
        # included: that is the W of the idle target's Little's law.
        decided = time.monotonic()
        try:
            if not urgent:
                await self.activity.wait_quiet(QUIET_WAIT_MAX_S, hurry=self._short)
            began = time.monotonic()
            sandbox = await self.backend.start_sandbox()
        except asyncio.CancelledError:
            self._starting -= 1
            raise
        except BackendError as e:
            self._start_failed(e)
            return
        except Exception as e:  # a bug in a backend must not stop the pool refilling
            log.exception("sandbox_start_crashed", pool=self.name)
            self._start_failed(e)
            return
        parked = time.monotonic()
        self.metrics.sandbox_started(self.name, parked - began)
        self._sizer.started(parked - began)
        self._sizer.refilled(parked - decided)
        self._sandbox_started(sandbox)

    async def _destroy_when_quiet(self, sandbox: SandboxT) -> None:
        if not self._closing:
            await self.activity.wait_quiet(DESTROY_QUIET_WAIT_MAX_S)
        await self.backend.destroy_sandbox(sandbox)

    async def _destroy_sandbox(self, sandbox: SandboxT) -> None:
        began = time.monotonic()
        try:
            # Shielded: a cancelled request or a closing pool must still destroy it.
            await asyncio.shield(self._destroy_when_quiet(sandbox))
        except BackendError as e:
            log.error("sandbox_destroy_failed", pool=self.name, sandbox=sandbox.id, error=str(e))
        finally:
            self._destroying -= 1
            self.metrics.sandbox_destroyed(self.name, time.monotonic() - began)
            self._maintain()
