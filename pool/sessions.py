"""Sessions: one pool's sandbox leased to one caller, running its requests in turn.

The exception to single use (docs/sessions.md): a session's sandbox takes its
owner's requests one after another in the same interpreter, like a notebook's
cells, and is destroyed at the session's end, never given back to a pool.

As in the pool manager, state changes in plain synchronous methods and the
awaits (a lease, a run) sit between them; on one event loop the registry stays
consistent without locks. Invariants: a session is in ``_live`` from its lease
to its end and nowhere else; ``_end`` runs once per session and is the only
place a lease ends; ``_reserved`` holds the creations that wait for a lease, so
the limits count them before their sandbox exists.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog

from metrics import Metrics
from pool.backends.base import RunRequest, RunResult, Sandbox
from pool.config import PoolConfig, ServerConfig
from pool.errors import (
    BadRequestError,
    SandboxLostError,
    SessionBusyError,
    SessionEndedError,
    SessionNotFoundError,
    TooManySessionsError,
    UnavailableError,
)
from pool.manager import PoolRun

log = structlog.get_logger("sandpool.sessions")

# Why a session ended (docs/sessions.md has the table): the label values of
# sandpool_sessions_ended_total and the ``reason`` of a 410 session_ended.
REASONS = (
    "deleted", "expired", "idle", "timed_out", "oom_killed", "killed", "exited", "cancelled",
    "shutdown",
)  # fmt: skip
ID_BYTES = 32  # 256 bits from secrets: an id is never guessed
# An ended session's id answers 410 with its reason this long, for this many
# ids at most (the oldest forgotten first); then 404 as an unknown id.
ENDED_KEEP_S = 3600.0
ENDED_KEEP = 10_000
MAX_RETRY_AFTER_S = 60


class LeasingPool(Protocol):
    """What sessions use of a pool (``pool.manager.Pool``)."""

    name: str
    config: PoolConfig

    async def lease(self, on_died: Callable[[], None]) -> Any: ...

    async def run_leased(self, sandbox: Any, request: RunRequest) -> PoolRun: ...

    def end_lease(self, sandbox: Any) -> None: ...


@dataclass(eq=False, slots=True)
class Session:
    id: str
    owner: str  # "uid:N" on the Unix socket, "token:NAME" on the TCP listener
    pool: LeasingPool
    sandbox: Sandbox
    created_at: float  # wall clock, for the API's timestamps
    created: float  # monotonic, as every deadline below
    expires: float
    idle_timeout_s: float
    idle_deadline: float
    runs: int = 0
    busy: bool = False
    died: bool = False  # its sandbox died by itself; ended once no run is in flight
    ended: str | None = None
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)

    def describe(self) -> dict[str, object]:
        """The API's session object (docs/sessions.md)."""
        wall = self.created_at - self.created  # monotonic -> wall clock
        return {
            "session_id": self.id,
            "pool": self.pool.name,
            "created_at": timestamp(self.created_at),
            "expires_at": timestamp(self.expires + wall),
            "idle_timeout_s": self.idle_timeout_s,
            "idle_expires_at": None if self.busy else timestamp(self.idle_deadline + wall),
            "runs": self.runs,
            "busy": self.busy,
        }


@dataclass(frozen=True, slots=True)
class EndedSession:
    owner: str
    reason: str
    at: float  # monotonic


@dataclass(slots=True)
class Reservation:
    owner: str
    pool: LeasingPool


class Sessions:
    """Every live session of one daemon, its limits and its timers."""

    def __init__(
        self,
        pools: Mapping[str, LeasingPool],
        server: ServerConfig,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._pools = pools
        self._server = server
        self._metrics = metrics
        self._clock = clock
        self._wall_clock = wall_clock
        self._live: dict[str, Session] = {}
        self._ended: OrderedDict[str, EndedSession] = OrderedDict()
        self._reserved: list[Reservation] = []
        self._closing = False
        for pool in pools.values():
            if pool.config.session_capacity:
                metrics.sessions_expected(pool.name, REASONS)

    def __repr__(self) -> str:
        return f"<Sessions live={len(self._live)} creating={len(self._reserved)}>"

    # --- the API's calls ---------------------------------------------------

    async def create(
        self, owner: str, pool_name: str, ttl_s: float | None, idle_timeout_s: float | None
    ) -> Session:
        """Lease a sandbox of ``pool_name`` to ``owner``. Raises BadRequestError
        (sessions_unsupported, invalid_session), TooManySessionsError and
        UnavailableError (session_limit, session_memory, and the pool's own)."""
        if self._closing:
            raise UnavailableError("sandpool is shutting down", code="shutting_down")
        pool = self._pools[pool_name]  # the schema checked the name
        if not pool.config.session_capacity:
            raise BadRequestError(
                f"pool {pool.name!r} holds no sessions: "
                + ("its max_sessions is 0" if pool.config.holds_state else
                   f"a {pool.config.backend} {pool.config.language} sandbox cannot keep "
                   "state between runs"),
                code="sessions_unsupported",
            )
        ttl = self._server.session_ttl_s if ttl_s is None else ttl_s
        idle = min(ttl, self._server.session_idle_timeout_s) if idle_timeout_s is None \
            else idle_timeout_s
        if not 0 < ttl <= self._server.session_max_ttl_s or not 0 < idle <= ttl:
            raise BadRequestError(
                f"ttl_s must be in (0, {self._server.session_max_ttl_s:g}] and "
                "idle_timeout_s in (0, ttl_s]",
                code="invalid_session",
            )
        self._admit(owner, pool)
        reservation = Reservation(owner, pool)
        self._reserved.append(reservation)
        session_id = "s-" + secrets.token_urlsafe(ID_BYTES)
        try:
            sandbox = await pool.lease(lambda: self._died(session_id))
        finally:
            self._reserved.remove(reservation)
        now = self._clock()
        session = Session(
            id=session_id, owner=owner, pool=pool, sandbox=sandbox,
            created_at=self._wall_clock(), created=now, expires=now + ttl,
            idle_timeout_s=idle, idle_deadline=now + idle,
        )
        self._live[session_id] = session
        if self._closing:  # the daemon began to stop while the lease was awaited
            self._end(session, "shutdown")
            raise UnavailableError("sandpool is shutting down", code="shutting_down")
        self._schedule(session)
        self._metrics.session_started(pool.name)
        log.info("session_created", session=session_id, pool=pool.name, owner=owner,
                 sandbox=sandbox.id, ttl_s=ttl, idle_timeout_s=idle)
        return session

    def get(self, owner: str, session_id: str) -> Session:
        """``owner``'s live session. Raises SessionNotFoundError (also for another
        caller's id: never confirmed to them) and SessionEndedError."""
        session = self._live.get(session_id)
        if session is not None and session.owner == owner:
            return session
        ended = self._ended.get(session_id)
        if ended is not None and ended.owner == owner and self._clock() - ended.at < ENDED_KEEP_S:
            raise SessionEndedError(f"session ended: {ended.reason}", reason=ended.reason)
        raise SessionNotFoundError("no such session")

    def owned_by(self, owner: str) -> list[Session]:
        return [s for s in self._live.values() if s.owner == owner]

    async def run(self, owner: str, session_id: str, request: RunRequest) -> PoolRun:
        """Run ``request`` in the session's sandbox. Raises the errors of ``get``,
        SessionBusyError, and SessionEndedError when its process had ended first
        (nothing ran). A run that times out, is OOM-killed or cut ends the session
        after its answer."""
        session = self.get(owner, session_id)
        if session.busy:
            raise SessionBusyError("a run of this session is in flight; one at a time")
        session.busy = True
        session.idle_deadline = math.inf
        reason: str | None = "cancelled"  # unless the run comes back
        try:
            run = await session.pool.run_leased(session.sandbox, replace(request, session=True))
            reason = None
        except SandboxLostError:
            reason = "exited"
            raise SessionEndedError(
                "the session's process had ended before this run; nothing ran",
                reason="exited",
            ) from None
        except Exception:
            reason = "killed"  # the backend lost the sandbox mid-run: not usable after
            raise
        finally:
            session.busy = False
            session.runs += reason is None
            if reason is not None:
                self._end(session, reason)
        if session.ended is None:
            reason = ended_by(run.result) or ("exited" if session.died else None)
            if reason is None and self._clock() >= session.expires:
                reason = "expired"
            if reason is not None:
                self._end(session, reason)
            else:
                session.idle_deadline = self._clock() + session.idle_timeout_s
                self._schedule(session)
        return run

    def delete(self, owner: str, session_id: str) -> str:
        """End ``owner``'s session; the reason it ended for (idempotent). Raises
        SessionNotFoundError."""
        try:
            session = self.get(owner, session_id)
        except SessionEndedError as e:
            return e.reason
        self._end(session, "deleted")
        return "deleted"

    def close(self) -> None:
        """The daemon stops: end every session (before the pools close)."""
        self._closing = True
        for session in list(self._live.values()):
            self._end(session, "shutdown")

    # --- limits -------------------------------------------------------------

    def _admit(self, owner: str, pool: LeasingPool) -> None:
        holding: list[Session | Reservation] = [*self._live.values(), *self._reserved]
        mine = [s for s in holding if s.owner == owner]
        if len(mine) >= self._server.max_sessions_per_caller:
            raise TooManySessionsError(
                f"you hold {len(mine)} sessions, the most one caller may "
                f"(server.max_sessions_per_caller); end one first",
                retry_after_s=self._retry_after([s for s in mine if isinstance(s, Session)]),
            )
        in_pool = [s for s in holding if s.pool is pool]
        if len(in_pool) >= pool.config.session_capacity:
            raise UnavailableError(
                f"pool {pool.name!r} holds its {pool.config.session_capacity} sessions "
                "(max_sessions)",
                code="session_limit",
                retry_after_s=self._retry_after([s for s in in_pool if isinstance(s, Session)]),
            )
        memory = sum(s.pool.config.memory_mb for s in holding)
        if memory + pool.config.memory_mb > self._server.session_memory_mb:
            raise UnavailableError(
                f"sessions hold {memory} MiB of the {self._server.session_memory_mb} MiB "
                "they may (server.session_memory_mb)",
                code="session_memory",
                retry_after_s=self._retry_after(
                    [s for s in holding if isinstance(s, Session)]
                ),
            )

    def _retry_after(self, sessions: list[Session]) -> int:
        """Seconds until the first of ``sessions`` can end by itself, within [1, 60]."""
        now = self._clock()
        soonest = min((min(s.expires, s.idle_deadline) - now for s in sessions),
                      default=MAX_RETRY_AFTER_S)
        return int(min(MAX_RETRY_AFTER_S, max(1, math.ceil(soonest))))

    # --- ends ---------------------------------------------------------------

    def _schedule(self, session: Session) -> None:
        if session.timer is not None:
            session.timer.cancel()
        deadline = min(session.expires, session.idle_deadline)
        delay = max(0.0, deadline - self._clock())
        session.timer = asyncio.get_running_loop().call_later(delay, self._due, session)

    def _due(self, session: Session) -> None:
        session.timer = None
        if session.ended is not None or session.busy:
            return  # a run in flight: its end checks expiry and sets the idle deadline
        now = self._clock()
        if now >= session.expires:
            self._end(session, "expired")
        elif now >= session.idle_deadline:
            self._end(session, "idle")
        else:
            self._schedule(session)

    def _died(self, session_id: str) -> None:
        """The pool saw the session's sandbox die by itself."""
        session = self._live.get(session_id)
        if session is None:
            return
        session.died = True
        if not session.busy:
            self._end(session, "exited")

    def _end(self, session: Session, reason: str) -> None:
        if session.ended is not None:
            return
        session.ended = reason
        if session.timer is not None:
            session.timer.cancel()
            session.timer = None
        del self._live[session.id]
        self._ended[session.id] = EndedSession(session.owner, reason, self._clock())
        while len(self._ended) > ENDED_KEEP:
            self._ended.popitem(last=False)
        session.pool.end_lease(session.sandbox)
        lifetime_s = self._clock() - session.created
        self._metrics.session_ended(session.pool.name, reason, lifetime_s, session.runs)
        log.info("session_ended", session=session.id, pool=session.pool.name, reason=reason,
                 runs=session.runs, lifetime_s=round(lifetime_s, 3))


def ended_by(result: RunResult) -> str | None:
    """Why a run's result ends its session, None if the session goes on.

    The daemon killed the sandbox (timeout, output cap, a protocol violation:
    no exit code), or the kernel's OOM killer struck in it.
    """
    if result.timed_out:
        return "timed_out"
    if result.oom_killed:
        return "oom_killed"
    if result.exit_code is None:
        return "killed"
    return None


def timestamp(seconds: float) -> str:
    """RFC 3339 UTC, to the second."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
