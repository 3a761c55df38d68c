"""An image's root file system on the host, for the process (bubblewrap) tier.

The process tier runs from the same root file system as the Docker image of its
pool: ``export_rootfs`` flattens the image once into
``<state_dir>/rootfs/<image id>``, writable by its owner only (the process tier
binds it read-only). The directory appears by one
``rename`` of a complete staging directory, so a directory named by an image id is
always a complete export of it; an interrupted export leaves only a staging
directory, which the next export sweeps once its exporter is gone, with the
exports of images Docker no longer has.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import uuid
from pathlib import Path

from pool.errors import ImageBuildError
from pool.image.docker_cli import (
    DOCKER_IMPORT_TIMEOUT_S,
    DOCKER_QUERY_TIMEOUT_S,
    docker,
    inspect_image,
    remove_container,
)
from pool.image.processes import pipe, run
from pool.procfs import pid_alive

ROOTFS_SUBDIR = "rootfs"
STAGING_PREFIX = ".staging-"
# Docker adds these to every container; bubblewrap gives a sandbox its own /dev,
# and device nodes cannot be created by a non-root exporter anyway.
_EXCLUDED = ("dev/*", ".dockerenv")


async def export_rootfs(image: str, state_dir: Path) -> Path:
    """Return ``<state_dir>/rootfs/<image id>``: ``image``'s root file system, with
    no group or other write permission, exported now unless it already was.

    Exports of images Docker no longer has (a rebuilt tag's previous image) and
    staging directories of interrupted exports are removed. Call it before the
    sandboxes of a tier start from an export: it may remove an export a
    still-running sandbox of an older image uses.

    Raises ``ImageBuildError`` when there is no such image or the export fails;
    nothing is left under the image id then. Costs one ``docker image inspect``
    when the export exists; otherwise about as long as ``docker export`` takes to
    write the image's size to disk (a few seconds for the python image, ~20 s for
    datasci), and that much disk.
    """
    inspected = await inspect_image(image)
    if inspected is None:
        raise ImageBuildError(
            f"no image {image!r} to export: build it first (`sandpool image build`)"
        )
    image_id = str(inspected["Id"]).removeprefix("sha256:")
    exports = state_dir / ROOTFS_SUBDIR
    target = exports / image_id
    if not target.is_dir():
        await asyncio.to_thread(exports.mkdir, parents=True, exist_ok=True)
        await _export(image, image_id, exports)
    await _sweep(exports, keep=image_id)
    return target


async def _export(image: str, image_id: str, exports: Path) -> None:
    token = uuid.uuid4().hex[:12]
    # The exporter's pid in the name: a sweep removes only a dead exporter's staging.
    staging = exports / f"{STAGING_PREFIX}{image_id[:12]}-{os.getpid()}-{token}"
    container = f"sandpool-export-{token}"
    # The entrypoint is never run; `docker create` only needs some command.
    await docker(
        ["create", "--name", container, "--label", "sandpool.build=1",
         "--entrypoint", "/bin/true", image],
        what="docker create",
    )  # fmt: skip
    try:
        await asyncio.to_thread(staging.mkdir)
        extract = ["tar", "-x", "-C", str(staging), "--numeric-owner"]
        extract += [f"--exclude={pattern}" for pattern in _EXCLUDED]
        exported, extracted = await pipe(
            ["docker", "export", container], extract, timeout_s=DOCKER_IMPORT_TIMEOUT_S
        )
        if exported.returncode != 0:
            raise ImageBuildError(f"docker export of {image} failed: {exported.last_error_line}")
        if extracted.returncode != 0:
            raise ImageBuildError(
                f"unpacking {image} into {staging} failed: {extracted.last_error_line}"
            )
        await asyncio.to_thread(_clear_shared_write_bits, staging)
        await asyncio.to_thread(_publish, staging, exports / image_id)
    finally:
        await asyncio.shield(remove_container(container))
        await asyncio.shield(asyncio.to_thread(_remove_tree, staging))


def _clear_shared_write_bits(root: Path) -> None:
    """Clear the group and other write bits below ``root`` (symlinks have none of
    their own), so only the owner (root, when root exports) may change the export.

    The owner's bits stay as the image has them: a sandbox that copies a directory
    of the image (matplotlib's font cache, say) must get a writable copy in both
    tiers alike. The world-writable directories (/tmp, /sandbox) lose their
    write bits too; a sandbox mounts its own there.
    """
    for directory, subdirs, files in os.walk(root):
        for name in [*files, *subdirs]:
            path = os.path.join(directory, name)
            mode = os.lstat(path).st_mode
            if not stat.S_ISLNK(mode):
                os.chmod(path, stat.S_IMODE(mode) & ~0o022)
    os.chmod(root, stat.S_IMODE(os.lstat(root).st_mode) & ~0o022)


def _publish(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; another export may have won the race, and
    its complete copy is as good as ours."""
    try:
        os.rename(staging, target)
    except OSError:
        if not target.is_dir():
            raise


async def _sweep(exports: Path, *, keep: str) -> None:
    listed = await run(
        ["docker", "image", "ls", "--all", "--quiet", "--no-trunc"],
        timeout_s=DOCKER_QUERY_TIMEOUT_S,
        what="docker image ls",
    )
    if listed.returncode != 0:
        raise ImageBuildError(f"cannot list Docker's images: {listed.last_error_line}")
    present = {line.strip().removeprefix("sha256:") for line in listed.stdout.splitlines()}
    present.add(keep)
    await asyncio.to_thread(_remove_stale, exports, present)


def _remove_stale(exports: Path, present: set[str]) -> None:
    for entry in exports.iterdir():
        if entry.name.startswith(STAGING_PREFIX):
            if not _exporter_alive(entry.name):
                _remove_tree(entry)
        elif entry.name not in present:
            _remove_tree(entry)


def _exporter_alive(staging_name: str) -> bool:
    """Whether the process that named this staging directory still runs (so its
    export is in progress, maybe in another daemon). Unreadable names count as dead."""
    parts = staging_name.removeprefix(STAGING_PREFIX).split("-")
    return len(parts) == 3 and parts[1].isdigit() and pid_alive(int(parts[1]))


def _remove_tree(path: Path) -> None:
    """Remove an export or staging directory, making directories writable as
    needed (a non-root exporter owns the files, but an image may hold a
    directory without the owner's write bit)."""
    if not path.exists():
        return

    def make_writable_and_retry(function: object, failed: str, _error: object) -> None:
        os.chmod(os.path.dirname(failed), 0o700)
        if callable(function):
            function(failed)

    # onerror, not onexc: the latter needs Python 3.12.
    shutil.rmtree(path, onerror=make_writable_and_retry)
