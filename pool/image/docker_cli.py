"""The build's steps through the ``docker`` command: import, smoke test, inspect, remove.

The build runs the docker CLI rather than the engine's API because ``docker
import`` reads the root file system from a pipe that ``tar`` or ``docker export``
writes, with no temporary archive on disk. Every call has a timeout.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from pool.errors import ImageBuildError
from pool.image.processes import Completed, pipe, run
from pool.image.progress import Clock
from pool.image.recipe import Profile, Recipe, import_changes

DOCKER_QUERY_TIMEOUT_S = 60.0
DOCKER_PULL_TIMEOUT_S = 900.0
DOCKER_IMPORT_TIMEOUT_S = 900.0
SMOKE_TEST_TIMEOUT_S = 120.0


async def tar_into_docker(
    producer: list[str],
    *,
    source: str,
    what: str,
    recipe: Recipe | None = None,
    runtime: dict[str, Any] | None = None,
) -> str:
    """Pipe ``producer``'s tar stream into ``docker import`` with the settings and
    labels of ``recipe`` and ``runtime`` (see ``import_changes``), and return the new image
    id. The image is untagged: a producer failing halfway must not leave a truncated
    image under the final tag.

    Raises ``ImageBuildError`` naming ``what`` when the producer fails, or the import.
    """
    importer = ["docker", "import"]
    for change in import_changes(source, recipe, runtime):
        importer += ["--change", change]
    importer.append("-")
    produced, imported = await pipe(producer, importer, timeout_s=DOCKER_IMPORT_TIMEOUT_S)
    image_id = imported.stdout.strip()
    if produced.returncode != 0 or imported.returncode != 0 or not image_id:
        if image_id:
            await asyncio.shield(remove_image(image_id))
        if produced.returncode != 0:
            raise ImageBuildError(f"{what} failed: {produced.last_error_line}")
        raise ImageBuildError(f"docker import failed: {imported.last_error_line}")
    return image_id


async def smoke_test(image_id: str, profile: Profile) -> None:
    """Run ``profile``'s checks the way the pool runs sandboxes: no network, a
    read-only root with a writable /tmp.

    Raises ``ImageBuildError`` when the image cannot run one.
    """
    checks = [["python3", "-c", profile.python_check]]
    if profile.node_check is not None:
        checks.append(["node", "-e", profile.node_check])
    for check in checks:
        name = f"sandpool-check-{uuid.uuid4().hex[:12]}"
        argv = [
            "docker", "run", "--name", name, "--label", "sandpool.build=1",
            "--network", "none", "--read-only", "--tmpfs", "/tmp",
            image_id, *check,
        ]  # fmt: skip
        try:
            result = await run(argv, timeout_s=SMOKE_TEST_TIMEOUT_S, what="docker run")
        finally:
            await asyncio.shield(remove_container(name))
        if result.returncode != 0:
            shown = check[2].splitlines()[-1] if check[0] == "python3" else check[2]
            raise ImageBuildError(
                f"the new image cannot run `{check[0]} {check[1]} '{shown}'`: "
                f"{result.last_error_line or f'exit status {result.returncode}'}"
            )


async def inspect_image(reference: str) -> dict[str, Any] | None:
    """``docker image inspect``'s entry for ``reference``, None if there is no such image.

    Raises ``ImageBuildError`` when the engine does not answer.
    """
    result = await run(
        ["docker", "image", "inspect", reference],
        timeout_s=DOCKER_QUERY_TIMEOUT_S,
        what="docker image inspect",
    )
    if result.returncode != 0:
        if "no such image" in result.stderr.lower():
            return None
        raise ImageBuildError(f"cannot talk to the Docker engine: {result.last_error_line}")
    found = json.loads(result.stdout)
    if not found:
        return None
    image: dict[str, Any] = found[0]
    return image


async def image_size_mb(image_id: str) -> float:
    image = await inspect_image(image_id)
    return float((image or {}).get("Size", 0)) / 1e6


async def retire_previous(previous_id: str, tag: str, clock: Clock) -> None:
    """Delete the image that ``tag`` named before, unless something still uses it."""
    result = await run(
        ["docker", "image", "rm", previous_id],
        timeout_s=DOCKER_QUERY_TIMEOUT_S,
        what="docker image rm",
    )
    if result.returncode != 0:
        clock.phase(f"kept the previous {tag} ({short_id(previous_id)}): {result.last_error_line}")


async def remove_stage_images(label: str, clock: Clock) -> None:
    """Delete the untagged images labelled ``label``: a multi-stage build's earlier
    stages, which the classic builder keeps (unused once the last stage copied
    from them) at every build. Best effort: a leftover is only disk space, and
    on a failed build the build's error is the one to report.

    A build of the same image running beside this one may lose its stage image
    before its last stage copies from it, and fail; two builds of one tag at
    once race for that tag anyway.
    """
    try:
        result = await run(
            ["docker", "image", "prune", "--force", "--filter", f"label={label}"],
            timeout_s=DOCKER_QUERY_TIMEOUT_S,
            what="docker image prune",
        )
    except ImageBuildError as e:
        clock.phase(f"kept the build's stage images ({label}): {e.message}")
        return
    if result.returncode != 0:
        clock.phase(f"kept the build's stage images ({label}): {result.last_error_line}")


async def remove_image(image_id: str) -> None:
    # Best effort on a failure path: the image is untagged, so a leftover is only
    # disk space, and the error that brought us here is the one to report.
    await run(
        ["docker", "image", "rm", "--force", image_id],
        timeout_s=DOCKER_QUERY_TIMEOUT_S,
        what="docker image rm",
    )


async def remove_container(name: str) -> None:
    """Remove container ``name`` if it exists; raises ``ImageBuildError`` if it cannot."""
    result = await run(
        ["docker", "rm", "--force", name], timeout_s=DOCKER_QUERY_TIMEOUT_S, what="docker rm"
    )
    if result.returncode != 0 and "no such container" not in result.stderr.lower():
        raise ImageBuildError(f"could not remove container {name}: {result.last_error_line}")


async def docker(args: list[str], *, what: str, input_bytes: bytes | None = None) -> Completed:
    """Run ``docker *args``; raises ``ImageBuildError`` naming ``what`` if it fails."""
    result = await run(
        ["docker", *args],
        timeout_s=DOCKER_QUERY_TIMEOUT_S,
        what=what,
        input_bytes=input_bytes,
    )
    if result.returncode != 0:
        raise ImageBuildError(f"{what} failed: {result.last_error_line}")
    return result


def short_id(image_id: str) -> str:
    return image_id.removeprefix("sha256:")[:12]
