"""The default recipe: a Debian root file system from debootstrap, imported into Docker.

``debootstrap --variant=minbase --include=python3`` into a temporary directory
(installing debootstrap with apt-get first when it is missing and we are root),
strip what a sandbox never reads, byte-compile the standard library, check that
python3 imports what the pool needs inside it, then ``tar | docker import``. The
temporary directory is removed on every exit path, cancellation included.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from pool.errors import ImageBuildError
from pool.image.apt_sources import host_debian_mirror
from pool.image.docker_cli import SMOKE_TEST_TIMEOUT_S, tar_into_docker
from pool.image.files import (
    BUILD_LOG,
    make_build_dir,
    read_text,
    remove_build_dir,
    strip_rootfs,
    write_build_log,
)
from pool.image.processes import TOOL_PATH, last_line, one_line, run, run_logged, which
from pool.image.progress import Clock
from pool.image.recipe import DEFAULT_MIRROR, PYTHON_CHECK, SUITE

DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
APT_TIMEOUT_S = 900.0
DEBOOTSTRAP_TIMEOUT_S = 1800.0
# What chroot'ed commands run with: the build's own environment is not the image's.
_CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


async def import_from_debootstrap(mirror: str | None, clock: Clock) -> str:
    """Build the root file system from ``mirror`` (default: the host's Debian mirror,
    else deb.debian.org) and import it untagged; return the image id.

    Raises ``ImageBuildError`` with one readable line on any failure.
    """
    if mirror is None:
        mirror = host_debian_mirror() or DEFAULT_MIRROR
    await _ensure_debootstrap(clock)
    # One mkdir, on the loop on purpose: in a thread, a cancellation while waiting
    # for it would leak the directory it creates.
    build_dir = make_build_dir()
    rootfs = build_dir / "rootfs"
    try:
        clock.phase(f"debootstrap {SUITE} (minbase + python3) from {mirror} into {rootfs}")
        await _debootstrap(mirror, rootfs, clock)
        clock.phase("stripping docs, man pages, translations, apt lists and caches")
        await asyncio.to_thread(strip_rootfs, rootfs)
        await _compile_stdlib(rootfs)
        await _check_python(rootfs)
        clock.phase(f"importing {rootfs} into Docker")
        return await tar_into_docker(
            ["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."],
            source=f"debootstrap:{SUITE}",
            what="tar of the root file system",
        )
    finally:
        problem = await asyncio.shield(asyncio.to_thread(remove_build_dir, build_dir))
        if problem is not None:
            clock.phase(f"warning: {problem}")


def debootstrap_failure(output: str, returncode: int, mirror: str) -> str:
    """Why debootstrap failed, in one line, from its output (run with LC_ALL=C)."""
    if "Failed getting release file" in output or "Couldn't download" in output:
        reason = f"cannot reach mirror {mirror}"
    elif "Release signed by unknown key" in output or "Invalid Release signature" in output:
        reason = f"cannot verify the {SUITE} Release file of {mirror} with {DEBIAN_KEYRING}"
    else:
        errors = [line for line in output.splitlines() if line.startswith("E: ")]
        reason = errors[-1][3:].strip() if errors else f"exit status {returncode}"
    return one_line(reason)


def last_apt_error(output: str) -> str:
    """apt's last ``E:`` line without the prefix, else the last line of ``output``."""
    errors = [line for line in output.splitlines() if line.startswith("E: ")]
    return errors[-1][3:].strip() if errors else last_line(output)


async def _ensure_debootstrap(clock: Clock) -> None:
    missing = _missing_build_packages()
    is_root = os.geteuid() == 0
    if missing and not is_root:
        raise ImageBuildError(
            f"{missing[0]} is not installed and could not be installed: run as root or "
            f"`apt-get install {' '.join(missing)}` (or build with --from IMAGE)"
        )
    if not is_root:
        raise ImageBuildError(
            "building the image with debootstrap needs root: run as root "
            "(or build with --from IMAGE)"
        )
    if not missing:
        return
    if which("apt-get") is None:
        raise ImageBuildError(
            f"{missing[0]} is not installed and this host has no apt-get: install "
            f"{' '.join(missing)} (or build with --from IMAGE)"
        )
    clock.phase(f"installing {' '.join(missing)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    result = await run_logged(install, env=env, timeout_s=APT_TIMEOUT_S, report=clock.phase)
    if result.returncode != 0:
        # A fresh machine has no package lists yet.
        clock.phase("apt-get update")
        update = await run_logged(
            ["apt-get", "update"], env=env, timeout_s=APT_TIMEOUT_S, report=clock.phase
        )
        if update.returncode == 0:
            result = await run_logged(
                install, env=env, timeout_s=APT_TIMEOUT_S, report=clock.phase
            )
    if result.returncode != 0:
        write_build_log(result.stdout)
        raise ImageBuildError(
            f"{missing[0]} is not installed and `apt-get install {' '.join(missing)}` "
            f"failed: {last_apt_error(result.stdout)} (see {BUILD_LOG})"
        )


async def _debootstrap(mirror: str, rootfs: Path, clock: Clock) -> None:
    argv = [
        "debootstrap",
        "--variant=minbase",
        "--include=python3",
        f"--keyring={DEBIAN_KEYRING}",
        SUITE,
        str(rootfs),
        mirror,
    ]
    # LC_ALL=C: debootstrap_failure() matches the messages in English.
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C", "PATH": TOOL_PATH}
    result = await run_logged(argv, env=env, timeout_s=DEBOOTSTRAP_TIMEOUT_S, report=clock.phase)
    if result.returncode == 0:
        return
    detail = await asyncio.to_thread(read_text, rootfs / "debootstrap" / "debootstrap.log")
    write_build_log(result.stdout + ("\n--- debootstrap.log ---\n" + detail if detail else ""))
    reason = debootstrap_failure(result.stdout, result.returncode, mirror)
    raise ImageBuildError(f"debootstrap failed: {reason} (see {BUILD_LOG})")


def _missing_build_packages() -> list[str]:
    missing = []
    if which("debootstrap") is None:
        missing.append("debootstrap")
    if not DEBIAN_KEYRING.exists():
        missing.append("debian-archive-keyring")
    return missing


async def _compile_stdlib(rootfs: Path) -> None:
    """Byte-compile the standard library into the image (+~12 MB).

    The root file system is read-only in a sandbox, so without .pyc files every
    runner compiles json, re, enum, traceback... from source on every start: that
    more than doubles the CPU a Docker sandbox spends getting ready, and so halves
    the Docker pool's single-use throughput.
    """
    stdlib = sorted((rootfs / "usr/lib").glob("python3.*"))
    targets = [f"/{path.relative_to(rootfs)}" for path in stdlib] or ["/usr/lib/python3"]
    argv = ["chroot", str(rootfs), "/usr/bin/python3", "-I", "-m", "compileall", "-q", "-j", "0",
            *targets]
    result = await run(argv, timeout_s=SMOKE_TEST_TIMEOUT_S, env=_CHROOT_ENV, what="compileall")
    if result.returncode != 0:
        raise ImageBuildError(
            "cannot byte-compile the standard library in the new root file system: "
            f"{result.last_error_line or f'exit status {result.returncode}'}"
        )


async def _check_python(rootfs: Path) -> None:
    argv = ["chroot", str(rootfs), "/usr/bin/python3", "-B", "-I", "-c", PYTHON_CHECK]
    result = await run(argv, timeout_s=SMOKE_TEST_TIMEOUT_S, env=_CHROOT_ENV, what="chroot")
    if result.returncode != 0:
        raise ImageBuildError(
            f"python3 in the new root file system cannot `{PYTHON_CHECK}`: "
            f"{result.last_error_line or f'exit status {result.returncode}'}"
        )
