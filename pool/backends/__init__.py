"""Pools by backend name; each backend is imported only when a pool uses it,
so an optional dependency (aiodocker, wasmtime) stays optional."""

from __future__ import annotations

from collections.abc import Callable

from metrics import Metrics
from pool.config import PoolConfig
from pool.manager import Activity, Pool, PoolHandle
from pool.quotas import Holders
from pool.uids import SandboxUids

# A pool's config, the daemon's instance id, the host uids and the counts its
# pools share (both one for the whole daemon), its metrics and activity.
PoolFactory = Callable[[PoolConfig, str, SandboxUids, Holders, Metrics, Activity], PoolHandle]


def _docker(
    config: PoolConfig, instance_id: str, uids: SandboxUids, holders: Holders, metrics: Metrics,
    activity: Activity,
) -> PoolHandle:
    from pool.backends.docker import DockerBackend

    backend = DockerBackend(config, instance_id, uids=uids, holders=holders)
    return Pool(config, backend, metrics, activity)


def _process(
    config: PoolConfig, instance_id: str, uids: SandboxUids, holders: Holders, metrics: Metrics,
    activity: Activity,
) -> PoolHandle:
    from pool.backends.process import ProcessBackend

    backend = ProcessBackend(config, instance_id, uids=uids, holders=holders)
    return Pool(config, backend, metrics, activity)


def _fork(
    config: PoolConfig, instance_id: str, uids: SandboxUids, holders: Holders, metrics: Metrics,
    activity: Activity,
) -> PoolHandle:
    from pool.backends.fork import ForkBackend

    backend = ForkBackend(config, instance_id, uids=uids, holders=holders)
    return Pool(config, backend, metrics, activity)


def _wasm(
    config: PoolConfig, instance_id: str, uids: SandboxUids, holders: Holders, metrics: Metrics,
    activity: Activity,
) -> PoolHandle:
    from pool.backends.wasm import WasmBackend  # wasm sandboxes hold no host uid

    return Pool(config, WasmBackend(config, instance_id), metrics, activity)


def _fake(
    config: PoolConfig, instance_id: str, uids: SandboxUids, holders: Holders, metrics: Metrics,
    activity: Activity,
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
    config: PoolConfig, instance_id: str, uids: SandboxUids, holders: Holders, metrics: Metrics,
    activity: Activity,
) -> PoolHandle:
    """The pool of ``config``, on the backend its ``backend`` key names."""
    return BACKENDS[config.backend](config, instance_id, uids, holders, metrics, activity)
