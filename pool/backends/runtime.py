"""What runs in a pool's sandboxes: the language's version and key packages.

Reported per pool in ``GET /v1/pools``, as Piston's ``/runtimes`` does, so a
caller can see which pool has pandas before it sends code there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import structlog

from pool.errors import ImageBuildError
from pool.image import runtime_info

log = structlog.get_logger("sandpool.runtime")

INTERPRETERS = {"python": "python3", "shell": "python3", "javascript": "node"}


@dataclass(frozen=True, slots=True)
class Runtime:
    version: str = "unknown"  # e.g. "3.11.2", "v18.19.0"
    packages: Mapping[str, str] = field(default_factory=dict)  # distribution -> version


async def image_runtime(language: str, image: str) -> Runtime:
    """From the runtime label ``sandpool image build`` puts on ``image``; "unknown"
    for an image built elsewhere. Never raises: a pool serves without it."""
    try:
        info = await runtime_info(image)
    except ImageBuildError as e:
        log.warning("runtime_unknown", image=image, error=e.message)
        return Runtime()
    interpreters = info.get("interpreters") or {}
    packages = info.get("packages") or {}
    version = interpreters.get(INTERPRETERS.get(language, ""), "unknown")
    return Runtime(
        version=str(version),
        packages={str(k): str(v) for k, v in packages.items()} if isinstance(packages, dict)
        else {},
    )
