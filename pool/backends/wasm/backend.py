"""The wasm backend's lifecycle: CPython compiled to WASI, run by wasmtime, pre-warmed.

How a sandbox lives, and why; each concern has a module of its own:

- At start the pool's module (the pinned default, a built-in such as
  ``datasci``, or the operator's own: ``modules.py``) is verified and compiled
  into a private cache once, then deserialized (``cache.py``); all sandboxes
  of a pool share its ``Engine`` and ``Module`` (``instance.py``).
- Each sandbox is one instance on a thread of its own (``threads.py``):
  instantiate + ``_start`` (a reactor's ``run``) of ``pool/wasm_runner.py``, which warms up,
  writes a ready frame and blocks reading its stdin pipe (``channel.py``).
  A module that allows it (the datasci one) is started and warmed once per
  pool instead, and each guest begins as a copy of that template's memory
  (``image.py``).
- A request is written on that pipe, and the output pipes are read against
  the cap (``channel.py``). The timeout is the event loop's (armed at
  hand-out, not at pre-start); it kills the guest through its epoch deadline
  (``epoch.py``), which also holds a guest to its pool's ``cpus``.
- ``Store.set_limits(memory_size=memory_mb)`` bounds the guest's linear
  memory, and a memory bomb ends as the guest's own ``MemoryError``: exit
  status 1 with its traceback, ``oom_killed`` false.
- Everything else the daemon holds for a guest is bounded per guest too: one
  worker thread (WASI preview 1 has no threads), at most
  ``GUEST_BASE_FDS + wasm_max_open_files`` fds (``wasi.OpenFiles``: past it
  the guest's open fails with EMFILE), ``poll_oneoff`` at
  MAX_POLL_SUBSCRIPTIONS, and scratch space on tmpfs mounts of ``tmpfs_mb``
  that live only as long as their fds (``scratch.py``: nothing on the host's
  disk, nothing left by a killed daemon). A pool starts only if its guests'
  worst case and DAEMON_FD_RESERVE fit under RLIMIT_NOFILE (``wasi.FdBudget``).
"""

from __future__ import annotations

import asyncio
import enum
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog
import wasmtime

from pool.backends.base import (
    BUSY_AFTER_S,
    BackendBase,
    RunRequest,
    RunResult,
    SandboxState,
    new_sandbox_id,
)
from pool.backends.runtime import Runtime
from pool.backends.wasm import epoch
from pool.backends.wasm.cache import compiled_module, engine_config, wasmtime_version
from pool.backends.wasm.channel import GuestExit, exit_code, open_pipes
from pool.backends.wasm.epoch import Guest, Ticker
from pool.backends.wasm.image import PAGE, MemoryImage, exports_turn
from pool.backends.wasm.instance import GuestRuntime, run_start
from pool.backends.wasm.modules import runtime_of, select_module
from pool.backends.wasm.sandbox import WasmSandbox
from pool.backends.wasm.scratch import Scratch, TmpfsSource
from pool.backends.wasm.threads import (
    demote_thread,
    start_worker,
    stop_at_interpreter_exit,
)
from pool.backends.wasm.wasi import TRAMPOLINE_WAT, fd_budget
from pool.config import PoolConfig
from pool.daemon_cpu import yield_guest_thread
from pool.errors import BackendError, SandboxLostError
from pool.guest import install as install_guest_programs
from pool.paths import cache_dir
from pool.runcode import out_dir_frames
from pool.wire import (
    DISPLAY,
    ERROR,
    EXIT,
    FILE_OUT,
    FrameDecoder,
    Outcome,
    OutcomeLimits,
    OutputCapture,
    WireError,
)

__all__ = ["WasmBackend", "WasmSandbox"]

log = structlog.get_logger("sandpool.wasm")

READY_TIMEOUT_S = 20.0  # pre-start measured ~65 ms; generous for a loaded 2-core host
# A finished guest's Store waits at most this long for its sandbox's destroy,
# which the pool starts within DESTROY_QUIET_WAIT_MAX_S of the answer.
RELEASE_WAIT_S = 5.0
JOIN_TIMEOUT_S = 10.0  # a stopped guest returns within one host call; this is a bug bound
INLINE_OUTCOME_BYTES = 256 * 1024  # read on the event loop below this (tmpfs: microseconds)
COMPILE_PROGRESS_S = 2.0


class Stop(enum.Enum):
    """Why the daemon stopped a run; a run it did not stop ended by itself."""

    TIMEOUT = "timeout"
    OUTPUT_CAP = "output_cap"


class WasmBackend(BackendBase[WasmSandbox]):
    """Runs one pool's sandboxes as pre-warmed wasmtime instances on worker threads."""

    name = "wasm"

    def __init__(self, config: PoolConfig, instance_id: str) -> None:
        super().__init__(config, instance_id)
        # Start-up jobs (hash, compile, deserialize). Guests do not run here:
        # each has a thread of its own that ends with it (threads.start_worker).
        self._executor = ThreadPoolExecutor(
            max_workers=2, thread_name_prefix=f"sandpool-wasm-{config.name}"
        )
        self._threads: set[threading.Thread] = set()
        self._runtime: GuestRuntime | None = None  # set once started, until closed
        self._ticker: Ticker | None = None
        self._tmpfs = TmpfsSource()
        self._sandboxes: set[WasmSandbox] = set()

    # --- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Verify the module, compile it into the cache if needed (logged), find a way to mount.

        Raises BackendError: module missing, unknown (``wasm_module_unknown``)
        or not the pinned one, cache
        unusable, the pool's fds do not fit under RLIMIT_NOFILE
        (``wasm_fd_budget``), no bounded scratch space (``wasm_scratch_unbounded``).
        """
        fd_budget.reserve(self, self.config)
        await self._tmpfs.start()
        log.info("wasm_scratch", pool=self.config.name, mounts=self._tmpfs.mode)
        if unavailable := await asyncio.to_thread(epoch.courtesy_unavailable):
            # Busy guests still run, held to cpus, but take their share of the
            # CPU from whoever wants it (docs/wasm-limits.md).
            log.warning("wasm_courtesy_unavailable", pool=self.config.name, reason=unavailable)
        guest_module = select_module(self.config.wasm_module)
        wasm_path = guest_module.path
        loop = asyncio.get_running_loop()
        module_sha256 = await loop.run_in_executor(self._executor, guest_module.verify)
        guest_dir = await loop.run_in_executor(self._executor, install_guest_programs)
        directory = cache_dir()
        compiling = threading.Event()

        def compile_module() -> Path:
            return compiled_module(
                wasm_path, module_sha256, directory, on_compile=compiling.set
            )

        began = time.monotonic()
        job = loop.run_in_executor(self._executor, compile_module)
        while True:
            done, _ = await asyncio.wait({job}, timeout=COMPILE_PROGRESS_S)
            if done:
                break
            if compiling.is_set():
                log.info(
                    "wasm_compiling",
                    pool=self.config.name,
                    module=str(wasm_path),
                    elapsed_s=round(time.monotonic() - began, 1),
                    note="first start only: the compiled module is cached",
                )
        artifact = job.result()
        if compiling.is_set():
            log.info(
                "wasm_compiled",
                pool=self.config.name,
                seconds=round(time.monotonic() - began, 1),
                cache=str(artifact),
            )
        engine = wasmtime.Engine(engine_config())
        module = await loop.run_in_executor(
            self._executor, wasmtime.Module.deserialize_file, engine, str(artifact)
        )
        trampoline = wasmtime.Module(engine, TRAMPOLINE_WAT)  # ~1 ms
        self._runtime = GuestRuntime(
            self.config, guest_module, engine, module, trampoline, guest_dir, self._tmpfs
        )
        self._ticker = Ticker(engine, name=f"sandpool-wasm-{self.config.name}-epoch")
        if guest_module.restorable and exports_turn(module):
            await self._capture_image(self._runtime, self._ticker)

    async def _capture_image(self, runtime: GuestRuntime, ticker: Ticker) -> None:
        """Prepare the runner once in a template guest; every guest then starts from its memory."""
        began = time.monotonic()
        template = Guest(runtime.engine, ticker.nudge, cpus=1)
        loop = asyncio.get_running_loop()
        try:
            image = await loop.run_in_executor(self._executor, runtime.capture_image, template)
        except BackendError as e:
            if e.code != "wasm_image_failed":
                raise
            # Guests then start as without an image: slower, and each says
            # what went wrong itself (a preload that does not import).
            log.warning("wasm_image_unusable", pool=self.config.name, error=e.message)
            return
        log.info(
            "wasm_image",
            pool=self.config.name,
            seconds=round(time.monotonic() - began, 1),
            memory_mb=image.pages * PAGE >> 20,
            held_mb=image.size_bytes >> 20,
        )

    async def close(self) -> None:
        """Stop every guest, join every worker thread, stop the tmpfs helper.

        The host interpreter must never exit while a thread is inside wasmtime
        (Rust aborts the process), so this waits for the threads.
        """
        for sandbox in list(self._sandboxes):
            sandbox.kill()
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        for thread in list(self._threads):
            await asyncio.to_thread(thread.join)
        if self._ticker is not None:
            await asyncio.to_thread(self._ticker.stop)
            self._ticker = None
        self._runtime = None
        await self._tmpfs.close()
        fd_budget.release(self)

    def version(self) -> str:
        return f"wasmtime {wasmtime_version()}"

    @property
    def image(self) -> MemoryImage | None:
        """The memory image this pool's guests start from, if it has one (``image.py``)."""
        return self._runtime.image if self._runtime is not None else None

    def runtime(self) -> Runtime:
        return runtime_of(self.config.wasm_module)

    async def ping(self) -> bool:
        # wasmtime runs in this process: it answers whenever the module is loaded.
        return self._runtime is not None

    # --- sandboxes ---------------------------------------------------------

    async def start_sandbox(self) -> WasmSandbox:
        runtime, ticker = self._runtime, self._ticker
        if runtime is None or ticker is None:
            raise BackendError("the wasm backend is not started")
        loop = asyncio.get_running_loop()
        channel, guest_fds = open_pipes()
        guest = Guest(runtime.engine, ticker.nudge, self.config.cpus)
        sandbox = WasmSandbox(new_sandbox_id(), loop, guest, channel)
        self._sandboxes.add(sandbox)
        stop_at_interpreter_exit(sandbox)
        try:
            sandbox.worker = start_worker(
                f"sandpool-wasm-{self.config.name}-{sandbox.id}",
                lambda: self._serve(runtime, sandbox, guest_fds),
                self._threads,
            )
        except BaseException:
            for fd in guest_fds:
                os.close(fd)
            await asyncio.shield(self.destroy_sandbox(sandbox))
            raise
        sandbox.worker.add_done_callback(lambda _: self._worker_ended(sandbox))
        ready = channel.await_ready(loop)
        either: set[asyncio.Future[Any]] = {ready, sandbox.worker}
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if not ready.done():
                raise BackendError(
                    f"the guest ended before it was ready: {sandbox.how_it_ended()}"
                )
            ready.result()
        except BaseException as e:
            if not ready.done():
                ready.cancel()
            elif not ready.cancelled():
                ready.exception()  # retrieved: the error below says it
            channel.stop_awaiting_ready(loop)
            await asyncio.shield(self.destroy_sandbox(sandbox))
            if isinstance(e, TimeoutError):
                raise BackendError(
                    f"the guest runner was not ready within {READY_TIMEOUT_S:g} s"
                ) from None
            if isinstance(e, BackendError):  # the worker has been joined: say why it ended
                raise BackendError(f"{e.message} ({sandbox.how_it_ended()})") from None
            raise
        return sandbox

    def _serve(
        self, runtime: GuestRuntime, sandbox: WasmSandbox, guest_fds: tuple[int, int, int]
    ) -> GuestExit:
        """Worker thread: instantiate, run ``_start`` (parks, then runs one request), drop.

        Every reference to the Store dies here, before returning, on every path:
        a Store kept alive by a traceback or a callback leaks ~3.5 MiB per run,
        and its drop is what closes the guest's ends of the output pipes.
        The thread keeps the daemon's priority until its run is busy
        (demote_thread): a starting guest holds the GIL much of the time.
        """
        sandbox.thread_id = threading.get_native_id()
        guest = sandbox.guest
        try:
            store, instance = runtime.instantiate(sandbox, guest_fds)
        except BaseException:
            epoch.forget(guest)
            raise
        finally:
            for fd in guest_fds:
                os.close(fd)  # wasmtime opened its own
        try:
            outcome = run_start(guest, store, instance, from_image=runtime.image is not None)
            sandbox.report_exit(outcome)
            if sandbox.state is SandboxState.BUSY:
                # Its request's answer is still being written: the drop (unmapping
                # tens of MiB of linear memory) waits for the destroy that follows
                # the answer; done at once it cost 0.5-0.8 ms of p50 (docs). A
                # guest that ended while idle drops at once: its death is reported
                # when this thread ends.
                sandbox.released.wait(RELEASE_WAIT_S)
        finally:
            # The frame may outlive this call in a traceback: keep no Store in it.
            del store, instance
            epoch.forget(guest)
        return outcome

    def _worker_ended(self, sandbox: WasmSandbox) -> None:
        worker = sandbox.worker
        assert worker is not None
        if not worker.cancelled() and worker.exception() is not None:
            log.warning("wasm_worker_failed", sandbox=sandbox.id, error=str(worker.exception()))
        self.report_died(sandbox)

    async def run(self, sandbox: WasmSandbox, request: RunRequest) -> RunResult:
        worker = sandbox.worker
        if (
            not sandbox.take_request() or worker is None or worker.done()
            or sandbox.exited.done()
        ):
            raise SandboxLostError(f"sandbox {sandbox.id} died while idle")
        loop = asyncio.get_running_loop()
        began = time.monotonic()
        stdin = request.stdin.encode("utf-8", "surrogatepass")
        limits = self.config.outcome_limits()
        # The stdin data follows the request raw: the guest reads it as its fd 0.
        guest_request = RunRequest(request.code, "", request.timeout_s, request.files,
                                   request.env, request.argv).to_guest(limits)
        try:
            sandbox.channel.send(guest_request.encode() + stdin)
        except OSError as e:
            raise SandboxLostError(f"sandbox {sandbox.id} did not take its request: {e}") from None
        capture = OutputCapture(self.config.max_output_bytes, request.output_listener)
        stopped: Stop | None = None  # set once, by whichever stop came first

        def stop_at_cap() -> None:
            nonlocal stopped
            if stopped is None:
                stopped = Stop.OUTPUT_CAP
                sandbox.kill()

        output = sandbox.channel.output(loop, capture, stop_at_cap)
        ended = {sandbox.exited, worker}
        moving: asyncio.Future[None] | None = None  # awaited before the run ends

        def still_running() -> None:
            # A guest still running BUSY_AFTER_S into its request is busy: it goes
            # below the daemon's threads and under its CPU share, and out of the
            # daemon's cgroup (pool/daemon_cpu.py). A short request meets none
            # of it (each would cost it a wake-up of another thread).
            nonlocal moving
            demote_thread(sandbox.thread_id)
            sandbox.guest.become_busy()
            if sandbox.thread_id is not None:
                moving = asyncio.ensure_future(
                    asyncio.to_thread(yield_guest_thread, sandbox.thread_id))

        busy = loop.call_later(BUSY_AFTER_S, still_running)
        try:
            try:
                async with asyncio.timeout(request.timeout_s):
                    await asyncio.wait(ended, return_when=asyncio.FIRST_COMPLETED)
            except TimeoutError:
                if stopped is None:
                    stopped = Stop.TIMEOUT
                sandbox.kill()
                async with asyncio.timeout(JOIN_TIMEOUT_S):
                    await asyncio.wait(ended, return_when=asyncio.FIRST_COMPLETED)
            execution_s = time.monotonic() - began
            # WASI writes are synchronous: once the guest has exited, all it
            # wrote is in the pipes. The Store is dropped after the destroy.
            output.drain()
        except TimeoutError:
            # Never seen: every host call a guest can block in ends on the kill.
            log.error("wasm_guest_did_not_stop", sandbox=sandbox.id, waited_s=JOIN_TIMEOUT_S)
            raise BackendError(f"sandbox {sandbox.id} did not stop") from None
        finally:
            busy.cancel()
            output.stop()
            if moving is not None:  # the thread lives on until the destroy: never a reused id
                await asyncio.shield(moving)
        if not sandbox.exited.done():
            raise BackendError(f"the wasm worker of sandbox {sandbox.id} failed: "
                               f"{sandbox.how_it_ended()}")
        code: int | None = None
        outcome: Outcome | None = None
        if stopped is None and not sandbox.guest.killed.is_set():
            scratch = sandbox.scratch
            code = exit_code(
                sandbox.exited.result(),
                scratch.read_status if scratch is not None else None,
                sandbox_id=sandbox.id,
            )
            if scratch is not None:
                # Usually no file at all (nothing to return) or a small one: a
                # tmpfs read on the loop; megabytes of files or figures in a thread.
                if scratch.outcome_size() + scratch.out_size() <= INLINE_OUTCOME_BYTES:
                    outcome = read_outcome(scratch, limits, sandbox.id)
                else:
                    outcome = await asyncio.to_thread(read_outcome, scratch, limits, sandbox.id)
        return RunResult.from_capture(
            capture,
            exit_code=code,
            timed_out=stopped is Stop.TIMEOUT,
            oom_killed=False,  # see the module docstring: MemoryError is the guest's claim
            execution_s=execution_s,
            outcome=outcome,
        )

    async def _join(self, sandbox: WasmSandbox) -> None:
        worker = sandbox.worker
        if worker is None:
            return
        try:
            async with asyncio.timeout(JOIN_TIMEOUT_S):
                await asyncio.wait({worker})
        except TimeoutError:
            # Never seen: every host call a guest can block in ends on the kill.
            log.error("wasm_guest_did_not_stop", sandbox=sandbox.id, waited_s=JOIN_TIMEOUT_S)
            raise BackendError(f"sandbox {sandbox.id} did not stop") from None

    async def destroy_sandbox(self, sandbox: WasmSandbox) -> None:
        if not sandbox.mark_destroyed():
            return
        sandbox.released.set()
        sandbox.kill()
        try:
            await self._join(sandbox)
        finally:
            sandbox.channel.close()
            self._sandboxes.discard(sandbox)
            if sandbox.scratch is not None:
                await asyncio.to_thread(sandbox.scratch.close)


def read_outcome(scratch: Scratch, limits: OutcomeLimits, sandbox_id: str) -> Outcome | None:
    """The guest's results and error (its outcome file), then its out/ as the host
    reads it from the guest's scratch, within ``limits``; None if the file is not one.

    The guest wrote the file (pool/wasm_runner.py) and may have forged it: a file
    the wire refuses gives no outcome at all, and never fails the run. out/ is
    read by the host itself, the guest having ended (pool/runcode.py's walk:
    symlinks never followed, nothing but regular files opened).
    """
    outcome = Outcome(limits)
    try:
        frames = FrameDecoder().feed(scratch.read_outcome(limits.frame_bytes()))
        claimed_file = False  # files come from the host's own walk, never the guest's word
        for kind, payload in frames:
            if kind in (FILE_OUT, DISPLAY, ERROR):
                claimed_file = kind == FILE_OUT
            if kind != EXIT and not claimed_file:
                outcome.add(kind, payload)
    except (OSError, WireError) as e:
        log.warning("wasm_outcome_refused", sandbox=sandbox_id, error=str(e))
        return None
    walk = FrameDecoder()
    for encoded in out_dir_frames(scratch.paths["sandbox"], limits):
        for kind, payload in walk.feed(encoded):
            outcome.add(kind, payload)
    return outcome
