"""The guest runner of the wasm backend: runs inside CPython compiled to WASI.

It reaches the guest as a read-only file with ``pool/wire.py`` and
``pool/runcode.py`` spliced in (``pool/guest.py``), run as
``python3 -I /opt/sandpool/wasm_runner.py``; standard library only. WASI
preview 1 has no fork, no pidfd and no memfd, so unlike ``pool/runner.py`` the
user's code runs in this same interpreter, which is single-use: the host drops
the whole WebAssembly instance after one request.

The channel (the host side is ``WasmBackend``; framing in pool/wire.py):
- The runner imports what the code path needs, warms up and writes the ready
  frame on stdout, then blocks in ``os.read(0)`` (a pipe the host holds; the
  instance stays parked there).
- The host writes one request. The request's stdin data follows as raw bytes,
  then EOF: the host closes its end, so the code's ``sys.stdin`` is the real
  fd 0 and a read past the data returns EOF instead of blocking.
- stdout and stderr are the raw fds 1 and 2, pipes the host reads and caps.
  The runner writes nothing on them after the ready frame.
- The exit status is the WASI ``proc_exit`` status (``os._exit``, which also
  skips CPython's slow shutdown). WASI only carries 0..125, so a larger
  status is written to ``STATUS_DIR/STATUS_FILE`` first and the runner exits 125;
  the host reads that file only for status 125. Either way the status is the
  program's claim about itself, never a verdict.
- The run's outcome (pool/wire.py: files under out/, rich results, the
  error, then EXIT) has no pipe of its own in WASI preview 1: the runner
  writes its frames to ``STATUS_DIR/OUTCOME_FILE``, which the host reads, held
  to its limits, once the guest has ended.

Two halves, so a pool's memory image (pool/backends/wasm/image.py) can hold
the first: ``prepare_guest`` (imports, ``preload``, warm-up; no request, no
open file) and ``serve`` (fresh randomness, the ready frame, the one request).
Run as a program, ``main`` does both. A template guest runs ``prepare_image``
and stops; each guest started from its memory runs ``serve_image``. The
channel is the same either way.
"""

import gc
import io
import json
import os
import stat
import sys
import traceback
from typing import NoReturn

from pool.runcode import (
    Results,
    outcome_frames,
    prepare,
    prepare_interpreter,
    run_main,
    take_request,
    write_all,
)
from pool.wire import (
    EXIT,
    OUTCOME_FILE,
    PRELOAD,
    READY_FRAME,
    STATUS,
    STATUS_DIR,
    STATUS_FILE,
    WASI_MAX_STATUS,
    WORKDIR,
    frame,
)

_wasi_exit = os._exit


def exit_process(status: int) -> NoReturn:
    """``os._exit`` for any status: WASI's proc_exit carries only 0..125."""
    status &= 0xFF
    if status > WASI_MAX_STATUS:
        try:
            with open(f"{STATUS_DIR}/{STATUS_FILE}", "w") as f:
                f.write(str(status))
        except OSError:
            status = 1  # the code removed the status file's directory: say "failed"
        else:
            status = WASI_MAX_STATUS
    _wasi_exit(status)


def write_outcome(outcome: bytes) -> None:
    """The run's outcome frames, for the host to read once the guest has ended."""
    try:
        fd = os.open(f"{STATUS_DIR}/{OUTCOME_FILE}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError:
        return  # the code removed the status directory: no outcome
    try:
        write_all(fd, outcome)
    except OSError:
        pass  # a full status tmpfs: what was written is what the host gets
    finally:
        os.close(fd)


def preload_argument(argv: "list[str]") -> "list[str]":
    for word in argv:
        name, _, value = word.partition("=")
        if name == PRELOAD and value:
            return value.split(",")
    return []


def prepare_guest(preload: "list[str]") -> Results:
    """Everything before the ready frame that needs no request: a pool's memory image holds it.

    Nothing here may keep a file open or leave output unflushed: a guest
    started from the image has fresh fds and pipes behind the same numbers.
    """
    results = Results(0)  # its limit comes with the request
    prepare_interpreter(preload, results)
    # A throw-away compile makes the first real one cheaper.
    compile("warm = [i * 2 for i in range(3)]", "<warm>", "exec")
    io.TextIOWrapper(io.BytesIO(b"warm"), encoding="utf-8").read()
    # The first formatted traceback loads its helpers: not on a request's path.
    try:
        raise ValueError("warm")
    except ValueError as e:
        traceback.format_exception(e)
    # The first chdir and the first json.loads are slower than the next ones.
    os.chdir(WORKDIR)
    json.loads('{"code": "print(1)", "stdin": ""}')
    return results


def reseed() -> None:
    """Fresh state for the generators seeded at import: a guest started from a
    memory image would otherwise repeat its template's, and every sibling's."""
    for name in ("random", "numpy.random"):
        generator = sys.modules.get(name)
        if generator is not None:
            generator.seed()


# A memory image's template keeps what prepare_guest made here; each guest
# started from the image serves from it (pool/backends/wasm/image.py).
image_results: "Results | None" = None


def prepare_image(preload: "list[str]") -> None:
    """In a pool's template: prepare, and keep the result in the image.

    Raises RuntimeError if a file is left open: its fd would not exist in the
    guests started from the image (the daemon then starts them as usual).
    """
    global image_results
    image_results = prepare_guest(preload)
    font_manager = sys.modules.get("matplotlib.font_manager")
    if font_manager is not None:
        # Its cached fonts hold their files open; they reload on first use.
        font_manager._get_font.cache_clear()
    gc.collect()
    left_open = [fd for fd in range(3, 1024) if _is_open_file(fd)]
    if left_open:
        raise RuntimeError(f"files left open after the warm-up: fds {left_open}")


def _is_open_file(fd: int) -> bool:
    try:
        return not stat.S_ISDIR(os.fstat(fd).st_mode)  # the preopened directories stay
    except OSError:
        return False


def serve_image() -> NoReturn:
    """In a guest started from a memory image: serve its one request."""
    if image_results is None:
        os.write(2, b"sandpool: this memory image holds no prepared runner\n")
        exit_process(1)
    serve(image_results)


def serve(results: Results) -> NoReturn:
    """Report ready, take the one request, run it, exit with its status."""
    reseed()
    os.write(1, READY_FRAME)
    request = take_request(0)  # the request's stdin follows it on fd 0, raw
    results.limit = request.limits.max_display_bytes
    try:
        base = prepare(request)
    except OSError as e:  # a full scratch disk: the code never runs
        os.write(2, f"sandpool: cannot write the request's files: {e}\n".encode())
        exit_process(1)

    def exit_with_outcome(status: int, error: "dict[str, str] | None" = None) -> NoReturn:
        # Also the code's own os._exit(200): its files still come back.
        outcome = outcome_frames(base, request.limits, results, error, files=False)
        if outcome:  # nothing to return (the usual print(1)): no file at all
            write_outcome(outcome + frame(EXIT, STATUS.pack(status & 0xFF)))
        exit_process(status)

    os._exit = exit_with_outcome
    exit_with_outcome(*run_main(request, [], results))


def main() -> None:
    serve(prepare_guest(preload_argument(sys.argv[1:])))


if __name__ == "__main__":
    main()
