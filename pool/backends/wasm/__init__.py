"""The wasm backend: CPython compiled to WASI, run by wasmtime in the daemon's process.

Exports ``WasmBackend`` and ``WasmSandbox``, imported on first use: the
scratch helper runs as ``python -m pool.backends.wasm.scratch``, which imports
this package first, and must start without loading wasmtime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pool.backends.wasm.backend import WasmBackend, WasmSandbox

__all__ = ["WasmBackend", "WasmSandbox"]


def __getattr__(name: str) -> object:
    if name in __all__:
        return getattr(importlib.import_module("pool.backends.wasm.backend"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
