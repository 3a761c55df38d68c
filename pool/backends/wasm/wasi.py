"""WASI host functions the daemon puts in front of wasmtime's own, and the fds they bound.

Host functions never raise: wasmtime-py passes a host function's exception to
the caller through one module-global, which two guests on two threads would
mix up. Every error becomes a WASI errno instead.

- ``poll_oneoff`` (``time.sleep``, ``select``) waits on the guest's kill
  event instead of sleeping blindly: epochs stop only wasm code.
- ``OpenFiles`` caps the fds one guest makes the daemon hold; ``FdBudget``
  keeps every wasm pool's worst case, with a reserve for the daemon, under
  RLIMIT_NOFILE.
"""

from __future__ import annotations

import resource
import struct
import threading
import time
from collections.abc import Callable

import wasmtime

from pool.backends.wasm.epoch import Guest
from pool.config import PoolConfig
from pool.errors import BackendError

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

# Calls wasmtime's own WASI fd functions on behalf of OpenFiles: their caller
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

# File descriptors the daemon holds for one guest before it opens anything:
# its three pipes (both ends), the three scratch mounts and the status dir,
# and wasmtime's own opens of stdio and of the three preopened directories.
# Measured 13; the margin covers wasmtime's transient fds (a readdir's dup).
GUEST_BASE_FDS = 16
# What the daemon keeps for itself whatever the guests do: connections (the
# API's max_concurrent_requests), the other tiers' pipes and sockets, logs.
DAEMON_FD_RESERVE = 1024


def poll_oneoff(
    guest: Guest, caller: wasmtime.Caller, in_ptr: int, out_ptr: int, count: int, nevents_ptr: int
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
                clocks.append((guest.clock_origin_ns + timeout, userdata))
            elif clock_id == _CLOCK_REALTIME:
                clocks.append((now_ns + timeout - time.time_ns(), userdata))
            else:
                events.append(_EVENT.pack(userdata, _ERRNO_NOTSUP, tag, 0, 0))
        if not events:
            wait_ns = min(expiry for expiry, _ in clocks) - now_ns
            if wait_ns > 0 and guest.killed.wait(wait_ns / 1e9):
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


class OpenFiles:
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


class FdBudget:
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


fd_budget = FdBudget()
