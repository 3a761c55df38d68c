"""Build the sandbox image: a minimal Debian bookworm root file system with python3.

The default recipe runs ``debootstrap --variant=minbase --include=python3`` into a
temporary directory, strips documentation, translations and caches, creates the
sandbox's working directory ``/sandbox`` (mode 1777), checks that python3 imports
``json``, ``asyncio`` and ``sqlite3`` inside it, then streams it through
``tar | docker import``. No registry is needed: only a Debian mirror.

``--from IMAGE`` (``base=``) is for hosts that reach a registry or already hold an
image with python3: it creates a stopped container from that image, copies an
empty ``/sandbox`` into it, and flattens it with ``docker export | docker import``
with the same image settings as the default recipe.

The image is imported untagged, smoke-tested (``--network none``, read-only root,
user 65534) and only then tagged, so a failed or interrupted build never leaves a
half-built image under the tag. The temporary root file system is removed on every
exit path, including cancellation and Ctrl-C.

Run ``python -m pool.image build --help`` for the command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import io
import json
import os
import shutil
import signal
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pool.errors import ImageBuildError

# Bump whenever the recipe below changes what ends up in the image: image_is_current()
# compares it with the image's label, so every host rebuilds on its next `make`.
RECIPE_VERSION = "2"
RECIPE_LABEL = "sandpool.recipe"
SOURCE_LABEL = "sandpool.source"

DEFAULT_TAG = "sandpool/python:bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")

SANDBOX_DIR = "/sandbox"
SANDBOX_USER = "65534:65534"
PYTHON_CHECK = "import json, asyncio, sqlite3"

# The temporary root file systems live in tempfile.gettempdir() under this prefix;
# tests look for leftovers by it.
BUILD_DIR_PREFIX = "sandpool-rootfs-"
# Kept after a failed build (the build directory is not), so an error can point at it.
BUILD_LOG = Path(tempfile.gettempdir()) / "sandpool-image-build.log"

PROGRESS_INTERVAL_S = 5.0
DOCKER_QUERY_TIMEOUT_S = 60.0
DOCKER_PULL_TIMEOUT_S = 900.0
DOCKER_IMPORT_TIMEOUT_S = 900.0
SMOKE_TEST_TIMEOUT_S = 120.0
APT_TIMEOUT_S = 900.0
DEBOOTSTRAP_TIMEOUT_S = 1800.0
TERMINATE_GRACE_S = 10.0

IMPORT_CHANGES = (
    f"WORKDIR {SANDBOX_DIR}",
    "ENV PYTHONDONTWRITEBYTECODE=1",
    "ENV LANG=C.UTF-8",
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    f"USER {SANDBOX_USER}",
    f"LABEL {RECIPE_LABEL}={RECIPE_VERSION}",
)

# Directories whose contents a sandbox never needs; the directories themselves stay.
STRIPPED_DIRS = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "var/lib/apt/lists",
    "var/cache/apt",
)
KEPT_LOCALES = frozenset({"C.utf8", "C.UTF-8"})

# Release names and aliases that only the Debian archive serves; a host source whose
# suites include one of these (and component main) is a Debian mirror.
DEBIAN_SUITES = frozenset(
    {
        "buster",
        "bullseye",
        "bookworm",
        "trixie",
        "forky",
        "duke",
        "sid",
        "oldoldstable",
        "oldstable",
        "stable",
        "testing",
        "unstable",
    }
)

# Some root-only tools live in sbin, which a user's PATH may lack.
_TOOL_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"]
)
_MNT_DETACH = 2

Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class _Completed:
    returncode: int
    stdout: str
    stderr: str

    @property
    def last_error_line(self) -> str:
        return _last_line(self.stderr) or _last_line(self.stdout)


class _Clock:
    """Reports phases with the time since the build started."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._started = time.monotonic()

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self._started

    def phase(self, message: str) -> None:
        self._progress(f"{message} (elapsed {self.elapsed_s:.1f}s)")


# ---------------------------------------------------------------------------
# Public API


async def image_is_current(tag: str) -> bool:
    """Tell whether ``tag`` exists and was built with this module's recipe.

    Costs one ``docker image inspect``. Raises ``ImageBuildError`` when the docker
    CLI is missing or the engine does not answer.
    """
    image = await _inspect_image(tag)
    if image is None:
        return False
    labels = (image.get("Config") or {}).get("Labels") or {}
    return bool(labels.get(RECIPE_LABEL) == RECIPE_VERSION)


async def build_image(
    *,
    tag: str = DEFAULT_TAG,
    mirror: str | None = None,
    base: str | None = None,
    force: bool = False,
    progress: Progress,
) -> bool:
    """Build the sandbox image and tag it ``tag``.

    Returns False without building when ``tag`` already carries the current recipe
    label and ``force`` is False; True after a build. ``mirror`` overrides the Debian
    mirror taken from the host's apt sources; ``base`` builds from an existing image
    with python3 instead of debootstrap. ``progress`` receives one line per phase and
    one every few seconds during long phases.

    Raises ``ImageBuildError`` with one readable line on any failure; nothing is
    tagged then, and the temporary root file system is removed. Costs about a
    minute or two and ~150 MB of temporary disk with debootstrap (installing
    debootstrap with apt-get first when it is missing and we are root).
    """
    clock = _Clock(progress)
    if not force and await image_is_current(tag):
        clock.phase(f"{tag} is up to date (recipe {RECIPE_VERSION}); nothing to do")
        return False
    previous = await _inspect_image(tag)
    if base is not None:
        image_id = await _import_from_base(base, clock)
    else:
        image_id = await _import_from_debootstrap(mirror, clock)
    try:
        clock.phase(f"smoke-testing {_short_id(image_id)}")
        await _smoke_test(image_id)
        await _docker(["tag", image_id, tag], what="docker tag")
    except BaseException:
        await asyncio.shield(_remove_image(image_id))
        raise
    size_mb = await _image_size_mb(image_id)
    clock.phase(f"tagged {tag} ({_short_id(image_id)}, {size_mb:.0f} MB)")
    if previous is not None and previous.get("Id") != image_id:
        await _retire_previous(str(previous["Id"]), tag, clock)
    return True


def host_debian_mirror(
    sources_list: Path = Path("/etc/apt/sources.list"),
    sources_dir: Path = Path("/etc/apt/sources.list.d"),
) -> str | None:
    """Return the first http(s) URI in the host's apt sources that serves the Debian
    main archive, or None (e.g. on Ubuntu, whose archive has no bookworm).

    Reads deb822 ``*.sources`` files in ``sources_dir`` and one-line ``deb`` entries
    in ``sources_list`` and ``sources_dir/*.list``.
    """
    candidates: list[tuple[list[str], list[str], list[str]]] = []
    if sources_dir.is_dir():
        for path in sorted(sources_dir.glob("*.sources")):
            candidates.extend(_parse_deb822(_read_text(path)))
    list_files = [sources_list]
    if sources_dir.is_dir():
        list_files.extend(sorted(sources_dir.glob("*.list")))
    for path in list_files:
        candidates.extend(_parse_one_line_sources(_read_text(path)))
    for uris, suites, components in candidates:
        if "main" not in components or not DEBIAN_SUITES.intersection(suites):
            continue
        for uri in uris:
            if uri.startswith(("http://", "https://")):
                return uri.rstrip("/")
    return None


# ---------------------------------------------------------------------------
# Recipe: debootstrap


async def _import_from_debootstrap(mirror: str | None, clock: _Clock) -> str:
    if mirror is None:
        mirror = host_debian_mirror() or DEFAULT_MIRROR
    await _ensure_debootstrap(clock)
    # One mkdir, on the loop on purpose: in a thread, a cancellation while waiting
    # for it would leak the directory it creates.
    build_dir = _make_build_dir()
    rootfs = build_dir / "rootfs"
    try:
        clock.phase(f"debootstrap {SUITE} (minbase + python3) from {mirror} into {rootfs}")
        await _debootstrap(mirror, rootfs, clock)
        clock.phase("stripping docs, man pages, translations, apt lists and caches")
        await asyncio.to_thread(_strip_rootfs, rootfs)
        await _compile_stdlib(rootfs)
        await _check_python(rootfs)
        clock.phase(f"importing {rootfs} into Docker")
        return await _tar_into_docker(
            ["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."],
            source=f"debootstrap:{SUITE}",
            what="tar of the root file system",
        )
    finally:
        problem = await asyncio.shield(asyncio.to_thread(_remove_build_dir, build_dir))
        if problem is not None:
            clock.phase(f"warning: {problem}")


async def _ensure_debootstrap(clock: _Clock) -> None:
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
    if _which("apt-get") is None:
        raise ImageBuildError(
            f"{missing[0]} is not installed and this host has no apt-get: install "
            f"{' '.join(missing)} (or build with --from IMAGE)"
        )
    clock.phase(f"installing {' '.join(missing)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    result = await _run_logged(install, env=env, timeout_s=APT_TIMEOUT_S, clock=clock)
    if result.returncode != 0:
        # A fresh machine has no package lists yet.
        clock.phase("apt-get update")
        update = await _run_logged(
            ["apt-get", "update"], env=env, timeout_s=APT_TIMEOUT_S, clock=clock
        )
        if update.returncode == 0:
            result = await _run_logged(install, env=env, timeout_s=APT_TIMEOUT_S, clock=clock)
    if result.returncode != 0:
        _write_build_log(result.stdout)
        raise ImageBuildError(
            f"{missing[0]} is not installed and `apt-get install {' '.join(missing)}` "
            f"failed: {_last_apt_error(result.stdout)} (see {BUILD_LOG})"
        )


async def _debootstrap(mirror: str, rootfs: Path, clock: _Clock) -> None:
    argv = [
        "debootstrap",
        "--variant=minbase",
        "--include=python3",
        f"--keyring={DEBIAN_KEYRING}",
        SUITE,
        str(rootfs),
        mirror,
    ]
    # LC_ALL=C: the failure messages below are matched in English.
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C", "PATH": _TOOL_PATH}
    result = await _run_logged(argv, env=env, timeout_s=DEBOOTSTRAP_TIMEOUT_S, clock=clock)
    if result.returncode == 0:
        return
    detail = await asyncio.to_thread(_read_text, rootfs / "debootstrap" / "debootstrap.log")
    _write_build_log(result.stdout + ("\n--- debootstrap.log ---\n" + detail if detail else ""))
    output = result.stdout
    if "Failed getting release file" in output or "Couldn't download" in output:
        reason = f"cannot reach mirror {mirror}"
    elif "Release signed by unknown key" in output or "Invalid Release signature" in output:
        reason = f"cannot verify the {SUITE} Release file of {mirror} with {DEBIAN_KEYRING}"
    else:
        errors = [line for line in output.splitlines() if line.startswith("E: ")]
        reason = errors[-1][3:].strip() if errors else f"exit status {result.returncode}"
    raise ImageBuildError(f"debootstrap failed: {_one_line(reason)} (see {BUILD_LOG})")


def _missing_build_packages() -> list[str]:
    missing = []
    if _which("debootstrap") is None:
        missing.append("debootstrap")
    if not DEBIAN_KEYRING.exists():
        missing.append("debian-archive-keyring")
    return missing


def _make_build_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix=BUILD_DIR_PREFIX)).resolve()


def _strip_rootfs(rootfs: Path) -> None:
    """Delete what a sandbox never reads; ~40% of the debootstrap output."""
    root_device = rootfs.lstat().st_dev
    for relative in STRIPPED_DIRS:
        stripped = rootfs / relative
        if stripped.is_dir() and not stripped.is_symlink():
            for entry in stripped.iterdir():
                _remove_path(entry)
    locale_dir = rootfs / "usr/lib/locale"
    if locale_dir.is_dir() and not locale_dir.is_symlink():
        for entry in locale_dir.iterdir():
            if entry.name not in KEPT_LOCALES:
                _remove_path(entry)
    for directory, subdirs, files in os.walk(rootfs):
        # Never descend into anything mounted inside the root file system.
        subdirs[:] = [
            name for name in subdirs if (Path(directory) / name).lstat().st_dev == root_device
        ]
        if "__pycache__" in subdirs:
            subdirs.remove("__pycache__")
            shutil.rmtree(Path(directory) / "__pycache__")
        for name in files:
            if name.endswith((".pyc", ".pyo")):
                (Path(directory) / name).unlink()
    sandbox = rootfs / SANDBOX_DIR.lstrip("/")
    sandbox.mkdir(exist_ok=True)
    sandbox.chmod(0o1777)


async def _compile_stdlib(rootfs: Path) -> None:
    """Byte-compile the standard library into the image (+~12 MB).

    The root file system is read-only in a sandbox, so without .pyc files every
    runner compiles json, re, enum, traceback... from source: measured 206-256 ms
    of container CPU to ready against 83-98 ms with them, which halved the Docker
    pool's single-use throughput (issue 8).
    """
    stdlib = sorted((rootfs / "usr/lib").glob("python3.*"))
    targets = [f"/{path.relative_to(rootfs)}" for path in stdlib] or ["/usr/lib/python3"]
    argv = ["chroot", str(rootfs), "/usr/bin/python3", "-I", "-m", "compileall", "-q", "-j", "0",
            *targets]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    result = await _run(argv, timeout_s=SMOKE_TEST_TIMEOUT_S, env=env, what="compileall")
    if result.returncode != 0:
        raise ImageBuildError(
            "cannot byte-compile the standard library in the new root file system: "
            f"{result.last_error_line or f'exit status {result.returncode}'}"
        )


async def _check_python(rootfs: Path) -> None:
    argv = ["chroot", str(rootfs), "/usr/bin/python3", "-B", "-I", "-c", PYTHON_CHECK]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    result = await _run(argv, timeout_s=SMOKE_TEST_TIMEOUT_S, env=env, what="chroot")
    if result.returncode != 0:
        raise ImageBuildError(
            f"python3 in the new root file system cannot `{PYTHON_CHECK}`: "
            f"{result.last_error_line or f'exit status {result.returncode}'}"
        )


# ---------------------------------------------------------------------------
# Recipe: --from IMAGE


async def _import_from_base(base: str, clock: _Clock) -> str:
    if await _inspect_image(base) is None:
        clock.phase(f"pulling {base}")
        pulled = await _run(
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
    await _docker(
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
        await _docker(
            ["cp", "-", f"{container}:/"],
            what="docker cp of /sandbox",
            input_bytes=_sandbox_dir_tar(),
        )
        clock.phase(f"flattening {base} into a new image")
        return await _tar_into_docker(
            ["docker", "export", container], source=base, what="docker export"
        )
    finally:
        await asyncio.shield(_remove_container(container))


def _sandbox_dir_tar() -> bytes:
    """A tar stream holding only an empty ``/sandbox`` owned by root, mode 1777."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        entry = tarfile.TarInfo(SANDBOX_DIR.lstrip("/"))
        entry.type = tarfile.DIRTYPE
        entry.mode = 0o1777
        entry.mtime = int(time.time())
        archive.addfile(entry)
    return buffer.getvalue()


# ---------------------------------------------------------------------------
# Docker steps shared by both recipes


async def _tar_into_docker(producer: list[str], *, source: str, what: str) -> str:
    """Pipe ``producer``'s tar stream into ``docker import`` and return the new image
    id. The image is untagged: a producer failing halfway must not leave a truncated
    image under the final tag."""
    changes = [*IMPORT_CHANGES, f"LABEL {SOURCE_LABEL}={json.dumps(source)}"]
    importer = ["docker", "import"]
    for change in changes:
        importer += ["--change", change]
    importer.append("-")
    produced, imported = await _pipe(producer, importer, timeout_s=DOCKER_IMPORT_TIMEOUT_S)
    image_id = imported.stdout.strip()
    if produced.returncode != 0 or imported.returncode != 0 or not image_id:
        if image_id:
            await asyncio.shield(_remove_image(image_id))
        if produced.returncode != 0:
            raise ImageBuildError(f"{what} failed: {produced.last_error_line}")
        raise ImageBuildError(f"docker import failed: {imported.last_error_line}")
    return image_id


async def _smoke_test(image_id: str) -> None:
    """Run the check the pool relies on, the way the pool runs sandboxes."""
    name = f"sandpool-check-{uuid.uuid4().hex[:12]}"
    argv = [
        "docker", "run", "--name", name, "--label", "sandpool.build=1",
        "--network", "none", "--read-only",
        image_id, "python3", "-c", PYTHON_CHECK,
    ]  # fmt: skip
    try:
        result = await _run(argv, timeout_s=SMOKE_TEST_TIMEOUT_S, what="docker run")
    finally:
        await asyncio.shield(_remove_container(name))
    if result.returncode != 0:
        raise ImageBuildError(
            f"the new image cannot run `python3 -c '{PYTHON_CHECK}'`: "
            f"{result.last_error_line or f'exit status {result.returncode}'}"
        )


async def _inspect_image(reference: str) -> dict[str, Any] | None:
    result = await _run(
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


async def _image_size_mb(image_id: str) -> float:
    image = await _inspect_image(image_id)
    return float((image or {}).get("Size", 0)) / 1e6


async def _retire_previous(previous_id: str, tag: str, clock: _Clock) -> None:
    """Delete the image that ``tag`` named before, unless something still uses it."""
    result = await _run(
        ["docker", "image", "rm", previous_id],
        timeout_s=DOCKER_QUERY_TIMEOUT_S,
        what="docker image rm",
    )
    if result.returncode != 0:
        clock.phase(f"kept the previous {tag} ({_short_id(previous_id)}): {result.last_error_line}")


async def _remove_image(image_id: str) -> None:
    # Best effort on a failure path: the image is untagged, so a leftover is only
    # disk space, and the error that brought us here is the one to report.
    await _run(
        ["docker", "image", "rm", "--force", image_id],
        timeout_s=DOCKER_QUERY_TIMEOUT_S,
        what="docker image rm",
    )


async def _remove_container(name: str) -> None:
    result = await _run(
        ["docker", "rm", "--force", name], timeout_s=DOCKER_QUERY_TIMEOUT_S, what="docker rm"
    )
    if result.returncode != 0 and "no such container" not in result.stderr.lower():
        raise ImageBuildError(f"could not remove container {name}: {result.last_error_line}")


async def _docker(args: list[str], *, what: str, input_bytes: bytes | None = None) -> _Completed:
    result = await _run(
        ["docker", *args],
        timeout_s=DOCKER_QUERY_TIMEOUT_S,
        what=what,
        input_bytes=input_bytes,
    )
    if result.returncode != 0:
        raise ImageBuildError(f"{what} failed: {result.last_error_line}")
    return result


# ---------------------------------------------------------------------------
# Processes


async def _run(
    argv: list[str],
    *,
    timeout_s: float,
    what: str,
    env: dict[str, str] | None = None,
    input_bytes: bytes | None = None,
) -> _Completed:
    """Run ``argv`` to completion and capture its output; kill it on timeout or
    cancellation."""
    proc = await _spawn(
        argv,
        env=env,
        stdin=asyncio.subprocess.PIPE if input_bytes is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout_s):
            stdout, stderr = await proc.communicate(input_bytes)
    except TimeoutError:
        await _terminate(proc)
        raise ImageBuildError(f"{what} did not finish within {timeout_s:.0f}s") from None
    except BaseException:
        await asyncio.shield(_terminate(proc))
        raise
    assert proc.returncode is not None
    return _Completed(proc.returncode, _decode(stdout), _decode(stderr))


async def _run_logged(
    argv: list[str], *, env: dict[str, str], timeout_s: float, clock: _Clock
) -> _Completed:
    """Run a long command with stdout and stderr merged, reporting its latest output
    line every PROGRESS_INTERVAL_S."""
    proc = await _spawn(
        argv,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    lines: list[str] = []

    async def collect_output() -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            lines.append(_decode(raw).rstrip())

    try:
        async with asyncio.timeout(timeout_s), asyncio.TaskGroup() as group:
            reader = group.create_task(collect_output())
            while True:
                done, _ = await asyncio.wait({reader}, timeout=PROGRESS_INTERVAL_S)
                if done:
                    break
                latest = next((line for line in reversed(lines) if line.strip()), "")
                clock.phase(f"{Path(argv[0]).name}: {latest[:120]}")
            await proc.wait()
    except TimeoutError:
        await _terminate(proc)
        raise ImageBuildError(
            f"{Path(argv[0]).name} did not finish within {timeout_s:.0f}s"
        ) from None
    except BaseException:
        await asyncio.shield(_terminate(proc))
        raise
    assert proc.returncode is not None
    return _Completed(proc.returncode, "\n".join(lines), "")


async def _pipe(
    producer_argv: list[str], consumer_argv: list[str], *, timeout_s: float
) -> tuple[_Completed, _Completed]:
    """Run ``producer | consumer`` and capture both sides' output."""
    read_end, write_end = os.pipe()
    processes: list[asyncio.subprocess.Process] = []
    try:
        try:
            processes.append(
                await _spawn(
                    producer_argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=write_end,
                    stderr=asyncio.subprocess.PIPE,
                )
            )
            processes.append(
                await _spawn(
                    consumer_argv,
                    stdin=read_end,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
            )
        finally:
            # Only the children hold the pipe now, so each sees the other one exit.
            os.close(read_end)
            os.close(write_end)
        producer, consumer = processes
        async with asyncio.timeout(timeout_s):
            (_, produced_err), (consumed_out, consumed_err) = await asyncio.gather(
                producer.communicate(), consumer.communicate()
            )
    except TimeoutError:
        for proc in processes:
            await _terminate(proc)
        raise ImageBuildError(
            f"{producer_argv[0]} | {consumer_argv[0]} did not finish within {timeout_s:.0f}s"
        ) from None
    except BaseException:
        for proc in processes:
            await asyncio.shield(_terminate(proc))
        raise
    assert producer.returncode is not None
    assert consumer.returncode is not None
    return (
        _Completed(producer.returncode, "", _decode(produced_err)),
        _Completed(consumer.returncode, _decode(consumed_out), _decode(consumed_err)),
    )


async def _spawn(
    argv: list[str], *, env: dict[str, str] | None = None, stdin: int, stdout: int, stderr: int
) -> asyncio.subprocess.Process:
    executable = _which(argv[0])
    if executable is None:
        raise ImageBuildError(_missing_tool_message(argv[0]))
    # A session of its own, so _terminate() reaches the whole tree (debootstrap's
    # dpkg and wget) and a terminal's Ctrl-C reaches only us: we clean up in order.
    return await asyncio.create_subprocess_exec(
        executable,
        *argv[1:],
        env=env,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
    )


async def _terminate(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM the process group, SIGKILL it after TERMINATE_GRACE_S, and reap it."""
    if proc.returncode is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(TERMINATE_GRACE_S):
                await proc.wait()
        except TimeoutError:
            _signal_group(proc.pid, signal.SIGKILL)
            await proc.wait()
    # Stragglers that outlived the group leader must not keep writing into the rootfs.
    _signal_group(proc.pid, signal.SIGKILL)


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def _missing_tool_message(tool: str) -> str:
    if tool == "docker":
        return (
            "the docker command is not installed: run scripts/ensure-docker.sh as root "
            "(or install docker.io)"
        )
    return f"{tool} is not installed"


def _which(tool: str) -> str | None:
    return shutil.which(tool, path=_TOOL_PATH)


# ---------------------------------------------------------------------------
# Files (called in a thread when they touch many files)


def _remove_build_dir(build_dir: Path) -> str | None:
    """Unmount whatever debootstrap left mounted in ``build_dir``, then delete it.

    Returns a one-line problem instead of raising: it runs in ``finally`` and must
    not hide the error that got us there. Never deletes through a mount point, so a
    /proc or /dev that debootstrap left mounted cannot take host files with it.
    """
    for mount_point in sorted(_mounts_under(build_dir), key=len, reverse=True):
        _lazy_unmount(mount_point)
    still_mounted = _mounts_under(build_dir)
    if still_mounted:
        return f"could not unmount {still_mounted[0]}; unmount it and remove {build_dir}"
    try:
        shutil.rmtree(build_dir)
    except OSError as err:
        return f"could not remove {build_dir}: {err}"
    return None


def _mounts_under(directory: Path) -> list[str]:
    prefix = f"{directory}/"
    mounts = []
    for line in _read_text(Path("/proc/self/mountinfo")).splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        # mountinfo escapes space, tab, newline and backslash as octal.
        mount_point = fields[4].encode().decode("unicode_escape")
        if mount_point == str(directory) or mount_point.startswith(prefix):
            mounts.append(mount_point)
    return mounts


def _lazy_unmount(mount_point: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.umount2(os.fsencode(mount_point), _MNT_DETACH)


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except (FileNotFoundError, NotADirectoryError):
        return ""


def _write_build_log(text: str) -> None:
    BUILD_LOG.write_text(text + "\n")


# ---------------------------------------------------------------------------
# apt sources


def _parse_deb822(text: str) -> list[tuple[list[str], list[str], list[str]]]:
    """(URIs, Suites, Components) of each enabled ``Types: deb`` stanza."""
    stanzas: list[dict[str, str]] = [{}]
    key = ""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if stanzas[-1]:
                stanzas.append({})
            continue
        if line[0].isspace() and key:
            stanzas[-1][key] += " " + line.strip()
            continue
        key, _, value = line.partition(":")
        key = key.strip().lower()
        stanzas[-1][key] = value.strip()
    found = []
    for stanza in stanzas:
        if "deb" not in stanza.get("types", "").split():
            continue
        if stanza.get("enabled", "yes").lower() == "no":
            continue
        found.append(
            (
                stanza.get("uris", "").split(),
                stanza.get("suites", "").split(),
                stanza.get("components", "").split(),
            )
        )
    return found


def _parse_one_line_sources(text: str) -> list[tuple[list[str], list[str], list[str]]]:
    """(URIs, Suites, Components) of each ``deb [options] uri suite component...`` line."""
    found = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if not words or words[0] != "deb":
            continue
        words = words[1:]
        if words and words[0].startswith("["):
            while words and not words[0].endswith("]"):
                words = words[1:]
            words = words[1:]
        if len(words) >= 2:
            found.append(([words[0]], [words[1]], words[2:]))
    return found


# ---------------------------------------------------------------------------
# Text


def _decode(data: bytes) -> str:
    return data.decode(errors="replace")


def _last_line(text: str) -> str:
    return next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _last_apt_error(output: str) -> str:
    errors = [line for line in output.splitlines() if line.startswith("E: ")]
    return errors[-1][3:].strip() if errors else _last_line(output)


def _short_id(image_id: str) -> str:
    return image_id.removeprefix("sha256:")[:12]


async def build_image_interruptibly(
    *, tag: str, mirror: str | None, base: str | None, force: bool,
    progress: Callable[[str], None],
) -> bool:
    """build_image for a command line: SIGTERM (a killed `make`) cancels like Ctrl-C.

    The cancellation runs the finally blocks that remove the temporary root
    file system; the caller reports it.
    """
    build = asyncio.current_task()
    assert build is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, build.cancel)
    try:
        return await build_image(tag=tag, mirror=mirror, base=base, force=force,
                                 progress=progress)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
