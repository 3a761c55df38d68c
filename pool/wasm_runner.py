"""The guest runner of the wasm backend: runs inside CPython compiled to WASI.

It is passed to ``python -I -c`` by ``pool/backends/wasm.py`` and must stay
self-contained (standard library only, no sandpool import). WASI preview 1 has
no fork, no pidfd and no memfd, so unlike ``pool/runner.py`` the user's code
runs in this same interpreter, which is single-use: the host drops the whole
WebAssembly instance after one request.

Protocol (the host side is ``WasmBackend``):
- The runner imports what the code path needs, warms the compiler and writes
  one ready frame (``R``, as in ``pool/runner.py``) on stdout, then blocks in
  ``os.read(0)`` (a pipe the host holds; the instance stays parked there).
- The host writes one request frame: a 4-byte big-endian length and a JSON
  object whose ``code`` is run. The request's stdin data follows as raw bytes,
  then EOF: the host closes its end, so the code's ``sys.stdin`` is the real
  fd 0 and a read past the data returns EOF instead of blocking.
- stdout and stderr are the raw fds 1 and 2, pipes the host reads and caps.
  The runner writes nothing on them after the ready frame.
- The exit status is the WASI ``proc_exit`` status (``os._exit``, which also
  skips CPython's ~20 ms shutdown). WASI only carries 0..125, so a larger
  status is written to ``/.sandpool/status`` first and the runner exits 125;
  the host reads that file only for status 125. Either way the status is the
  program's claim about itself, never a verdict.
"""

import atexit
import builtins
import contextlib
import io
import json
import linecache
import os
import struct
import sys
import traceback
import types
from typing import NoReturn

READY_FRAME = struct.pack(">cI", b"R", 0)
REQUEST = struct.Struct(">I")
WORKDIR = "/sandbox"
STATUS_PATH = "/.sandpool/status"
WASI_MAX_STATUS = 125  # wasmtime refuses proc_exit statuses outside 0..125


def read_exact(fd: int, size: int) -> bytes:
    parts = []
    while size:
        chunk = os.read(fd, size)
        if not chunk:
            os._exit(0)  # the host destroyed the sandbox before sending a request
        parts.append(chunk)
        size -= len(chunk)
    return b"".join(parts)


def exit_status(code: object) -> int:
    """The process exit status Python gives ``sys.exit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    with contextlib.suppress(Exception):
        print(code, file=sys.stderr)
    return 1


_wasi_exit = os._exit


def exit_process(status: int) -> NoReturn:
    """``os._exit`` for any status: WASI's proc_exit carries only 0..125."""
    status &= 0xFF
    if status > WASI_MAX_STATUS:
        try:
            with open(STATUS_PATH, "w") as f:
                f.write(str(status))
        except OSError:
            status = 1  # the code removed the status file's directory: say "failed"
        else:
            status = WASI_MAX_STATUS
    _wasi_exit(status)


def finish(status: int) -> NoReturn:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(BaseException):
            stream.flush()  # type: ignore[union-attr]
    exit_process(status)


def run_python(code: str) -> NoReturn:
    module = types.ModuleType("__main__")
    module.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = module
    sys.argv = ["-c"]
    # Register the source so tracebacks show the offending lines.
    linecache.cache["<string>"] = (len(code), None, code.splitlines(keepends=True), "<string>")
    status = 0
    try:
        exec(compile(code, "<string>", "exec"), module.__dict__)
    except SystemExit as e:
        status = exit_status(e.code)
    except BaseException as e:
        # Drop this frame so the traceback starts at the user's code.
        tb = e.__traceback__
        traceback.print_exception(type(e), e, tb.tb_next if tb is not None else None)
        status = 1
    try:
        atexit._run_exitfuncs()
    except BaseException:
        traceback.print_exc()
        status = status or 1
    finish(status)


def main() -> None:
    # One throw-away compile saves ~0.8 ms on the first real one.
    compile("warm = [i * 2 for i in range(3)]", "<warm>", "exec")
    io.TextIOWrapper(io.BytesIO(b"warm"), encoding="utf-8").read()
    # The first formatted traceback loads its helpers (~25 ms here): not on a request's path.
    try:
        raise ValueError("warm")
    except ValueError as e:
        traceback.format_exception(e)
    # Measured in the guest: the first chdir costs 0.3 ms, the first json.loads 0.15 ms.
    os.chdir(WORKDIR)
    json.loads('{"code": "print(1)", "stdin": ""}')
    os.write(1, READY_FRAME)
    (size,) = REQUEST.unpack(read_exact(0, REQUEST.size))
    request = json.loads(read_exact(0, size))
    os._exit = exit_process  # so the code's own os._exit(200) reports 200 too
    run_python(request["code"])


if __name__ == "__main__":
    main()
