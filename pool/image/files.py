"""The build's files on the host: the temporary build directory, stripping the root
file system, and the build log.

Every function here blocks; the build calls the ones that touch many files in a
thread.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from pool.image.recipe import KEPT_LOCALES, PACKAGE_TESTS_DIR, SANDBOX_DIR, STRIPPED_DIRS
from pool.mounts import detach, mount_points_under

# The temporary root file systems live in tempfile.gettempdir() under this prefix;
# tests look for leftovers by it.
BUILD_DIR_PREFIX = "sandpool-rootfs-"
# Kept after a failed build (the build directory is not), so an error can point at it.
BUILD_LOG = Path(tempfile.gettempdir()) / "sandpool-image-build.log"


def make_build_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix=BUILD_DIR_PREFIX)).resolve()


def remove_build_dir(build_dir: Path) -> str | None:
    """Unmount whatever debootstrap left mounted in ``build_dir``, then delete it.

    Returns a one-line problem instead of raising: it runs in ``finally`` and must
    not hide the error that got us there. Never deletes through a mount point, so a
    /proc or /dev that debootstrap left mounted cannot take host files with it.
    """
    try:
        for mount_point in sorted(mount_points_under(build_dir), key=len, reverse=True):
            # A failure shows as a mount point still there, below.
            with contextlib.suppress(OSError):
                detach(mount_point)
        still_mounted = mount_points_under(build_dir)
    except OSError as err:
        # Without the mount table, deleting could reach through a mount point.
        return f"could not read the mount table ({err}); remove {build_dir} by hand"
    if still_mounted:
        return f"could not unmount {still_mounted[0]}; unmount it and remove {build_dir}"
    try:
        shutil.rmtree(build_dir)
    except OSError as err:
        return f"could not remove {build_dir}: {err}"
    return None


def strip_rootfs(rootfs: Path) -> None:
    """Delete what a sandbox never reads (~40% of the debootstrap output; the
    Debian Python packages' test suites), and create the sandbox's working
    directory, mode 1777."""
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
    packages = rootfs / PACKAGE_TESTS_DIR
    if packages.is_dir() and not packages.is_symlink():
        for directory, subdirs, _files in os.walk(packages):
            if "tests" in subdirs:
                subdirs.remove("tests")
                _remove_path(Path(directory) / "tests")
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


def read_text(path: Path) -> str:
    """The text of ``path``, undecodable bytes replaced; "" when it does not exist."""
    try:
        return path.read_text(errors="replace")
    except (FileNotFoundError, NotADirectoryError):
        return ""


def write_build_log(text: str) -> None:
    BUILD_LOG.write_text(text + "\n")


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
