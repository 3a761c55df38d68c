"""A pool's CPU standing among its peers: busy runs yield, starts weigh.

A cgroup competes with its siblings: a pool's directory with the other pools
and the daemon, a sandbox's directory with the other sandboxes of its pool.
Two things move a pool's standing (docs/security.md, "Hostile neighbours"):

- A start is the daemon's work for the next request, so each start in
  progress adds one process's weight to the pool (process tier: Python's
  start-up, ~70 ms of CPU, used to get a fifth of a core beside busy
  neighbours and the pool ran dry).
- A run still going ``BUSY_AFTER_S`` in is busy, as in the wasm tier: its
  sandbox's cgroup goes to ``cpu.idle`` (SCHED_IDLE among its pool's
  sandboxes), and while every run of the pool is busy, the pool's directory
  does too (SCHED_IDLE among the pools and the daemon). Busy code then takes
  only CPU nothing else wants; its ``cpus`` quota still caps it; a short
  request anywhere preempts it at once. ``cpu.idle`` is per level of the
  tree, which is why both levels move: an idle sandbox in a pool of ordinary
  standing still competes as an equal with every other pool.
- A start in such a pool lifts the pool's flag only while one of the pool's
  requests waits for a sandbox (the manager says, ``requests_waiting``). A
  refill nobody waits for yet is the busy pool's own work: lifting the flag
  for it handed the pool's whole standing, weight of the start included, to
  its busy code whenever the start itself waited (a Docker start waits on the
  engine for most of its ~0.5 s), and the neighbours' busy code then cost the
  other pools' requests most of their p99 (docs/security.md, "A busy pool's
  refills"). Inside the idle pool the start still comes before the busy code.

State changes are plain counts (``standing``); the kernfs writes happen after,
one at a time, and only when the standing changed, so a pool whose runs are
all short never writes at all.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from pool.backends.base import BUSY_AFTER_S
from pool.backends.process.cgroups import CgroupTree, SandboxCgroup, set_pool_cpu

Made = TypeVar("Made")


@dataclass(frozen=True, slots=True)
class Standing:
    weight: int  # in processes' weights (1: a cgroup's default)
    idle: bool


def standing(*, starting: int, short: int, busy: int, waiting: bool,
             weigh_starts: bool) -> Standing:
    """What the pool's directory should say, from its starts and runs in progress
    and whether a request of the pool waits for a sandbox.

    Idle only while something busy runs and nothing else is wanted now: a run
    younger than BUSY_AFTER_S, or a start a request waits for, in an idle
    directory would itself wait for CPU nothing else wants.
    """
    idle = busy > 0 and short == 0 and not (starting and waiting)
    weight = 1 + starting if weigh_starts and not idle else 1
    return Standing(weight, idle)


class PoolCpu:
    """One pool's counts of starts and runs, and its cgroup directory kept to match."""

    def __init__(self, tree: CgroupTree | None, *, weigh_starts: bool) -> None:
        self._tree = tree
        self._weigh_starts = weigh_starts
        self._starting = 0
        self._short = 0  # runs younger than BUSY_AFTER_S
        self._busy = 0
        self._waiting = False  # a request of the pool waits for a sandbox
        self._written = Standing(1, False)  # a new directory's
        self._writing = asyncio.Lock()  # one write at a time, the latest standing last
        self._told: set[asyncio.Task[None]] = set()  # writes requests_waiting began

    def __repr__(self) -> str:
        return (f"<PoolCpu starting={self._starting} short={self._short} busy={self._busy} "
                f"waiting={self._waiting} {self._written}>")

    @property
    def standing(self) -> Standing:
        return standing(starting=self._starting, short=self._short, busy=self._busy,
                        waiting=self._waiting, weigh_starts=self._weigh_starts)

    def requests_waiting(self, waiting: bool) -> None:
        """Whether a request of the pool waits for a sandbox now (its manager says).

        A start in progress then stands as the pool's urgent work at once: the
        write is begun here, not at the start's next step.
        """
        self._waiting = waiting
        if self._unsettled():
            task = asyncio.get_running_loop().create_task(self._settle())
            self._told.add(task)
            task.add_done_callback(self._told.discard)

    async def close(self) -> None:
        """Before the pool's directory goes: no write of ours is still under way."""
        await asyncio.gather(*self._told, return_exceptions=True)

    def _unsettled(self) -> bool:
        """Whether a write is due or under way: without one, no task is made at all."""
        return self._tree is not None and (self._writing.locked() or self.standing != self._written)

    async def _settle(self) -> None:
        async with self._writing:
            wanted = self.standing
            if self._tree is not None and wanted != self._written:
                await asyncio.to_thread(set_pool_cpu, self._tree, wanted.weight, wanted.idle,
                                        was_idle=self._written.idle)
                self._written = wanted

    async def start(self, make: Callable[[], Awaitable[Made]],
                    undo: Callable[[Made], Awaitable[None]]) -> Made:
        """One sandbox start, ``make``, weighing on the pool while it runs.

        The standing is written back after ``make`` returns, and a cancel can
        land there: the sandbox then exists and nobody will receive it, so
        ``undo`` (its destroy) runs, shielded, before the cancel goes on.
        """
        made: list[Made] = []  # empty until ``make`` returned
        try:
            async with self.starting():
                made.append(await make())
        except asyncio.CancelledError:
            if made:
                await asyncio.shield(undo(made[0]))
            raise
        return made[0]

    @contextlib.asynccontextmanager
    async def starting(self) -> AsyncIterator[None]:
        """Around one sandbox start (``start`` for a start that makes something)."""
        self._starting += 1
        try:
            if self._unsettled():
                await asyncio.shield(self._settle())
            yield
        finally:
            self._starting -= 1
            if self._unsettled():
                await asyncio.shield(self._settle())

    @contextlib.asynccontextmanager
    async def running(self, cgroup: SandboxCgroup | None, *, kept: bool) -> AsyncIterator[None]:
        """Around one run in the sandbox of ``cgroup``; ``kept``: the sandbox takes
        further runs (a session), so a busy run's demotion is undone at its end."""
        self._short += 1
        demoting: asyncio.Future[None] | None = None

        def become_busy() -> None:
            nonlocal demoting
            self._short -= 1
            self._busy += 1
            demoting = asyncio.ensure_future(self._demote(cgroup))  # awaited at the end

        timer = asyncio.get_running_loop().call_later(BUSY_AFTER_S, become_busy)
        try:
            if self._unsettled():  # an idle pool stands as usual before the code runs
                await asyncio.shield(self._settle())
            yield
        finally:
            timer.cancel()
            if demoting is None:
                self._short -= 1
            else:
                self._busy -= 1
            # One shielded coroutine: a cancelled run still leaves the counts written.
            if demoting is not None or self._unsettled():
                await asyncio.shield(self._end(demoting, cgroup if kept else None))

    async def _demote(self, cgroup: SandboxCgroup | None) -> None:
        if cgroup is not None:
            await asyncio.to_thread(cgroup.set_idle, True)
        await self._settle()

    async def _end(self, demoting: asyncio.Future[None] | None,
                   kept: SandboxCgroup | None) -> None:
        if demoting is not None:
            await demoting
            if kept is not None:  # the session's next run starts with its pool's standing
                await asyncio.to_thread(kept.set_idle, False)
        await self._settle()
