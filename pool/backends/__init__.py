"""Pools by backend name; each backend is imported only when a pool uses it,
so an optional dependency (aiodocker, wasmtime) stays optional."""

from __future__ import annotations

from collections.abc import Callable

from metrics import Metrics
from pool.config import PoolConfig
from pool.manager import Activity, Pool, PoolHandle
from pool.uids import SandboxUids

PoolFactory = Callable[[PoolConfig, str, SandboxUids, Metrics, Activity], PoolHandle]


def _docker(
    config: PoolConfig, instance_id: str, uids: SandboxUids, metrics: Metrics, activity: Activity
) -> PoolHandle:
    from pool.backends.docker import DockerBackend

    return Pool(config, DockerBackend(config, instance_id, uids=uids), metrics, activity)


def _process(
    config: PoolConfig, instance_id: str, uids: SandboxUids, metrics: Metrics, activity: Activity
) -> PoolHandle:
    from pool.backends.process import ProcessBackend

    return Pool(config, ProcessBackend(config, instance_id, uids=uids), metrics, activity)


def _fork(
    config: PoolConfig, instance_id: str, uids: SandboxUids, metrics: Metrics, activity: Activity
) -> PoolHandle:
    from pool.backends.fork import ForkBackend

    return Pool(config, ForkBackend(config, instance_id, uids=uids), metrics, activity)


def _wasm(
    config: PoolConfig, instance_id: str, uids: SandboxUids, metrics: Metrics, activity: Activity
) -> PoolHandle:
    from pool.backends.wasm import WasmBackend  # wasm sandboxes hold no host uid

    return Pool(config, WasmBackend(config, instance_id), metrics, activity)


def _fake(
    config: PoolConfig, instance_id: str, uids: SandboxUids, metrics: Metrics, activity: Activity
) -> PoolHandle:
    from pool.backends.fake import FakeBackend

    return Pool(config, FakeBackend(config, instance_id), metrics, activity)


BACKENDS: dict[str, PoolFactory] = {
    "docker": _docker,
    "fake": _fake,
    "fork": _fork,
    "process": _process,
    "wasm": _wasm,
}


def create_pool(
    config: PoolConfig, instance_id: str, uids: SandboxUids, metrics: Metrics, activity: Activity
) -> PoolHandle:
    """The pool of ``config``, on the backend its ``backend`` key names."""
    return BACKENDS[config.backend](config, instance_id, uids, metrics, activity)
