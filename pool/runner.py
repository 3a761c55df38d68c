"""The runner: the first process inside every sandbox. Standard library only.

It is passed to ``python3 -I -c`` by the backends, so it must stay self-contained
(it does not import sandpool; the framing constants live in ``pool.protocol`` too).

Protocol, chosen from measurements on the target host (issue 3):
- The runner starts, warms the compiler, forks the *child* that will run the
  user's code, and reports ``R`` (ready). The child blocks reading its request.
- The daemon writes one request on stdin: a 4-byte big-endian length and a JSON
  object ``{"code": str, "stdin": str}``. stdin is never closed: that half-close
  alone costs 2.5-3 ms inside dockerd.
- The child points fds 0/1/2 at the request's stdin data and two pipes, then runs
  the code (Python with ``__name__ == "__main__"``, or ``sh -c`` for shell).
- The runner relays the pipes as ``O``/``E`` frames (1 type byte, 4-byte length,
  payload) on its own stdout and ends with one ``X`` frame carrying the exit
  status. A Python child reports its status on a private pipe and parks, so its
  exit teardown (~1 ms) stays off the request's path; a child that dies first
  (``os._exit``, a signal, the OOM killer, ``sh``) is reported from ``waitpid``
  (``128 + signal`` for a signal). The daemon takes the status only as the
  program's claim about itself.
- The runner then parks until the daemon destroys the sandbox: its own exit
  would cost ~20 ms of dockerd CPU on the daemon's critical path.
- Direct mode (the process backend, which can hand a sandbox more than one
  pipe): argv names three write ends the daemon holds the read ends of. The
  child's stdout, stderr and status go there as raw bytes, with no relay hop
  (measured: request to status 0.92 -> 0.63 ms). The runner only writes ``R``,
  and ``X`` if the child dies without reporting. Nothing on those pipes is
  framed, so nothing the code writes there can pass for the runner's frames.
"""

# Everything the child needs is imported before the fork: an import after
# hand-out costs milliseconds on the request's path.
import atexit
import builtins
import contextlib
import ctypes
import gc
import json
import linecache
import os
import select
import signal
import struct
import sys
import threading
import traceback
import types
from typing import NoReturn

FRAME = struct.Struct(">cI")
REQUEST = struct.Struct(">I")
STATUS = struct.Struct(">i")
CHUNK = 65536
DRAIN_READS = 64  # after the child is done, read at most this many chunks of leftovers
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return FRAME.pack(kind, len(payload)) + payload


def write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


def read_exact(fd: int, size: int) -> bytes:
    parts = []
    while size:
        chunk = os.read(fd, size)
        if not chunk:
            os._exit(0)  # the daemon went away before sending a request
        parts.append(chunk)
        size -= len(chunk)
    return b"".join(parts)


def park() -> NoReturn:
    while True:
        signal.pause()


def exit_status(code: object) -> int:
    """The process exit status Python gives ``sys.exit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    with contextlib.suppress(Exception):
        print(code, file=sys.stderr)
    return 1


def flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(BaseException):
            stream.flush()  # type: ignore[union-attr]


def run_python(code: str, status_w: int) -> NoReturn:
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
        # Wait for non-daemon threads, as interpreter exit would.
        threading._shutdown()  # type: ignore[attr-defined]
        atexit._run_exitfuncs()
    except BaseException:
        traceback.print_exc()
        status = status or 1
    flush_std_streams()
    try:
        os.write(status_w, STATUS.pack(status))
    except OSError:  # the code closed the status pipe: report by exiting instead
        os._exit(status)
    park()


def prctl(option: int, value: int) -> None:
    # Without libc or prctl the sandbox's own isolation still holds.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)


def take_request(fd: int) -> tuple[str, str]:
    """(code, stdin) of the one length-prefixed JSON request on ``fd``."""
    (size,) = REQUEST.unpack(read_exact(fd, REQUEST.size))
    request = json.loads(read_exact(fd, size))
    return request["code"], request["stdin"]


def stdin_memfd(data: str) -> int:
    fd = os.memfd_create("stdin")
    write_all(fd, data.encode("utf-8", "surrogatepass"))
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def rehearse_request() -> None:
    """Walk the request path once on a dummy request before parking.

    The child is a fork of the runner, so its first write to each shared page
    (a refcount, an allocator pool) copies that page in a page fault. On this
    project's target host a fault costs ~7 µs, and a ``print(1)`` request took
    ~85 of them; walking the path here first leaves ~25 (median request to
    exit frame, runner on the host: 1.16 -> 0.87 ms, with ``rehearse_relay``).
    Copying the whole heap instead (MADV_POPULATE_WRITE) gained 0.07 ms more
    for ~8 MiB per sandbox.
    """
    request_r, request_w = os.pipe()
    body = b'{"code": "pass", "stdin": ""}'
    write_all(request_w, REQUEST.pack(len(body)) + body)
    code, stdin = take_request(request_r)
    module = types.ModuleType("__main__")
    module.__dict__["__builtins__"] = builtins
    exec(compile(code, "<string>", "exec"), module.__dict__)
    # print() and flush() as the code's would, into /dev/null: fd 1 is the runner's channel.
    saved_stdout = os.dup(1)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    print(stdin, end="x")
    flush_std_streams()
    os.dup2(saved_stdout, 1)
    for fd in (stdin_memfd(stdin), null, saved_stdout, request_r, request_w):
        os.close(fd)


def rehearse_relay() -> None:
    """The runner's side of ``rehearse_request``: its pages are shared with the child too."""
    status_r, status_w = os.pipe()
    write_all(status_w, STATUS.pack(0))
    poller = select.poll()
    poller.register(status_r, select.POLLIN)
    frames = [frame(b"O", os.read(fd, CHUNK)) for fd, _ in poller.poll()]
    frames.append(frame(b"X", STATUS.pack(0)))
    b"".join(frames)
    os.close(status_r)
    os.close(status_w)


def child(runner: int, language: str, out_w: int, err_w: int, status_w: int) -> NoReturn:
    # Die with the runner: a killed runner must never leave the code running.
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != runner:
        os._exit(70)  # the runner died before the line above took effect
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")  # under memory pressure the kernel kills the code, not the runner
    rehearse_request()
    code, stdin = take_request(0)
    stdin_fd = stdin_memfd(stdin)
    os.dup2(stdin_fd, 0)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    for fd in (stdin_fd, out_w, err_w):
        os.close(fd)
    gc.enable()
    if language == "shell":
        if "\0" in code:
            os.write(2, b"sh: the script contains a NUL byte\n")
            os._exit(2)
        os.execv("/bin/sh", ["sh", "-c", code])  # status_w is close-on-exec
    run_python(code, status_w)


def reap(pid: int) -> int:
    """Wait for the child; its exit status as a shell reports it (``128 + signal``)."""
    _, wait_status = os.waitpid(pid, 0)
    status = os.waitstatus_to_exitcode(wait_status)
    return 128 - status if status < 0 else status


def relay(pid: int, out_r: int, err_r: int, status_r: int) -> None:
    kinds = {out_r: b"O", err_r: b"E"}
    pidfd = os.pidfd_open(pid)
    poller = select.poll()
    for fd in (out_r, err_r, status_r, pidfd):
        poller.register(fd, select.POLLIN)
    status = None
    while status is None:
        frames = []
        for fd, _ in poller.poll():
            if fd in kinds:
                data = os.read(fd, CHUNK)
                if data:
                    frames.append(frame(kinds[fd], data))
                else:
                    poller.unregister(fd)
            elif fd == status_r:
                data = os.read(status_r, STATUS.size)
                if len(data) == STATUS.size:
                    (status,) = STATUS.unpack(data)
                else:  # closed by exec, or garbage: wait for the process instead
                    poller.unregister(status_r)
            else:
                status = reap(pid)
        if frames and status is None:
            write_all(1, b"".join(frames))
    # Output the child wrote before it finished is in the pipes; a process it
    # left behind may hold them open and keep writing, so read what is there, then stop.
    for fd, kind in kinds.items():
        os.set_blocking(fd, False)
        for _ in range(DRAIN_READS):
            try:
                data = os.read(fd, CHUNK)
            except BlockingIOError:
                break
            if not data:
                break
            frames.append(frame(kind, data))
    frames.append(frame(b"X", STATUS.pack(status)))
    write_all(1, b"".join(frames))


def protect_runner() -> None:
    """Keep the code (same uid, forked from us) away from the runner's channel.

    Not dumpable: /proc/<runner>/fd and /mem become root's and ptrace needs a
    capability the sandbox lacks, so the code cannot write frames on the
    runner's stdout or stop it. SIGINT would raise KeyboardInterrupt in relay():
    ignore it (as PID 1 the runner ignores SIGTERM and SIGKILL from inside anyway).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    prctl(PR_SET_DUMPABLE, 0)


def watch_child(pid: int) -> None:
    """Direct mode: report the child's status only if it dies without reporting it."""
    write_all(1, frame(b"X", STATUS.pack(reap(pid))))


def main() -> None:
    language = sys.argv[1] if len(sys.argv) > 1 else "python"
    direct = len(sys.argv) == 5
    # One throw-away compile saves ~0.8 ms on the first real one.
    compile("warm = [i * 2 for i in range(3)]", "<warm>", "exec")
    # No collection may walk the heap after the fork: it would copy every page.
    gc.collect()
    gc.freeze()
    gc.disable()
    if direct:
        out_w, err_w, status_w = (int(fd) for fd in sys.argv[2:5])
        os.set_inheritable(status_w, False)  # as a pipe of our own would be: not for sh
        read_ends: tuple[int, ...] = ()
    else:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        status_r, status_w = os.pipe()
        read_ends = (out_r, err_r, status_r)
    runner = os.getpid()
    pid = os.fork()
    if pid == 0:
        for fd in read_ends:
            os.close(fd)
        try:
            child(runner, language, out_w, err_w, status_w)
        finally:
            os._exit(70)  # only reached if the runner itself failed
    for fd in (out_w, err_w, status_w):
        os.close(fd)
    protect_runner()
    if direct:
        write_all(1, frame(b"R"))
        watch_child(pid)
    else:
        rehearse_relay()
        write_all(1, frame(b"R"))
        relay(pid, out_r, err_r, status_r)
    park()


if __name__ == "__main__":
    main()
