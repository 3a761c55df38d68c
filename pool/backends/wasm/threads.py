"""Guest threads: one per sandbox, demoted once busy, stopped before the interpreter exits.

wasmtime-py calls through ctypes, which releases the GIL, so parked and
running guests do not stall the event loop. A guest's thread is its own, not
a pool's: a busy guest's thread is demoted (``demote_thread``) and a daemon
that is not root can never raise it again, so it must never serve the next
sandbox. A thread costs ~0.1 ms to start, against the interpreter's 60 ms.

This is the one module that touches ``threading._register_atexit`` (private
API), for the reason given where it is called.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import structlog

log = structlog.get_logger("sandpool.wasm")

T = TypeVar("T")

# A busy guest (still running BUSY_AFTER_S after its request) has its thread
# moved to SCHED_IDLE at this nice value (the lowest weight), so it takes only
# CPU that the event loop and the other tiers' sandboxes leave idle
# (demote_thread). Before that, and while the interpreter starts, it runs at
# the daemon's own priority: a thread in SCHED_IDLE that holds the GIL (start-up
# and host functions are Python) would stall the event loop whenever the host is busy.
GUEST_NICE = 19


def start_worker(
    name: str, body: Callable[[], T], threads: set[threading.Thread]
) -> asyncio.Future[T]:
    """Run ``body`` on a new thread named ``name``; its result or error settles the future.

    The thread is in ``threads`` while it runs, so its owner can join it.
    Call from the event loop. Raises what ``Thread.start`` raises.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        try:
            result = body()
        except BaseException as e:  # reported to the loop, never lost
            _settle(loop, future, functools.partial(future.set_exception, e))
        else:
            _settle(loop, future, functools.partial(future.set_result, result))
        finally:
            threads.discard(thread)

    thread = threading.Thread(target=run, name=name)
    threads.add(thread)
    try:
        thread.start()
    except BaseException:
        threads.discard(thread)
        raise
    return future


def _settle(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], settle: Callable[[], None]
) -> None:
    """From a worker thread: resolve its future on the loop (gone loop: nobody waits)."""

    def settle_once() -> None:
        if not future.done():
            settle()

    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(settle_once)


def demote_thread(thread_id: int | None) -> None:
    """Put a busy guest's thread in SCHED_IDLE at nice GUEST_NICE. Never raises.

    Guests run on the daemon's own threads, and a busy one would otherwise
    take CPU from the event loop and the other tiers as an equal. Both are
    per-thread attributes on Linux, and lowering another thread of the same
    process needs no privilege. SCHED_IDLE rather than nice alone: the kernel
    preempts a SCHED_IDLE thread at once when any other thread wakes, while a
    nice-19 one keeps the CPU for the rest of its slice (EEVDF), and that wait
    is on every hop of a request; see docs/wasm-limits.md for both measured.
    Nice is set first, so a kernel that refuses SCHED_IDLE still leaves the
    lowest weight. The thread ends with its sandbox (start_worker).
    """
    if thread_id is None:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, thread_id, GUEST_NICE)
        os.sched_setscheduler(thread_id, os.SCHED_IDLE, os.sched_param(0))
    except OSError as e:  # the thread has just ended (ESRCH), or a kernel without it
        if e.errno != errno.ESRCH:
            log.warning("wasm_priority_not_lowered", error=e.strerror)


class Stoppable(Protocol):
    def stop_at_exit(self) -> None:
        """Make the guest's thread return now; runs on the exiting thread, without a loop."""


_live: weakref.WeakSet[Stoppable] = weakref.WeakSet()


def stop_at_interpreter_exit(guest: Stoppable) -> None:
    """Remember ``guest`` (weakly) to stop it if the interpreter exits while it lives."""
    _live.add(guest)


def _stop_all_guests() -> None:
    """Last line of defence at interpreter exit: a thread inside wasmtime aborts it."""
    for guest in list(_live):
        guest.stop_at_exit()


# Threading's exit hooks run before the executor's join of its workers (in
# reverse order of registration), which would otherwise wait on parked guests;
# atexit hooks run only after those joins. A private API, hence the getattr.
_register_atexit: Any = getattr(threading, "_register_atexit", None)
if _register_atexit is not None:
    _register_atexit(_stop_all_guests)
