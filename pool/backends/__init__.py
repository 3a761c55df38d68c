"""Backends by name, imported lazily so an optional dependency stays optional."""

from __future__ import annotations

import importlib
from typing import Any

from pool.backends.base import Backend
from pool.config import PoolConfig
from pool.uids import HOST_UID_BACKENDS, SandboxUids

BACKENDS = {
    "docker": "pool.backends.docker:DockerBackend",
    "fake": "pool.backends.fake:FakeBackend",
    "process": "pool.backends.process:ProcessBackend",
    "wasm": "pool.backends.wasm:WasmBackend",
}


def create_backend(config: PoolConfig, instance_id: str, uids: SandboxUids) -> Backend[Any]:
    """Build the backend named by ``config.backend`` for one pool."""
    module_name, _, class_name = BACKENDS[config.backend].partition(":")
    backend_class = getattr(importlib.import_module(module_name), class_name)
    if config.backend in HOST_UID_BACKENDS:
        backend: Backend[Any] = backend_class(config, instance_id, uids=uids)
    else:
        backend = backend_class(config, instance_id)
    return backend
