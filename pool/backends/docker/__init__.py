"""The Docker backend: hardened single-use containers with a pre-warmed runner."""

from pool.backends.docker.backend import (
    LABEL_INSTANCE,
    LABEL_OWNER,
    LABEL_POOL,
    DockerBackend,
    DockerSandbox,
    owner_alive,
    owner_label,
)

__all__ = [
    "LABEL_INSTANCE",
    "LABEL_OWNER",
    "LABEL_POOL",
    "DockerBackend",
    "DockerSandbox",
    "owner_alive",
    "owner_label",
]
