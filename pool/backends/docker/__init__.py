"""The Docker backend: hardened single-use containers with a pre-warmed runner.

Split by concern: ``backend.py`` the lifecycle (start, run, destroy, sweep and
reap), ``channel.py`` the wire spoken over one container's attached stream,
``definition.py`` the hardened container definition and its labels,
``ownership.py`` which daemon owns a container, ``events.py`` dockerd's events,
``engine.py`` the only use of aiodocker's private API.
"""

from pool.backends.docker.backend import DockerBackend, DockerSandbox
from pool.backends.docker.definition import LABEL_INSTANCE, LABEL_OWNER, LABEL_POOL
from pool.backends.docker.ownership import owner_alive, owner_label

__all__ = [
    "LABEL_INSTANCE",
    "LABEL_OWNER",
    "LABEL_POOL",
    "DockerBackend",
    "DockerSandbox",
    "owner_alive",
    "owner_label",
]
