"""One wasm sandbox: a guest parked on its own thread, and what the loop holds for it."""

from __future__ import annotations

import asyncio
import contextlib
import threading

from pool.backends.base import Sandbox
from pool.backends.wasm.channel import GuestChannel, GuestExit
from pool.backends.wasm.epoch import Guest
from pool.backends.wasm.scratch import Scratch


class WasmSandbox(Sandbox):
    """One parked instance; the event loop owns its channel, the worker its Store."""

    def __init__(
        self,
        sandbox_id: str,
        loop: asyncio.AbstractEventLoop,
        guest: Guest,
        channel: GuestChannel,
    ) -> None:
        super().__init__(sandbox_id)
        self.guest = guest
        self.channel = channel
        self.scratch: Scratch | None = None  # made by the worker thread
        self._loop = loop
        # Set as soon as _start returns, before the worker drops the Store.
        self.exited: asyncio.Future[GuestExit] = loop.create_future()
        self.worker: asyncio.Future[GuestExit] | None = None
        self.thread_id: int | None = None  # the worker's native id, for demote_thread
        # Set when the pool destroys it: a guest that ran a request keeps its Store
        # until then, so the Store's drop is not on the answer's path.
        self.released = threading.Event()

    def report_exit(self, outcome: GuestExit) -> None:
        """Called by the worker thread when the guest has ended."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            self._loop.call_soon_threadsafe(_resolve, self.exited, outcome)

    def kill(self) -> None:
        """On the loop: stop the guest. Idempotent.

        A parked guest is in a blocking read: EOF ends it; a running one
        traps on the epoch or leaves poll_oneoff on the kill event.
        """
        self.guest.kill()
        self.channel.close_stdin()

    def stop_at_exit(self) -> None:
        """``kill`` from the interpreter's exit hook, where no event loop runs any more."""
        self.released.set()
        self.guest.kill()
        self.channel.close_stdin_at_exit()

    def how_it_ended(self) -> str:
        """The guest's exit status or trap, or the worker's error: for error messages."""
        if self.exited.done():
            return self.exited.result().describe()
        worker = self.worker
        if worker is None or not worker.done() or worker.cancelled():
            return "unknown"
        error = worker.exception()
        if error is not None:
            return str(error)
        return worker.result().describe()


def _resolve(future: asyncio.Future[GuestExit], outcome: GuestExit) -> None:
    if not future.done():
        future.set_result(outcome)
