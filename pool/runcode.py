"""Running a request's Python code as ``__main__``: what both guest runners share.

Spliced into ``pool/runner.py`` and ``pool/wasm_runner.py`` by ``pool/guest.py``
(a guest cannot import sandpool), so the same constraints as ``pool/wire.py``
hold: standard library only, no ``from __future__`` import, valid on every
interpreter a guest runs, and nothing here may write to the runner's channel.
"""

import atexit
import builtins
import contextlib
import linecache
import os
import sys
import traceback
import types
from collections.abc import Callable

from pool.wire import REQUEST, decode_request


def write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


def read_exact(fd: int, size: int) -> bytes:
    """``size`` bytes from ``fd``; the process exits 0 if the daemon hangs up first."""
    parts = []
    while size:
        chunk = os.read(fd, size)
        if not chunk:
            os._exit(0)  # the daemon destroyed the sandbox before sending a request
        parts.append(chunk)
        size -= len(chunk)
    return b"".join(parts)


def take_request(fd: int) -> "tuple[str, str]":
    """(code, stdin) of the one length-prefixed request on ``fd``. Raises WireError."""
    (size,) = REQUEST.unpack(read_exact(fd, REQUEST.size))
    return decode_request(read_exact(fd, size))


def exit_status(code: object) -> int:
    """The process exit status Python gives ``sys.exit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    with contextlib.suppress(Exception):
        print(code, file=sys.stderr)
    return 1


def fresh_main() -> "dict[str, object]":
    """The globals of a new, empty ``__main__``, registered as the running program's."""
    module = types.ModuleType("__main__")
    module.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = module
    sys.argv = ["-c"]
    return module.__dict__


def run_main(code: str, before_exit: "list[Callable[[], object]]") -> int:
    """Run ``code`` as ``python -c`` would, up to its exit functions; its exit status.

    Tracebacks start at the code's own frame and show its lines. Then each of
    ``before_exit`` (callables run as the interpreter's shutdown runs them:
    waiting for threads, atexit) is called; one that raises prints its
    traceback and turns a 0 status into 1.
    """
    namespace = fresh_main()
    # Register the source so tracebacks show the offending lines.
    linecache.cache["<string>"] = (len(code), None, code.splitlines(keepends=True), "<string>")
    status = 0
    try:
        exec(compile(code, "<string>", "exec"), namespace)
    except SystemExit as e:
        status = exit_status(e.code)
    except BaseException as e:
        tb = e.__traceback__
        traceback.print_exception(type(e), e, tb.tb_next if tb is not None else None)
        status = 1
    for step in [*before_exit, atexit._run_exitfuncs]:
        try:
            step()
        except BaseException:
            traceback.print_exc()
            status = status or 1
    flush_std_streams()
    return status


def flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(BaseException):
            stream.flush()  # type: ignore[union-attr]
