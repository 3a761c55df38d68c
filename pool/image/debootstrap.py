"""The default recipe: a Debian root file system from debootstrap, imported into Docker.

``debootstrap --variant=minbase --include=python3`` into a temporary directory
(installing debootstrap with apt-get first when it is missing and we are root),
then in a chroot: the recipe's Debian packages with apt-get and its pip
requirements with pip (the only steps besides debootstrap that use the network),
strip what a sandbox never reads, byte-compile the standard library and the
packages, build matplotlib's font cache, check that python3 imports what the
pool needs, read the versions the runtime label records, then ``tar | docker
import``. The temporary directory is removed on every exit path, cancellation
included.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

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
from pool.image.recipe import (
    DEFAULT_MIRROR,
    MATPLOTLIB_CACHE_DIR,
    PACKAGE_DIRS,
    PYTHON_CHECK,
    RUNTIME_PROBE,
    SUITE,
    Recipe,
    runtime_label,
    stand_in_control,
)

DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
APT_TIMEOUT_S = 900.0
DEBOOTSTRAP_TIMEOUT_S = 1800.0
PIP_TIMEOUT_S = 1800.0
COMPILE_TIMEOUT_S = 900.0
# Where the requirements file sits in the root file system while pip reads it.
REQUIREMENTS_IN_ROOTFS = "/tmp/sandpool-requirements.txt"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
HOST_CA_IN_ROOTFS = "/tmp/sandpool-host-ca.crt"
_PROXY_VARIABLES = frozenset({"http_proxy", "https_proxy", "no_proxy", "all_proxy"})
# What chroot'ed commands run with: the build's own environment is not the image's.
_CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


async def import_from_debootstrap(
    mirror: str | None, clock: Clock, recipe: Recipe | None = None
) -> str:
    """Build the root file system of ``recipe`` (default: the python profile) from
    ``mirror`` (default: the host's Debian mirror, else deb.debian.org) and import
    it untagged; return the image id.

    Raises ``ImageBuildError`` with one readable line on any failure.
    """
    if mirror is None:
        mirror = host_debian_mirror() or DEFAULT_MIRROR
    recipe = recipe or Recipe()
    await _ensure_debootstrap(clock)
    # One mkdir, on the loop on purpose: in a thread, a cancellation while waiting
    # for it would leak the directory it creates.
    build_dir = make_build_dir()
    rootfs = build_dir / "rootfs"
    try:
        clock.phase(f"debootstrap {SUITE} (minbase + python3) from {mirror} into {rootfs}")
        await _debootstrap(mirror, rootfs, clock)
        if recipe.packages:
            clock.phase(f"apt-get install {' '.join(recipe.packages)}")
            await _apt_install(rootfs, recipe.packages, recipe.profile.stand_ins, clock)
        if recipe.pip_requirements is not None:
            clock.phase("pip install -r the requirements file")
            await _pip_install(rootfs, recipe.pip_requirements, clock)
        clock.phase("stripping docs, man pages, translations, apt lists and caches")
        await asyncio.to_thread(strip_rootfs, rootfs)
        clock.phase("byte-compiling the standard library and the packages")
        await _compile_python(rootfs)
        if recipe.profile.has_matplotlib:
            clock.phase(f"building matplotlib's font cache in {MATPLOTLIB_CACHE_DIR}")
            await _build_font_cache(rootfs)
        await _check_python(rootfs)
        runtime = await _probe_runtime(rootfs, recipe)
        clock.phase(f"importing {rootfs} into Docker")
        return await tar_into_docker(
            ["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."],
            source=f"debootstrap:{SUITE}",
            what="tar of the root file system",
            recipe=recipe,
            runtime=runtime,
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


async def _chroot(
    rootfs: Path, argv: list[str], *, what: str, timeout_s: float = SMOKE_TEST_TIMEOUT_S,
    env: dict[str, str] | None = None,
) -> str:
    """Run ``argv`` chroot'ed into ``rootfs`` and return its stdout; raises
    ``ImageBuildError`` naming ``what`` when it fails."""
    result = await run(
        ["chroot", str(rootfs), *argv], timeout_s=timeout_s, env={**_CHROOT_ENV, **(env or {})},
        what=what,
    )
    if result.returncode != 0:
        raise ImageBuildError(
            f"{what} failed in the new root file system: "
            f"{result.last_error_line or f'exit status {result.returncode}'}"
        )
    return result.stdout


async def _chroot_logged(rootfs: Path, argv: list[str], *, what: str, timeout_s: float,
                         clock: Clock, env: dict[str, str] | None = None) -> None:
    """A long chroot'ed command (apt-get, pip) with progress; its output goes to
    ``BUILD_LOG`` when it fails."""
    env = {**_CHROOT_ENV, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C", **(env or {})}
    result = await run_logged(["chroot", str(rootfs), *argv], env=env, timeout_s=timeout_s,
                              report=clock.phase)
    if result.returncode != 0:
        write_build_log(result.stdout)
        raise ImageBuildError(
            f"{what} failed: {last_apt_error(result.stdout)} (see {BUILD_LOG})"
        )


async def _apt_install(
    rootfs: Path, packages: tuple[str, ...], stand_ins: tuple[str, ...], clock: Clock
) -> None:
    """Install ``packages`` (without recommends) with the root file system's own apt,
    from the mirror debootstrap wrote into its sources.list, after empty packages
    held in place of ``stand_ins``."""
    for package in stand_ins:
        await _install_stand_in(rootfs, package)
    await _chroot_logged(rootfs, ["apt-get", "update"], what="apt-get update",
                         timeout_s=APT_TIMEOUT_S, clock=clock)
    install = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    await _chroot_logged(rootfs, install, what="apt-get install", timeout_s=APT_TIMEOUT_S,
                         clock=clock)
    await _chroot_logged(rootfs, ["apt-get", "clean"], what="apt-get clean",
                         timeout_s=APT_TIMEOUT_S, clock=clock)


async def _install_stand_in(rootfs: Path, package: str) -> None:
    source = f"/tmp/sandpool-stand-in-{package}"
    control = rootfs / source.lstrip("/") / "DEBIAN" / "control"
    await asyncio.to_thread(control.parent.mkdir, parents=True)
    await asyncio.to_thread(control.write_text, stand_in_control(package))
    try:
        build = ["dpkg-deb", "--root-owner-group", "--build", source, f"{source}.deb"]
        await _chroot(rootfs, build, what=f"building a stand-in for {package}")
        await _chroot(rootfs, ["dpkg", "--install", f"{source}.deb"],
                      what=f"installing a stand-in for {package}")
        await _chroot(rootfs, ["apt-mark", "hold", package], what=f"holding {package}")
    finally:
        await asyncio.shield(asyncio.to_thread(
            shutil.rmtree, rootfs / source.lstrip("/"), ignore_errors=True))
        await asyncio.shield(asyncio.to_thread(
            (rootfs / f"{source.lstrip('/')}.deb").unlink, missing_ok=True))


async def _pip_install(rootfs: Path, requirements: str, clock: Clock) -> None:
    """pip-install ``requirements`` (a requirements file's text; with hashes, pip
    checks them) into /usr/local of the root file system.

    pip reaches the index the way the host does: through the host's proxy settings
    and trusting the host's certificate authorities (a proxy that inspects TLS
    signs with a CA the new root file system does not know). Neither stays in the
    image.
    """
    inside = rootfs / REQUIREMENTS_IN_ROOTFS.lstrip("/")
    ca_inside = rootfs / HOST_CA_IN_ROOTFS.lstrip("/")
    await asyncio.to_thread(inside.write_text, requirements)
    try:
        # Debian marks its python3 externally managed; /usr/local is ours to fill.
        argv = ["python3", "-m", "pip", "install", "--no-cache-dir", "--break-system-packages",
                "--root-user-action=ignore", "--disable-pip-version-check",
                "-r", REQUIREMENTS_IN_ROOTFS]
        if await asyncio.to_thread(HOST_CA_BUNDLE.is_file):
            await asyncio.to_thread(shutil.copyfile, HOST_CA_BUNDLE, ca_inside)
            argv += ["--cert", HOST_CA_IN_ROOTFS]
        proxies = {name: value for name, value in os.environ.items()
                   if name.lower() in _PROXY_VARIABLES}
        await _chroot_logged(rootfs, argv, what="pip install", timeout_s=PIP_TIMEOUT_S,
                             clock=clock, env=proxies)
    finally:
        await asyncio.shield(asyncio.to_thread(inside.unlink, missing_ok=True))
        await asyncio.shield(asyncio.to_thread(ca_inside.unlink, missing_ok=True))


async def _compile_python(rootfs: Path) -> None:
    """Byte-compile the standard library and the installed packages into the image
    (+~12 MB for the standard library alone).

    The root file system is read-only in a sandbox, so without .pyc files every
    runner compiles json, re, enum, traceback... from source on every start: that
    more than doubles the CPU a Docker sandbox spends getting ready, and so halves
    the Docker pool's single-use throughput. The same holds for numpy or pandas.
    """
    stdlib = sorted((rootfs / "usr/lib").glob("python3.*"))
    local = sorted((rootfs / "usr/local/lib").glob("python3*"))
    targets = [f"/{path.relative_to(rootfs)}" for path in [*stdlib, *local]]
    targets += [d for d in PACKAGE_DIRS if (rootfs / d.lstrip("/")).is_dir() and d not in targets]
    argv = ["/usr/bin/python3", "-I", "-m", "compileall", "-q", "-j", "0", *targets]
    await _chroot(rootfs, argv, what="compileall", timeout_s=COMPILE_TIMEOUT_S)


async def _build_font_cache(rootfs: Path) -> None:
    """Let matplotlib scan the image's fonts once into ``MATPLOTLIB_CACHE_DIR``,
    readable by every uid a sandbox runs as."""
    cache = rootfs / MATPLOTLIB_CACHE_DIR.lstrip("/")
    await asyncio.to_thread(cache.mkdir, parents=True, exist_ok=True)
    argv = ["/usr/bin/python3", "-I", "-B", "-c", "import matplotlib.font_manager"]
    await _chroot(rootfs, argv, what="building matplotlib's font cache",
                  env={"MPLCONFIGDIR": MATPLOTLIB_CACHE_DIR, "MPLBACKEND": "Agg"})
    written = await asyncio.to_thread(lambda: sorted(p.name for p in cache.iterdir()))
    if not any(name.startswith("fontlist") for name in written):
        raise ImageBuildError(f"matplotlib wrote no font cache into {MATPLOTLIB_CACHE_DIR}")
    await asyncio.to_thread(_make_world_readable, cache)


def _make_world_readable(directory: Path) -> None:
    directory.chmod(0o755)
    for path in directory.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


async def _probe_runtime(rootfs: Path, recipe: Recipe) -> dict[str, Any]:
    """The runtime label of the root file system: interpreter versions and the
    versions of the recipe's key distributions (and of what pip installed)."""
    argv = ["/usr/bin/python3", "-I", "-B", "-c", RUNTIME_PROBE,
            *recipe.profile.key_distributions]
    probed = json.loads(await _chroot(rootfs, argv, what="reading package versions"))
    interpreters = {"python3": str(probed["python3"])}
    if recipe.profile.node_check is not None or "nodejs" in recipe.packages:
        node = await _chroot(rootfs, ["node", "--version"], what="node --version")
        interpreters["node"] = node.strip().removeprefix("v")
    return runtime_label(recipe.profile, interpreters, probed["packages"])


async def _check_python(rootfs: Path) -> None:
    argv = ["chroot", str(rootfs), "/usr/bin/python3", "-B", "-I", "-c", PYTHON_CHECK]
    result = await run(argv, timeout_s=SMOKE_TEST_TIMEOUT_S, env=_CHROOT_ENV, what="chroot")
    if result.returncode != 0:
        raise ImageBuildError(
            f"python3 in the new root file system cannot `{PYTHON_CHECK}`: "
            f"{result.last_error_line or f'exit status {result.returncode}'}"
        )
