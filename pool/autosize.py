"""How many idle sandboxes a pool keeps: demand sizing and the daemon's memory budget.

Pure logic, fed times and durations, so that it is tested without a clock or a
backend; ``pool/manager.py`` feeds it and acts on its answers. docs/autosize.md
has the reasoning and the constants' choice.

Little's law: a request that takes an idle sandbox sets off a refill that
lasts W seconds (spawn to ready), so at an arrival rate of λ per second about
λ·W refills are in flight. For arrivals to find a sandbox parked, the pool
parks that many and a margin: ``ceil(λ · W · HEADROOM)``, clamped to the pool's
``[min_idle, max_idle]``. The target rises at the arrival that asks for more
and falls only when a whole hold window passed below it, so noise in the rate
estimate does not start and destroy sandboxes back and forth.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass

# Time constant of the arrival rate's exponential average: a burst of n
# requests lifts the estimate by about n / RATE_TIME_CONSTANT_S at once; a
# steady rate λ is estimated within about 1/sqrt(2·λ·RATE_TIME_CONSTANT_S).
RATE_TIME_CONSTANT_S = 5.0
# Weight of the newest refill duration in its running average.
REFILL_WEIGHT = 0.25
# Margin over the mean number of refills in flight (Poisson arrivals overshoot
# their mean; the window's peak adds more under noise).
HEADROOM = 1.5
# The target falls to the highest value arrivals asked for during the last
# window, reviewed once per window: after demand stops it is back at the floor
# within one to two windows.
HOLD_S = 30.0
# ceil() of a product of floats: 2.0000000001 sandboxes is 2, not 3.
_ROUNDING_SLACK = 1e-9


class DemandSizer:
    """The idle target of one pool: ``floor`` (min_idle) raised by demand up to ``ceiling``.

    ``arrived`` and ``refilled`` feed it; ``target(now)`` answers and lowers
    the target when a review is due; ``review_at`` says when the target may
    next fall (None while it sits at the floor). Each call is O(1).
    """

    def __init__(self, floor: int, ceiling: int, now: float) -> None:
        if not 0 <= floor <= ceiling:
            raise ValueError(f"need 0 <= floor ({floor}) <= ceiling ({ceiling})")
        self.floor = floor
        self.ceiling = ceiling
        self._rate = 0.0  # arrivals per second, as of _rate_at
        self._rate_at = now
        self.refill_s: float | None = None  # unknown until a refill is measured
        self.start_s: float | None = None  # the backend's part of it, likewise
        self._held = floor
        self._window_peak = floor  # the most arrivals asked for since the last review
        self.review_at: float | None = None

    @property
    def fixed(self) -> bool:
        """Whether demand can change the target at all (no max_idle above min_idle)."""
        return self.floor == self.ceiling

    def rate(self, now: float) -> float:
        """Estimated arrivals per second at ``now``."""
        return self._rate * math.exp(-(now - self._rate_at) / RATE_TIME_CONSTANT_S)

    def arrived(self, now: float) -> None:
        """A request reached the pool (served, queued or refused alike): demand is demand."""
        self._rate = self.rate(now) + 1.0 / RATE_TIME_CONSTANT_S
        self._rate_at = now
        if self.fixed:
            return  # the rate still tells whether the pool is short
        wanted = self.wanted(now)
        self._window_peak = max(self._window_peak, wanted)
        if wanted > self._held:
            self._held = wanted
            if self.review_at is None:
                self.review_at = now + HOLD_S

    def refilled(self, duration_s: float) -> None:
        """A refill took ``duration_s`` from the pool's decision to the sandbox parked."""
        if self.refill_s is None:
            self.refill_s = duration_s
        else:
            self.refill_s += REFILL_WEIGHT * (duration_s - self.refill_s)

    def started(self, duration_s: float) -> None:
        """A backend start (not the wait before it) took ``duration_s``."""
        if self.start_s is None:
            self.start_s = duration_s
        else:
            self.start_s += REFILL_WEIGHT * (duration_s - self.start_s)

    def short(self, idle: int, now: float) -> bool:
        """Whether ``idle`` sandboxes are fewer than the arrivals expected while
        one more starts (Little's law again, with HEADROOM): a refill begun now
        may just be in time, one that waits for a quiet moment would not."""
        if self.start_s is None:
            return False
        return idle < self.rate(now) * self.start_s * HEADROOM

    def wanted(self, now: float) -> int:
        """What the demand at ``now`` asks for, within the bounds, before holding."""
        if self.refill_s is None:
            return self.floor
        in_flight = self.rate(now) * self.refill_s * HEADROOM
        return max(self.floor, min(self.ceiling, math.ceil(in_flight - _ROUNDING_SLACK)))

    def target(self, now: float) -> int:
        """The idle target at ``now``; lowers it when a review is due."""
        if self.review_at is not None and now >= self.review_at:
            self._held = self._window_peak
            self._window_peak = self.floor
            self.review_at = now + HOLD_S if self._held > self.floor else None
        return self._held


@dataclass(slots=True)
class _Member:
    name: str
    memory_mb: int
    floor: int
    want: int
    grant: int
    on_grant_changed: Callable[[], None]


class IdleBudget:
    """Shares a daemon-wide memory budget among the pools' idle targets.

    Invariant: the sum over pools of grant x memory_mb stays within
    ``memory_mb``, except that floors (min_idle) are always granted: a config
    whose floors alone exceed the budget keeps them and grows none. Above the
    floors, what the pools want is scaled down in proportion to the memory it
    asks for, whole sandboxes by largest remainder (ties by pool name), so
    every pool under demand keeps a share and none needs a priority key.
    ``None`` is no budget: every pool gets what it wants.
    """

    def __init__(self, memory_mb: int | None) -> None:
        self.memory_mb = memory_mb
        self._members: dict[Hashable, _Member] = {}

    def join(
        self,
        key: Hashable,
        name: str,
        memory_mb: int,
        floor: int,
        on_grant_changed: Callable[[], None],
    ) -> None:
        """Add a pool at its floor; ``on_grant_changed`` is called when another pool's
        want changes this one's grant (never re-entrantly for the pool that changed)."""
        self._members[key] = _Member(name, memory_mb, floor, floor, floor, on_grant_changed)
        self._share(changed_by=key)

    def leave(self, key: Hashable) -> None:
        if self._members.pop(key, None) is not None:
            self._share(changed_by=key)

    def want(self, key: Hashable, idle: int) -> int:
        """Record that pool ``key`` wants ``idle`` parked; returns its grant."""
        member = self._members[key]
        if idle != member.want:
            member.want = idle
            self._share(changed_by=key)
        return member.grant

    def grant(self, key: Hashable) -> int:
        return self._members[key].grant

    def _share(self, changed_by: Hashable) -> None:
        grants = self._allocate()
        for key, member in self._members.items():
            if grants[key] != member.grant:
                member.grant = grants[key]
                if key != changed_by:
                    member.on_grant_changed()

    def _allocate(self) -> dict[Hashable, int]:
        members = self._members
        wants = {key: m.want for key, m in members.items()}
        if self.memory_mb is None:
            return wants
        floors_mb = sum(m.floor * m.memory_mb for m in members.values())
        extra_mb = sum((m.want - m.floor) * m.memory_mb for m in members.values())
        room_mb = max(0, self.memory_mb - floors_mb)
        if extra_mb <= room_mb:
            return wants
        share = room_mb / extra_mb
        extras = {key: (m.want - m.floor) * share for key, m in members.items()}
        grants = {key: members[key].floor + math.floor(extra) for key, extra in extras.items()}
        left_mb = room_mb - sum((grants[k] - m.floor) * m.memory_mb for k, m in members.items())
        by_remainder = sorted(
            members, key=lambda k: (-(extras[k] - math.floor(extras[k])), members[k].name)
        )
        for key in by_remainder:
            member = members[key]
            if grants[key] < member.want and member.memory_mb <= left_mb:
                grants[key] += 1
                left_mb -= member.memory_mb
        return grants
