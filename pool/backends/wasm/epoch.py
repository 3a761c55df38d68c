"""Stopping and pacing guests from wasmtime's epoch deadline callback.

Every Store's epoch deadline is one tick away, and its deadline callback
(``_on_epoch_deadline``, on the guest's own thread) traps the guest only if
its own kill event is set; else, once the guest is busy, it holds it to its
CPU share (``CpuMeter``) and makes it yield to contended CPU (``Courtesy``),
and extends by one tick. Killing a guest sets its event and bumps the
engine's epoch; while a killed guest still holds its Store, or a busy one
runs, a ticker thread (``Ticker``) bumps the epoch every ``EPOCH_TICK_S``, so
a kill lost to a race still lands within a tick. A tick the GIL delays costs nothing,
since the deadline is not counted in ticks. Epochs only stop wasm code: host
calls a guest can block in wait on the kill event instead (``wasi.py``).

This is the one module that touches wasmtime's private API
(``wasmtime._bindings``): wasmtime-py does not wrap the C API's per-store
epoch deadline callback, so it is reached through the package's own ctypes
bindings; the tests' timeouts fail if a wasmtime-py release changes them.
"""

from __future__ import annotations

import ctypes
import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

import wasmtime
from wasmtime import _bindings as wasmtime_bindings

# While a kill is pending, how often every running guest's deadline callback
# runs (a Python call of ~60 us each): bounds how late a kill lands if it raced
# a callback that was extending the deadline.
EPOCH_TICK_S = 0.05
# A guest with cpus < 1 is held (CpuMeter) once it has used more CPU than
# cpus x the wall time of its run; unused share saved while it waits (on
# sleep or I/O) buys at most this much wall time of full speed later.
CPU_BURST_S = 0.1

# A busy guest that waited for a core this part of the time since its last
# tick had the CPU wanted by someone else (Courtesy)...
CONTENDED_SHARE = 0.1
# ... and it steps aside once that held this many ticks in a row: its own
# pool's refill or a burst of the daemon's work contends one tick, and a wait
# for it would only slow the guest on a quiet host.
CONTENDED_TICKS = 2
# The longest a busy guest waits at once while the CPU stays contended, in
# ticks: it still gets a tick in every YIELD_MAX_TICKS + 1, never starves.
YIELD_MAX_TICKS = 8

_guest_keys = itertools.count(1)  # never 0: the callback reads a null key as "none"


class CpuMeter:
    """The pool's ``cpus`` for one guest thread: a share of one core, kept on average.

    Linux has no per-thread CPU quota outside cgroup v2's threaded mode, and a
    guest is a thread of the daemon. So the guest holds itself: from the epoch
    deadline callback, which runs on the guest's own thread at every tick,
    ``check`` compares the thread's CPU time with ``share`` x the wall time
    since the last check and, once the guest is ahead, waits out the
    difference. Like a CFS quota it is an average, exact to one tick: the
    ticker ticks every EPOCH_TICK_S while a busy guest runs, and the CPU
    used between two ticks is paid back at the next.
    Invariant: ``credit`` (seconds of CPU the guest may still use at full
    speed) is at most share x CPU_BURST_S, so a guest that slept gains no more.
    """

    def __init__(self, share: float) -> None:
        self.share = share
        self.credit = 0.0
        self._last: tuple[float, float] | None = None  # (monotonic, thread CPU) at the last check

    def check(self, wait: Callable[[float], object]) -> None:
        """On the guest's thread: wait (``wait(seconds)``) until the guest is within its share."""
        now, used = time.monotonic(), time.thread_time()
        if self._last is not None:
            wall_before, cpu_before = self._last
            earned = self.share * (now - wall_before) - (used - cpu_before)
            self.credit = min(self.credit + earned, self.share * CPU_BURST_S)
            if self.credit < 0:
                wait(-self.credit / self.share)
                self.credit = 0.0  # the wait earned exactly the debt back
                now = time.monotonic()
        self._last = (now, time.thread_time())


# The calling thread's scheduler statistics: CPU time, time waiting runnable
# for a core, time slices (ns). A kernel without CONFIG_SCHED_INFO has none.
SCHEDSTAT = "/proc/thread-self/schedstat"


_UNREADABLE = (OSError, IndexError, ValueError)  # what reading SCHEDSTAT can raise


def _read_run_delay_s() -> float:
    """The calling thread's wait for a core so far, from SCHEDSTAT; raises _UNREADABLE."""
    with open(SCHEDSTAT, "rb") as f:
        return int(f.read().split()[1]) / 1e9


def own_run_delay_s() -> float:
    """How long the calling thread has waited, runnable, for a core since it
    started (SCHEDSTAT; 0.0 where the kernel does not keep it: see
    ``courtesy_unavailable``)."""
    try:
        return _read_run_delay_s()
    except _UNREADABLE:
        return 0.0


def courtesy_unavailable() -> str | None:
    """Why busy guests cannot step aside on this host (Courtesy), or None.
    Blocking (a procfs read)."""
    try:
        _read_run_delay_s()
    except _UNREADABLE as e:
        return f"cannot read the threads' run delay from {SCHEDSTAT}: {e}"
    return None


class Courtesy:
    """A busy guest takes only CPU nothing else of the host wants now.

    The other tiers' busy code runs in ``cpu.idle`` cgroups; a guest cannot,
    being a thread of the daemon: a thread the scheduler starves while it wants
    the GIL (its host functions, its end) would stall the event loop (see
    docs/security.md, "The daemon stands above its sandboxes"). So the guest
    steps aside itself, from the epoch deadline callback, where it holds the
    GIL at its ordinary standing and waits without it. The sign: its own
    thread waited for a core (``own_run_delay_s``) more than CONTENDED_SHARE
    of the time since its last tick, CONTENDED_TICKS ticks in a row. Then it
    waits, one tick the first time and twice as long at each contended tick
    after, up to YIELD_MAX_TICKS; an uncontended tick starts over. On an idle
    host a busy guest runs at full speed.
    """

    def __init__(self, run_delay: Callable[[], float] = own_run_delay_s,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._run_delay = run_delay
        self._clock = clock
        self._streak = 0  # contended ticks in a row
        self._ticks = 0  # the last wait, in ticks; 0: none in this streak
        self._last: tuple[float, float] | None = None  # (clock, run delay) when it last ran on

    def check(self, wait: Callable[[float], object]) -> None:
        """On the guest's thread: wait (``wait(seconds)``) if the CPU stays contended."""
        now, delay = self._clock(), self._run_delay()
        if self._last is not None and (
            delay - self._last[1] > CONTENDED_SHARE * (now - self._last[0])
        ):
            self._streak += 1
        else:
            self._streak = self._ticks = 0
        if self._streak >= CONTENDED_TICKS:
            self._ticks = min(2 * self._ticks or 1, YIELD_MAX_TICKS)
            wait(self._ticks * EPOCH_TICK_S)
            now, delay = self._clock(), self._run_delay()  # the wait is not the guest's delay
        self._last = (now, delay)


class Guest:
    """What a guest's worker thread shares with the event loop. Holds no Store.

    ``clock_origin_ns`` is the host's monotonic time when WASI's monotonic
    clock read 0 (set at instantiation, read by ``wasi.poll_oneoff``).
    """

    def __init__(
        self, engine: wasmtime.Engine, nudge_ticker: Callable[[], None], cpus: float
    ) -> None:
        self.killed = threading.Event()
        self.engine = engine
        self.nudge_ticker = nudge_ticker
        self.clock_origin_ns = 0
        self.key = next(_guest_keys)  # how the epoch callback finds this guest
        # One thread cannot use more than a core: only a smaller share is metered.
        self.cpu_meter = CpuMeter(cpus) if cpus < 1 else None
        self.courtesy = Courtesy()
        self.busy = False  # True while its request runs past BUSY_AFTER_S; the ticker ticks

    def become_busy(self) -> None:
        """The request is still running BUSY_AFTER_S in: from now on, at every
        tick, hold the guest to its CPU share and to what the host spares."""
        self.busy = True
        self.nudge_ticker()

    def kill(self) -> None:
        """Stop the guest at its next wasm instruction or host wait. Thread-safe, idempotent."""
        self.killed.set()
        # Every running guest of the engine reaches its deadline callback now;
        # only this one's says stop.
        self.engine.increment_epoch()
        self.nudge_ticker()


# wasmtime._bindings: see the module docstring.
_EpochCallback: Any = wasmtime_bindings._wasmtime_store_epoch_deadline_callback.argtypes[1]
_UPDATE_DEADLINE_CONTINUE = 0
_epoch_guests: dict[int, Guest] = {}  # key -> guest whose Store is alive


def _on_epoch_deadline(context: Any, key: Any, delta: Any, kind: Any) -> int:
    """Trap the guest if it was killed, else pace it if busy and run one more tick.

    Runs on the guest's thread. Never raises.
    """
    try:
        guest = _epoch_guests.get(key or 0)
        if guest is not None and guest.busy:
            # A kill ends either wait at once.
            if guest.cpu_meter is not None:
                guest.cpu_meter.check(guest.killed.wait)
            guest.courtesy.check(guest.killed.wait)
        if guest is not None and not guest.killed.is_set():
            delta[0] = 1
            kind[0] = _UPDATE_DEADLINE_CONTINUE
            return 0
    except Exception:
        pass  # an unknown state is a stop, below
    error = wasmtime_bindings.wasmtime_error_new(b"stopped by sandpool")
    return ctypes.cast(error, ctypes.c_void_p).value or 0


# The C function pointer wasmtime calls; a module global, so it outlives every Store.
_EPOCH_DEADLINE_CALLBACK = _EpochCallback(_on_epoch_deadline)
_NO_FINALIZER = wasmtime_bindings._wasmtime_store_epoch_deadline_callback.argtypes[3](
    lambda key: None
)


class Ticker:
    """Bumps an engine's epoch every EPOCH_TICK_S while a killed guest still holds
    a Store or a busy guest runs.

    Asleep otherwise: 20 wake-ups a second, each taking the GIL from the event
    loop, were most of the daemon's idle CPU with a warm wasm pool.
    """

    def __init__(self, engine: wasmtime.Engine, name: str) -> None:
        self._engine = engine
        self._stopped = threading.Event()
        self._nudged = threading.Event()
        self._thread = threading.Thread(target=self._tick, name=name, daemon=True)
        self._thread.start()

    def nudge(self) -> None:
        """A guest was killed or became busy, or such a guest got its Store: tick
        until none is left."""
        self._nudged.set()

    def _needed(self) -> bool:
        return any(
            (guest.killed.is_set() or guest.busy) and guest.engine is self._engine
            for guest in list(_epoch_guests.values())
        )

    def _tick(self) -> None:
        while True:
            self._nudged.wait()
            if self._stopped.is_set():
                return
            # Cleared before looking: a kill after the look nudges again.
            self._nudged.clear()
            while self._needed():
                self._engine.increment_epoch()
                if self._stopped.wait(EPOCH_TICK_S):
                    return

    def stop(self) -> None:
        self._stopped.set()
        self._nudged.set()
        self._thread.join()


def watch(store: wasmtime.Store, guest: Guest) -> None:
    """Give ``store`` a deadline one tick away that ``guest``'s state decides; until ``forget``."""
    store.set_epoch_deadline(1)
    _epoch_guests[guest.key] = guest
    if guest.killed.is_set():
        guest.nudge_ticker()  # killed before it was registered: the ticker must see it
    wasmtime_bindings.wasmtime_store_epoch_deadline_callback(
        store.ptr(), _EPOCH_DEADLINE_CALLBACK, guest.key, _NO_FINALIZER
    )


def forget(guest: Guest) -> None:
    """The guest's Store is gone: the ticker stops ticking for it."""
    _epoch_guests.pop(guest.key, None)
