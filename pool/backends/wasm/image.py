"""A pool's memory image: guests start with ``preload`` already imported, not by importing it.

A wasm guest's start is CPython's own start-up and the pool's imports; for
the datasci module with numpy, pandas and matplotlib that is seconds of CPU
per sandbox. At pool start one template guest pays it once: the runner's
``prepare_image`` runs in it through the module's ``turn`` export (a call
that returns, leaving the interpreter alive), and the pages of its linear
memory that differ from a fresh instance's are kept here. Each guest is then
a fresh instance of the same module with those pages written over its memory
(tens of ms), and ``turn`` runs the runner's ``serve_image``: the same ready
frame, request and outcome as a guest that started from scratch.

Why this is the whole state: a module is restorable
(``GuestModule.restorable``) only if linear memory is all a returned export
leaves behind. The datasci module's one mutable global is the shadow-stack
pointer, back at its initial value whenever an export returns; its table is
fixed (min = max), filled by its element segments (compiled C does not write
tables); WASI's own state (fds, preopens) lives in the host, and every guest
gets the template's preopens at the same numbers because both are made by
the same ``GuestRuntime.instantiate``. The template holds no other file open
(``wasm_runner.prepare_image`` checks). What the image cannot give each guest
of its own is what CPython fixes at start: the str/bytes hash secret is the
template's for every guest of the pool. Generators seeded at import are
reseeded by the runner before it reports ready.

wizer does this as a module rewrite; see docs/wasm-tier.md for why sandpool
does not use it.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import wasmtime

from pool.errors import BackendError

PAGE = 65536  # a wasm page
TURN = "turn"
HOST_ALLOC = "host_alloc"
IMAGE_MODULE = "_sandpool_wasm_runner"  # the runner, as a module the template keeps


@dataclass(frozen=True, slots=True)
class MemoryImage:
    """A template's linear memory as the runs of pages that differ from a fresh instance's."""

    pages: int
    runs: tuple[tuple[int, bytes], ...]  # (offset, contents), each a whole number of pages

    @property
    def size_bytes(self) -> int:
        """What the daemon holds for it."""
        return sum(len(contents) for _, contents in self.runs)

    def apply(self, store: wasmtime.Store, memory: wasmtime.Memory) -> None:
        """Make a fresh instance's memory the template's. Raises BackendError past the limit."""
        missing = self.pages - memory.size(store)
        if missing > 0:
            try:
                memory.grow(store, missing)
            except wasmtime.WasmtimeError:
                raise BackendError(
                    f"the pool's memory image needs {self.pages * PAGE >> 20} MiB of linear "
                    "memory, more than memory_mb"
                ) from None
        if memory.data_len(store) < self.pages * PAGE:  # the copy below trusts this bound
            raise BackendError("the guest's memory is smaller than the pool's memory image")
        # Straight from the image's bytes: Memory.write would copy each run once more.
        base = ctypes.addressof(memory.data_ptr(store).contents)
        for offset, contents in self.runs:
            ctypes.memmove(base + offset, contents, len(contents))


def diff(fresh: bytes, template: bytes) -> MemoryImage:
    """The image that turns memory ``fresh`` into ``template``: runs of differing pages.

    Pages past ``fresh`` are compared with zeros, what ``memory.grow`` gives.
    """
    runs: list[tuple[int, bytes]] = []
    start: int | None = None
    zeros = bytes(PAGE)
    for offset in range(0, len(template), PAGE):
        before = fresh[offset:offset + PAGE]
        differs = before + zeros[len(before):] != template[offset:offset + PAGE]
        if differs and start is None:
            start = offset
        elif not differs and start is not None:
            runs.append((start, template[start:offset]))
            start = None
    if start is not None:
        runs.append((start, template[start:]))
    return MemoryImage(pages=len(template) // PAGE, runs=tuple(runs))


def exports_turn(module: wasmtime.Module) -> bool:
    """Whether the module has the calls an image needs: ``turn``, ``host_alloc``, ``memory``."""
    names = {export.name for export in module.exports}
    return {TURN, HOST_ALLOC, "memory"} <= names


def turn(store: wasmtime.Store, instance: wasmtime.Instance, code: str) -> int:
    """Run ``code`` in the guest's interpreter through ``turn``; its value (0: no exception).

    Raises what wasmtime raises (ExitTrap when the code exits).
    """
    exports = instance.exports(store)
    alloc, call, memory = exports[HOST_ALLOC], exports[TURN], exports["memory"]
    assert isinstance(alloc, wasmtime.Func)
    assert isinstance(call, wasmtime.Func)
    assert isinstance(memory, wasmtime.Memory)
    data = code.encode()
    where = alloc(store, len(data))
    assert isinstance(where, int)
    where &= 0xFFFFFFFF
    if where == 0 or where + len(data) > memory.data_len(store):
        raise BackendError("the guest could not take the runner's call")
    memory.write(store, data, where)
    value = call(store, where, len(data))
    return value if isinstance(value, int) else 0


def template_code(runner_path: str, preload: tuple[str, ...]) -> str:
    """What the template runs: the runner as a module it keeps, prepared with ``preload``."""
    return (
        "import sys, types\n"
        f"runner = types.ModuleType({IMAGE_MODULE!r})\n"
        f"runner.__file__ = {runner_path!r}\n"
        "sys.modules[runner.__name__] = runner\n"
        "with open(runner.__file__) as source:\n"
        "    exec(compile(source.read(), runner.__file__, 'exec'), runner.__dict__)\n"
        f"runner.prepare_image({list(preload)!r})\n"
        # The first turn puts the script named in WASI's argv on sys.path;
        # `python3 -I` (how a guest runs without an image) puts nothing there.
        "sys.path[:] = [entry for entry in sys.path if entry != runner.__file__]\n"
        "del runner, source, types\n"
    )


SERVE_CODE = f"__import__('sys').modules[{IMAGE_MODULE!r}].serve_image()\n"

