"""The ``--from IMAGE`` recipe: flatten an existing image with python3 into a sandbox image.

For hosts that reach a registry or already hold such an image: create a stopped
container from it (pulling it first if it is not local), copy an empty
``/sandbox`` into it, and flatten it with ``docker export | docker import`` with
the same image settings as the default recipe.
"""

from __future__ import annotations

import asyncio
import io
import tarfile
import time
import uuid

from pool.errors import ImageBuildError
from pool.image.docker_cli import (
    DOCKER_PULL_TIMEOUT_S,
    docker,
    inspect_image,
    remove_container,
    tar_into_docker,
)
from pool.image.processes import run
from pool.image.progress import Clock
from pool.image.recipe import SANDBOX_DIR


async def import_from_base(base: str, clock: Clock) -> str:
    """Import ``base`` flattened, untagged, and return the new image id.

    Raises ``ImageBuildError`` with one readable line on any failure; the build
    container is removed on every exit path.
    """
    if await inspect_image(base) is None:
        clock.phase(f"pulling {base}")
        pulled = await run(
            ["docker", "pull", "--quiet", base],
            timeout_s=DOCKER_PULL_TIMEOUT_S,
            what="docker pull",
        )
        if pulled.returncode != 0:
            reason = pulled.last_error_line.removeprefix("Error response from daemon: ")
            raise ImageBuildError(
                f"base image {base!r} not found locally and could not be pulled"
                + (f" ({reason})" if reason else "")
            )
    container = f"sandpool-build-{uuid.uuid4().hex[:12]}"
    clock.phase(f"creating {container} from {base}")
    # The entrypoint is never run; `docker create` only needs some command.
    await docker(
        [
            "create",
            "--name",
            container,
            "--label",
            "sandpool.build=1",
            "--entrypoint",
            "python3",
            base,
        ],
        what="docker create",
    )
    try:
        await docker(
            ["cp", "-", f"{container}:/"],
            what="docker cp of /sandbox",
            input_bytes=sandbox_dir_tar(),
        )
        clock.phase(f"flattening {base} into a new image")
        return await tar_into_docker(
            ["docker", "export", container], source=base, what="docker export"
        )
    finally:
        await asyncio.shield(remove_container(container))


def sandbox_dir_tar() -> bytes:
    """A tar stream holding only an empty ``/sandbox`` owned by root, mode 1777."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        entry = tarfile.TarInfo(SANDBOX_DIR.lstrip("/"))
        entry.type = tarfile.DIRTYPE
        entry.mode = 0o1777
        entry.mtime = int(time.time())
        archive.addfile(entry)
    return buffer.getvalue()
