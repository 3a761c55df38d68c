"""The guest programs as the sandboxes see them: read-only files under GUEST_DIR.

A guest cannot import sandpool, so each runner (``pool/runner.py``,
``pool/wasm_runner.py``) is composed into one self-contained file: its
``from pool.<module> import ...`` statements for the modules in SPLICED are
replaced by those modules' source (each once, dependencies first). What host
and guest both speak (``pool/wire.py``) is thus written once and run by both.
The JavaScript child (``pool/node_runner.js``) gets the same values as a
generated ``const WIRE = {...}`` in place of its WIRE_MARKER line.

``install()`` writes the composed files into a directory named by their
content hash under the cache directory, read-only, and every tier mounts that
directory read-only at GUEST_DIR: the runner is a short path in ``ps`` and
``docker ps``, not kilobytes of ``-c`` source, and the code cannot change it.

The docker and process runner comes precompiled. Python never caches the
bytecode of the script it is given, and compiling the ~80 KB composed runner
cost every sandbox start about 30 ms of CPU. So RUNNER is a loader of a few
lines that imports the runner as RUNNER_MODULE, whose bytecode ``install()``
writes under ``__pycache__`` with the daemon's interpreter, checked against
the source's hash. A guest whose Python is another version has another cache
tag, finds no bytecode of its own, and compiles the source as before: the
bytecode only ever saves time, it never decides what runs.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import importlib.util
import json
import marshal
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

from pool import runcode, wire
from pool.errors import BackendError
from pool.paths import guest_programs_dir

GUEST_DIR = "/opt/sandpool"  # where every tier mounts the guest programs, read-only
RUNNER = "runner.py"  # docker and process tiers: pool/runner.py, run through RUNNER_LOADER
WASM_RUNNER = "wasm_runner.py"  # the wasm tier runs it once, in the template its guests copy
NODE_RUNNER = "node_runner.js"  # docker and process tiers: exec'd by RUNNER, beside it
PROGRAMS = (RUNNER, WASM_RUNNER, NODE_RUNNER)  # the guest programs' sources in pool/
# Installed beside the programs, RUNNER's composed source goes by this name and
# RUNNER itself is RUNNER_LOADER: imported, the runner's bytecode can be cached.
RUNNER_MODULE = "sandpool_runner"
RUNNER_LOADER = f"""\
# Written by pool/guest.py: the runner proper is {RUNNER_MODULE}.py beside this file,
# imported rather than run so that its bytecode comes from __pycache__.
import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import {RUNNER_MODULE}
del sys.path[0]
{RUNNER_MODULE}.main()
"""
# A pyc's flags word: hash-based (bit 0) and checked against the source at
# every import (bit 1), PEP 552. Timestamps would do for an immutable file,
# but the hash also holds after a copy that changes mtimes.
CHECKED_HASH_PYC = 0b11
SPLICED = ("pool.wire", "pool.runcode", "pool.isolate")  # the modules a guest program may import
WIRE_MARKER = "// @@WIRE_CONSTANTS@@\n"  # the line of a JavaScript program that becomes WIRE
# How node_runner.js lays out what it reads and writes (Buffer's readUInt32BE,
# writeInt32BE): composing refuses a wire whose structs no longer match.
JAVASCRIPT_STRUCTS = {"FRAME": ">cI", "REQUEST": ">II", "STATUS": ">i"}


def _source(module_file: str) -> str:
    return resources.files("pool").joinpath(module_file).read_text(encoding="utf-8")


def compose(program: str, spliced: set[str] | None = None) -> str:
    """``program``'s source (a file in ``pool/``) with its SPLICED imports replaced.

    Top-down, so a module is spliced where it is first imported, before the
    code that uses it; a later import of it is dropped. Raises ValueError if
    the program imports any other part of sandpool: the guest could not run it.
    """
    if program.endswith(".js"):
        return compose_javascript(program)
    spliced = set() if spliced is None else spliced
    source = _source(program)
    lines = source.splitlines(keepends=True)
    out: list[str] = []
    copied = 0  # lines of ``source`` already in ``out``
    for node in ast.parse(source).body:
        if isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        sandpool = [name for name in names if name.split(".")[0] in ("pool", "api", "metrics")]
        if not sandpool:
            continue
        if len(sandpool) != 1 or sandpool[0] not in SPLICED:
            raise ValueError(f"{program} imports {sandpool}, which a guest cannot")
        module = sandpool[0]
        out += lines[copied : node.lineno - 1]
        copied = node.end_lineno or node.lineno
        if module not in spliced:
            spliced.add(module)
            body = compose(module.split(".")[-1] + ".py", spliced)
            out += [f"# --- {module}, spliced by pool/guest.py ---\n", body]
            out.append(f"# --- end of {module} ---\n")
    out += lines[copied:]
    return "".join(out)


def wire_constants() -> dict[str, object]:
    """What a JavaScript guest program knows of the wire, from pool/wire.py's values.

    Raises ValueError if a struct's layout is not the one the program encodes.
    """
    for name, layout in JAVASCRIPT_STRUCTS.items():
        actual = getattr(wire, name).format
        if actual != layout:
            raise ValueError(f"wire.{name} is {actual!r}; {NODE_RUNNER} encodes {layout!r}")
    kinds = {name: getattr(wire, name).decode("latin-1")
             for name in ("READY", "EXIT", "FILE_OUT", "CONTENT", "ERROR")}
    return {
        **kinds,
        "FRAME_BYTES": wire.FRAME.size,
        "REQUEST_BYTES": wire.REQUEST.size,
        "STATUS_BYTES": wire.STATUS.size,
        "CHUNK": wire.CHUNK,
        "OUT_DIR": wire.OUT_DIR,
        "MAX_ERROR_BYTES": wire.MAX_ERROR_BYTES,
        "MAX_EXIT_CODE": wire.MAX_EXIT_CODE,
        "MAX_OUT_DEPTH": runcode.MAX_OUT_DEPTH,
        "FILE_KINDS": list(wire.FILE_KINDS),
        "LIMITS": list(wire.OutcomeLimits.__slots__),
    }


def compose_javascript(program: str) -> str:
    """``program``'s source (a file in ``pool/``) with its WIRE_MARKER line replaced by
    ``const WIRE = Object.freeze({...});`` holding ``wire_constants()``.

    Raises ValueError unless the marker is there exactly once.
    """
    source = _source(program)
    if source.count(WIRE_MARKER) != 1:
        raise ValueError(f"{program} must hold the line {WIRE_MARKER.strip()!r} exactly once")
    constants = json.dumps(wire_constants(), sort_keys=True, indent=2)
    header = (
        "// pool/wire.py's values, generated by pool/guest.py\n"
        f"const WIRE = Object.freeze({constants});\n"
    )
    return source.replace(WIRE_MARKER, header)


def runner_bytecode_path() -> str | None:
    """Where, relative to the installed directory, RUNNER_MODULE's bytecode for
    this interpreter goes (``__pycache__/<module>.<cache tag>.pyc``); None for an
    interpreter that caches no bytecode."""
    if sys.implementation.cache_tag is None:
        return None
    return importlib.util.cache_from_source(f"{RUNNER_MODULE}.py")


def runner_bytecode(source: str) -> bytes:
    """The checked-hash pyc of the composed runner ``source``, as a guest's Python
    of the daemon's version imports it (PEP 552's layout)."""
    data = source.encode("utf-8")
    code = compile(data, path_in_sandbox(f"{RUNNER_MODULE}.py"), "exec", dont_inherit=True)
    return (importlib.util.MAGIC_NUMBER + CHECKED_HASH_PYC.to_bytes(4, "little")
            + importlib.util.source_hash(data) + marshal.dumps(code))


def _same_bytecode(found: bytes, expected: bytes) -> bool:
    """Whether the pyc ``found`` holds what ``expected`` does: the same header
    (magic, flags, source hash) and equal code. By meaning, not bytes: marshal's
    output can differ between two compiles of one source (it shares objects by
    reference count), the code objects it holds cannot."""
    if found[:16] != expected[:16]:
        return False
    try:
        return bool(marshal.loads(found[16:]) == marshal.loads(expected[16:]))
    except (EOFError, ValueError, TypeError):
        return False


@functools.cache
def layout() -> Mapping[str, str | bytes]:
    """What ``install()`` writes: the files by path relative to the directory.

    Once per process: the sources are the installed package's and the bytecode
    this interpreter's, and each pool's start installs (compiling the runner
    costs ~25 ms)."""
    files: dict[str, str | bytes] = {
        name: compose(name) for name in PROGRAMS if name != RUNNER
    }
    runner = compose(RUNNER)
    files[RUNNER] = RUNNER_LOADER
    files[f"{RUNNER_MODULE}.py"] = runner
    bytecode = runner_bytecode_path()
    if bytecode is not None:
        files[bytecode] = runner_bytecode(runner)
    return files


def install(root: Path | None = None) -> Path:
    """The host directory holding today's guest programs, read-only; written if missing.

    Content-addressed (``<guest_programs_dir>/<sha256>``), so daemons of different
    versions share the cache without sharing files, and nothing needs sweeping.
    A directory whose files differ from what this daemon would write (damaged,
    tampered) is replaced. Raises BackendError when the cache cannot be written.
    """
    files = layout()
    digest = hashlib.sha256()
    for name, content in sorted(files.items()):
        # Bytecode by the interpreter that wrote it: its bytes are not
        # reproducible, and two builds of one version may compile differently.
        data = content.encode() if isinstance(content, str) else sys.version.encode()
        digest.update(name.encode() + b"\0" + data + b"\0")
    base = root or guest_programs_dir()
    target = base / digest.hexdigest()[:32]
    try:
        base.mkdir(mode=0o755, parents=True, exist_ok=True)
        owner = base.stat().st_uid
    except OSError as e:
        raise BackendError(
            f"cannot make {base}: {e.strerror}", code="guest_programs_error"
        ) from None
    if owner != os.geteuid():  # whoever owns it could swap a runner between check and use
        raise BackendError(
            f"{base} belongs to uid {owner}, not to sandpool's uid {os.geteuid()}: "
            "refusing to run guest programs from it",
            code="guest_programs_untrusted",
        )
    if _holds(target, files):
        return target
    try:
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=base))
        for name, content in files.items():
            path = staging / name
            path.parent.mkdir(mode=0o755, exist_ok=True)
            if isinstance(content, str):
                path.write_text(content, encoding="utf-8")
            else:
                path.write_bytes(content)
            path.chmod(0o444)
        for directory in sorted({(staging / name).parent for name in files}, reverse=True):
            directory.chmod(0o555)  # deepest first; staging itself last
        if target.exists():  # damaged: set aside, then replaced below
            aside = Path(tempfile.mkdtemp(prefix=".damaged-", dir=base))
            target.rename(aside / "old")
            _remove(aside)
        try:
            staging.rename(target)
        except OSError:  # another daemon installed it first
            _remove(staging)
    except OSError as e:
        raise BackendError(
            f"cannot write the guest programs under {base}: {e.strerror}",
            code="guest_programs_error",
        ) from None
    if not _holds(target, files):
        raise BackendError(
            f"the guest programs under {target} are not what this daemon wrote",
            code="guest_programs_error",
        )
    return target


def _holds(directory: Path, files: Mapping[str, str | bytes]) -> bool:
    """Exactly these files with exactly this content (bytecode by meaning, as
    ``_same_bytecode`` compares it): an extra file or directory is tampering too."""
    try:
        present = {str(p.relative_to(directory)) for p in directory.rglob("*")}
        expected = set(files) | {
            str(parent) for name in files for parent in Path(name).parents if str(parent) != "."
        }
        return present == expected and all(
            (directory / name).read_text(encoding="utf-8") == content
            if isinstance(content, str)
            else _same_bytecode((directory / name).read_bytes(), content)
            for name, content in files.items()
        )
    except (OSError, UnicodeDecodeError):
        return False


def _remove(directory: Path) -> None:
    for path in (directory, *directory.rglob("*")):
        with contextlib.suppress(OSError):
            path.chmod(0o700 if path.is_dir() else 0o600)
    shutil.rmtree(directory, ignore_errors=True)


def path_in_sandbox(program: str) -> str:
    return f"{GUEST_DIR}/{program}"

