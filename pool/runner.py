"""The runner: the first process inside every docker and process sandbox.

One program, kept whole on purpose: it is installed as a single file.

It reaches the sandbox as a read-only file with ``pool/wire.py`` and
``pool/runcode.py`` spliced in (``pool/guest.py``) and runs as::

    python3 -I /opt/sandpool/runner.py relay  <language> [RLIMIT_<NAME>=<soft>:<hard> ...]
    python3 -I /opt/sandpool/runner.py direct <language> <stdout fd> <stderr fd> <status fd> [...]

Standard library only. The channel (see pool/wire.py):
- The runner sets its rlimits (inherited by the code), warms the compiler,
  forks the *child* that will run the user's code, and reports ``R`` (ready).
  The child blocks reading its request.
- The daemon writes one request on stdin. stdin is never closed: that
  half-close alone costs milliseconds inside dockerd.
- The child points fds 0/1/2 at the request's stdin data and two pipes, then
  runs the code (Python as ``__main__``, or ``sh -c`` for shell).
- JavaScript: the child, set up the same way, execs node on NODE_RUNNER
  (``pool/node_runner.js``) before the runner reports ready; node reads the
  request and sends the outcome and status itself, and the runner waits for
  its one ready byte first, so a request never waits for node to start.
- relay mode (docker): the runner relays the pipes as ``O``/``E`` frames on its
  own stdout and ends with one ``X`` frame carrying the exit status. A Python
  child reports its status on a private pipe and parks, so its exit teardown
  stays off the request's path; a child that dies first (``os._exit``, a
  signal, the OOM killer, ``sh``) is reported from ``waitpid`` (``128 +
  signal``). The daemon takes the status only as the program's claim.
- direct mode (the process tier, which can hand a sandbox more than one pipe):
  the child's stdout, stderr and status go to three write ends the daemon holds
  the read ends of, as raw bytes with no relay hop. The runner only writes
  ``R``, and ``X`` if the child dies without reporting. Nothing on those pipes
  is framed, so nothing the code writes there can pass for the runner's frames.
- Either way the runner then parks until the daemon destroys the sandbox: its
  own exit would cost dockerd CPU on the daemon's critical path.
"""

# Everything the child needs is imported before the fork: an import after
# hand-out costs milliseconds on the request's path.
import contextlib
import ctypes
import gc
import os
import resource
import select
import signal
import socket
import sys
import threading
from typing import NoReturn

from pool.isolate import (
    SANDBOX_NAMESPACES,
    drop_privileges,
    fork_into_new_pid_namespace,
    install_seccomp,
    join_cgroups,
    loopback_up,
    mount_scratch,
    set_hostname,
    set_user_quotas,
    unshare,
)
from pool.runcode import (
    Results,
    flush_std_streams,
    fresh_main,
    out_dir_frames,
    outcome_frames,
    prepare,
    prepare_interpreter,
    run_main,
    split_final_expression,
    take_request,
    write_all,
)
from pool.wire import (
    CGROUP_MOUNT,
    CHUNK,
    DIRECT,
    DRAIN_READS,
    EXIT,
    GARBLED_STATUS,
    GONE,
    MATPLOTLIB_CONFIG_DIR,
    MAX_CONTROL_BYTES,
    OUTCOME_KINDS,
    READY,
    SESSION,
    SPAWN_FDS,
    STATUS,
    STDERR,
    STDOUT,
    TEMPLATE,
    TEMPLATE_READY,
    WORKDIR,
    FrameDecoder,
    GuestRequest,
    OutcomeLimits,
    RunnerArguments,
    SandboxExit,
    SpawnOrder,
    WireError,
    frame,
)

JAVASCRIPT = "javascript"
NODE_RUNNER = "node_runner.js"  # installed beside this file (pool/guest.py's NODE_RUNNER)
# node's start to its ready byte: far above a normal start (docs/javascript.md),
# and above the daemon's own wait, which ends a slow sandbox first.
NODE_READY_TIMEOUT_S = 60.0
EX_UNAVAILABLE = 69  # node never became ready: the sandbox fails to start
EX_SOFTWARE = 70  # the runner itself failed
SANDBOX_HOSTNAME = "sandbox"
HUGE_PAGE = 2 << 20
MADV_COLLAPSE = 25
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4


def park() -> NoReturn:
    while True:
        signal.pause()


class Session:
    """What a session's child keeps from run to run: its ``__main__`` and what out/ held."""

    def __init__(self) -> None:
        self.namespace = fresh_main()
        self.seen: dict[str, tuple[int, int, int]] = {}


def run_python(
    request: GuestRequest, base: str, status_w: int, results: Results, session: "Session | None"
) -> None:
    """Run the code, then send its outcome and status on the status channel."""
    real_exit, me = os._exit, os.getpid()
    seen = session.seen if session is not None else None

    def exit_with_outcome(status: int) -> NoReturn:
        # The code's own os._exit(n): its files still come back. Not from a
        # process the code forked: only this one's exit ends the run.
        if os.getpid() == me:
            report(status_w, base, request.limits, results, None, status, seen)
        real_exit(status)

    os._exit = exit_with_outcome
    if session is None:
        # Wait for non-daemon threads first, as interpreter exit would.
        before_exit = [threading._shutdown]  # type: ignore[attr-defined]
        status, error = run_main(request, before_exit, results)
    else:  # a cell: its threads run on into the next one
        status, error = run_main(request, [], results, session.namespace)
    os._exit = real_exit
    report(status_w, base, request.limits, results, error, status, seen)


def report(
    status_w: int, base: str, limits: OutcomeLimits, results: Results,
    error: dict[str, str] | None, status: int,
    seen: "dict[str, tuple[int, int, int]] | None" = None,
) -> None:
    """The outcome, then the EXIT frame; exits with ``status`` if the code closed the channel."""
    try:
        outcome = outcome_frames(base, limits, results, error, seen=seen)
        write_all(status_w, outcome + frame(EXIT, STATUS.pack(status)))
    except OSError:  # the code closed the status pipe: report by exiting instead
        os._exit(status)


def run_shell(
    request: GuestRequest, base: str, status_w: int, session: "Session | None"
) -> None:
    """``sh -c`` in a process of its own, so the files it leaves in out/ still come back."""
    if "\0" in request.code:
        os.write(2, b"sh: the script contains a NUL byte\n")
        status = 2
    else:
        pid = os.fork()
        if pid == 0:
            os.execv("/bin/sh", ["sh", "-c", request.code, "sh", *request.argv])
        status = reap(pid)
    seen = session.seen if session is not None else None
    try:
        files = b"".join(out_dir_frames(base, request.limits, seen))
        write_all(status_w, files + frame(EXIT, STATUS.pack(status)))
    except OSError:
        os._exit(status)


def prctl(option: int, value: int) -> None:
    # Without libc or prctl the sandbox's own isolation still holds.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)


def stdin_memfd(data: str) -> int:
    fd = os.memfd_create("stdin")
    write_all(fd, data.encode("utf-8", "surrogatepass"))
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def rehearse_request() -> None:
    """Walk the request path once on a dummy request before parking.

    The child is a fork of the runner, so its first write to each shared page
    (a refcount, an allocator pool) copies that page in a page fault, which
    costs microseconds each on a VM; walking the path here first leaves far
    fewer for the request (docs/performance.md has the figures).
    """
    request_r, request_w = os.pipe()
    rehearsal = GuestRequest("x = 1\nx", "", [("f", b"x")], {}, [], OutcomeLimits(1, 1, 1, 1))
    write_all(request_w, rehearsal.encode())
    request = take_request(request_r)
    body, last = split_final_expression(request.code)
    namespace = fresh_main(request.argv)
    exec(body, namespace)
    results = Results(0)
    results.add_value(eval(last, namespace) if last is not None else None)
    # out/ is not made yet: the walk finds nothing, but its code is touched.
    outcome_frames(os.getcwd(), request.limits, results, None) + frame(EXIT, STATUS.pack(0))
    # print() and flush() as the code's would, into /dev/null: fd 1 is the runner's channel.
    saved_stdout = os.dup(1)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    print(request.stdin, end="x")
    flush_std_streams()
    os.dup2(saved_stdout, 1)
    for fd in (stdin_memfd(request.stdin), null, saved_stdout, request_r, request_w):
        os.close(fd)


def rehearse_relay() -> None:
    """The runner's side of ``rehearse_request``: its pages are shared with the child too."""
    status_r, status_w = os.pipe()
    write_all(status_w, frame(EXIT, STATUS.pack(0)))
    poller = select.poll()
    poller.register(status_r, select.POLLIN)
    decoder = FrameDecoder()
    frames = [decoder.feed(os.read(fd, CHUNK)) for fd, _ in poller.poll()]
    b"".join(frame(kind, payload) for batch in frames for kind, payload in batch)
    os.close(status_r)
    os.close(status_w)


def child(
    runner: int, language: str, out_w: int, err_w: int, status_w: int, results: Results
) -> NoReturn:
    # Die with the runner: a killed runner must never leave the code running.
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != runner:
        os._exit(70)  # the runner died before the line above took effect
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")  # under memory pressure the kernel kills the code, not the runner
    rehearse_request()
    request = take_request(0)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    for fd in (out_w, err_w):
        os.close(fd)
    session = None
    if request.session:
        # The channel moves off fd 0 (each run's stdin goes there) for the
        # next requests; the code can read it, but it is its own session's.
        request_fd = os.dup(0)
        session = Session()
    gc.enable()
    while True:
        if session is not None:
            # This run is taken: a child that dies from here on ran (part of) it.
            write_all(status_w, frame(SESSION))
        results.limit = request.limits.max_display_bytes
        results.items, results.used = [], 0
        stdin_fd = stdin_memfd(request.stdin)
        os.dup2(stdin_fd, 0)
        os.close(stdin_fd)
        try:
            base = prepare(request)
        except OSError as e:  # a full scratch disk: the code never runs
            os.write(2, f"sandpool: cannot write the request's files: {e}\n".encode())
            write_all(status_w, frame(EXIT, STATUS.pack(1)))
        else:
            if language == "shell":
                run_shell(request, base, status_w, session)
            else:
                run_python(request, base, status_w, results, session)
        if session is None:
            park()
        request = take_request(request_fd)
        if not request.session:
            os._exit(EX_SOFTWARE)  # the daemon never mixes them: stop rather than guess


def exec_node(runner: int, out_w: int, err_w: int, status_w: int, ready_w: int) -> NoReturn:
    """The JavaScript child: set up as a Python one, then node in its place.

    fd 0 becomes an empty memfd that node fills with the request's stdin (node
    cannot dup2, and code reading fd 0 must not read the request channel);
    node gets the channel on another fd with the status and ready fds.
    """
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # kept across exec
    if os.getppid() != runner:
        os._exit(70)
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")
    runner_stderr = os.dup(2)  # not inheritable: closed by a successful exec
    request_fd = os.dup(0)
    stdin_fd = os.memfd_create("stdin")
    os.dup2(stdin_fd, 0)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    for fd in (stdin_fd, out_w, err_w):
        os.close(fd)
    for fd in (request_fd, status_w, ready_w):
        os.set_inheritable(fd, True)
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), NODE_RUNNER)
    try:
        os.execvp("node", ["node", script, str(request_fd), str(status_w), str(ready_w)])
    except OSError as e:
        os.write(runner_stderr, f"runner: cannot run node: {e}\n".encode())
    os._exit(127)


def wait_for_node(pid: int, ready_r: int) -> None:
    """Return once node has written its ready byte; exit EX_UNAVAILABLE if it ended
    or was not ready within NODE_READY_TIMEOUT_S first."""
    readable, _, _ = select.select([ready_r], [], [], NODE_READY_TIMEOUT_S)
    ready = bool(readable) and os.read(ready_r, 1) != b""
    os.close(ready_r)
    if ready:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    os.write(2, f"runner: node ended with status {reap(pid)} before it was ready\n".encode())
    os._exit(EX_UNAVAILABLE)


def reap(pid: int) -> int:
    """Wait for the child; its exit status as a shell reports it (``128 + signal``)."""
    _, wait_status = os.waitpid(pid, 0)
    status = os.waitstatus_to_exitcode(wait_status)
    return 128 - status if status < 0 else status


def relay(pid: int, out_r: int, err_r: int, status_r: int) -> None:
    """Relay the child's output and outcome until its status, then return (to park).

    A session's child sends SESSION as it takes each request: the relay goes
    on after each EXIT frame, until the child has ended. Then it sends GONE,
    after the EXIT frame of a run the child had taken, or alone between runs,
    so the daemon never takes an old status for a request the child never read.
    """
    kinds = {out_r: STDOUT, err_r: STDERR}
    pidfd = os.pidfd_open(pid)
    poller = select.poll()
    for fd in (out_r, err_r, status_r, pidfd):
        poller.register(fd, select.POLLIN)
    status_frames = FrameDecoder()
    session = in_run = False
    gone = False  # the child has been reaped
    while True:
        garbled = False
        status = None
        frames: list[bytes] = []
        while status is None and not (gone and session and not in_run):
            for fd, _ in poller.poll():
                if fd in kinds:
                    data = os.read(fd, CHUNK)
                    if data:
                        frames.append(frame(kinds[fd], data))
                    else:
                        poller.unregister(fd)
                elif fd == status_r:
                    # The child's outcome frames pass on as they are (the daemon holds
                    # them to its limits); its EXIT frame is the status.
                    data = os.read(status_r, CHUNK)
                    try:
                        for kind, payload in status_frames.feed(data) if data else []:
                            if kind == EXIT and len(payload) == STATUS.size:
                                (status,) = STATUS.unpack(payload)
                                in_run = False
                                break  # a session's next run starts after it
                            if kind == SESSION and not payload:
                                session = in_run = True
                            elif kind in OUTCOME_KINDS:
                                frames.append(frame(kind, payload))
                            else:
                                raise WireError("not an outcome frame")
                    except WireError:
                        # The code wrote to its status channel: nothing from it is
                        # trusted now. Stop it and report the violation.
                        garbled = True
                        if not gone:  # not reaped yet: the pid is still the child's
                            os.kill(pid, signal.SIGKILL)
                            status, gone = reap(pid), True
                        break
                    if not data:  # closed before its status: wait for the process
                        poller.unregister(status_r)
                elif fd == pidfd:
                    poller.unregister(pidfd)
                    reaped = reap(pid)
                    gone = True
                    if not session or in_run:
                        status = reaped
            if frames and status is None:
                write_all(1, b"".join(frames))
                frames = []
        if status is not None:
            # Output the child wrote before it finished is in the pipes; a process it
            # left behind may hold them open and keep writing, so read what is there,
            # then stop.
            for fd, kind in kinds.items():
                os.set_blocking(fd, False)
                for _ in range(DRAIN_READS):
                    try:
                        data = os.read(fd, CHUNK)
                    except OSError:
                        break
                    if not data:
                        break
                    frames.append(frame(kind, data))
            frames.append(frame(EXIT, STATUS.pack(GARBLED_STATUS if garbled else status)))
        if session and (gone or garbled):
            frames.append(frame(GONE))
        write_all(1, b"".join(frames))
        if not session or gone or garbled:
            return


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
    write_all(1, frame(EXIT, STATUS.pack(reap(pid))))


def set_limits(limits: dict[str, tuple[int, int]]) -> None:
    """The sandbox's rlimits, inherited by the code. Exits 64 on a name this Python lacks."""
    for name, (soft, hard) in limits.items():
        number = getattr(resource, name, None)
        if not isinstance(number, int):
            usage_error(f"no such rlimit: {name}")
        resource.setrlimit(number, (soft, hard))


def usage_error(message: str) -> NoReturn:
    os.write(2, f"runner: {message}\n".encode())
    os._exit(64)  # EX_USAGE: the daemon sees a runner that never became ready


def main() -> None:
    try:
        arguments = RunnerArguments.parse(sys.argv[1:])
    except WireError as e:
        usage_error(str(e))
    language = arguments.language
    if arguments.mode == TEMPLATE and language == JAVASCRIPT:
        usage_error("node cannot fork: javascript has no template")
    if arguments.mode != TEMPLATE:  # a template's sandboxes set them on themselves
        set_limits(arguments.limits)
    results = Results(0)  # its limit comes with the request
    javascript = language == JAVASCRIPT
    try:
        if not javascript:  # matplotlib's set-up and its environment are Python's
            prepare_interpreter(arguments.preload, results)
    except Exception as e:  # a preload that fails: the sandbox never reports ready
        usage_error(f"preload failed: {type(e).__name__}: {e}")
    # One throw-away compile makes the first real one cheaper.
    compile("warm = [i * 2 for i in range(3)]", "<warm>", "exec")
    # No collection may walk the heap after the fork: it would copy every page.
    gc.collect()
    gc.freeze()
    gc.disable()
    if arguments.mode == TEMPLATE and arguments.fds is not None:
        control, seccomp = arguments.fds
        template(control, seccomp, arguments.limits, language, results)
    serve(arguments.mode == DIRECT, language, arguments.fds, results)


def serve(
    direct: bool, language: str, fds: "tuple[int, ...] | None", results: Results
) -> NoReturn:
    """Fork the child that will run the code, report ready, then watch or relay it."""
    javascript = language == JAVASCRIPT
    if fds is not None:
        out_w, err_w, status_w = fds
        os.set_inheritable(status_w, False)  # as a pipe of our own would be: not for sh
        read_ends: tuple[int, ...] = ()
    else:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        status_r, status_w = os.pipe()
        read_ends = (out_r, err_r, status_r)
    ready_r, ready_w = os.pipe() if javascript else (-1, -1)
    runner = os.getpid()
    pid = os.fork()
    if pid == 0:
        for fd in read_ends:
            os.close(fd)
        try:
            if javascript:
                os.close(ready_r)
                exec_node(runner, out_w, err_w, status_w, ready_w)
            child(runner, language, out_w, err_w, status_w, results)
        finally:
            os._exit(EX_SOFTWARE)  # only reached if the runner itself failed
    for fd in (out_w, err_w, status_w):
        os.close(fd)
    protect_runner()
    if javascript:
        os.close(ready_w)
        wait_for_node(pid, ready_r)
    if direct:
        write_all(1, frame(READY))
        watch_child(pid)
    else:
        rehearse_relay()
        write_all(1, frame(READY))
        relay(pid, out_r, err_r, status_r)
    park()


# --- The fork tier's template ------------------------------------------------------


def template(
    control_fd: int, seccomp_fd: int, limits: "dict[str, tuple[int, int]]", language: str,
    results: Results,
) -> NoReturn:
    """Fork one sandbox per SpawnOrder on the control socket; report each one's end.

    Runs no code of anyone's: it only reads orders, forks and reaps. It exits
    when the daemon closes the socket, and its sandboxes die with it (it is
    PID 1 of the namespace theirs are nested in).
    """
    with os.fdopen(seccomp_fd, "rb") as f:
        program = f.read()
    collapse_heap()
    control = socket.socket(fileno=control_fd)
    own_pid_namespace = os.open("/proc/self/ns/pid", os.O_RDONLY)
    hidden = [f"{CGROUP_MOUNT}/{name}" for name in sorted(os.listdir(CGROUP_MOUNT))]
    wake_r, wake_w = os.pipe()
    for fd in (wake_r, wake_w):
        os.set_blocking(fd, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda number, frame: None)
    live: dict[int, str] = {}  # pid of each sandbox's first process -> its id
    control.send(TEMPLATE_READY)
    poller = select.poll()
    poller.register(control.fileno(), select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        for fd, _ in poller.poll():
            if fd == wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, CHUNK)
                reap_sandboxes(control, live)
                continue
            message, fds, _, _ = socket.recv_fds(control, MAX_CONTROL_BYTES, len(SPAWN_FDS))
            if not message:
                os._exit(0)  # the daemon is gone, or done with this template
            try:
                order = SpawnOrder.decode(message)
                if len(fds) != len(SPAWN_FDS):
                    raise WireError(f"a spawn order needs {len(SPAWN_FDS)} fds, got {len(fds)}")
            except WireError as e:
                usage_error(str(e))
            pid = spawn_sandbox(
                order, fds, own_pid_namespace, program, hidden, limits, language, results
            )
            for fd in fds:
                os.close(fd)
            if pid is None:
                control.send(SandboxExit(order.sandbox, EX_SOFTWARE).encode())
            else:
                live[pid] = order.sandbox


def collapse_heap() -> None:
    """Back the template's heap with huge pages where the kernel can (MADV_COLLAPSE).

    Each sandbox is a fork, and a fork copies a page-table entry per 4 KiB of
    what the template has written: one entry per 2 MiB instead makes it
    cheaper (docs/fork-tier.md has the figures). A kernel without it (before
    6.1) refuses with EINVAL, and nothing changes.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            anonymous = len(fields) < 6 or fields[5] == "[heap]"
            if not anonymous or not fields[1].startswith("rw"):
                continue
            low, high = (int(value, 16) for value in fields[0].split("-"))
            start = -(-low // HUGE_PAGE) * HUGE_PAGE
            end = high // HUGE_PAGE * HUGE_PAGE
            if end > start:
                libc.madvise(start, end - start, MADV_COLLAPSE)


def reap_sandboxes(control: socket.socket, live: "dict[int, str]") -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        sandbox = live.pop(pid, None)
        if sandbox is not None:
            control.send(SandboxExit(sandbox, os.waitstatus_to_exitcode(status)).encode())


def spawn_sandbox(
    order: SpawnOrder, fds: "list[int]", own_pid_namespace: int, program: bytes,
    hidden: "list[str]", limits: "dict[str, tuple[int, int]]", language: str, results: Results,
) -> "int | None":
    """Fork the sandbox's PID 1, in a PID namespace of its own; None if the fork failed."""
    try:
        pid = fork_into_new_pid_namespace(own_pid_namespace)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.write(fds[SPAWN_FDS.index("diagnostics")], f"template: {e}\n".encode())
        return None
    if pid == 0:
        sandbox(order, fds, program, hidden, limits, language, results)
    return pid


def sandbox(
    order: SpawnOrder, fds: "list[int]", program: bytes, hidden: "list[str]",
    limits: "dict[str, tuple[int, int]]", language: str, results: Results,
) -> NoReturn:
    """A sandbox's PID 1: its own mounts, then no privilege left, then a direct runner.

    Until ``install_seccomp`` it holds the template's capabilities (in the
    template's user namespace only) and runs nothing but the steps below.
    """
    request, channel, diagnostics, out_w, err_w, status_w = fds
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        # Born in the template's cgroup: join its own before the code's child
        # is forked, then make that the root of its cgroup namespace.
        join_cgroups(order.cgroup_procs)
        unshare(SANDBOX_NAMESPACES)
        mount_scratch(order.tmpfs_bytes, order.uid, WORKDIR, hidden, order.ptys)
        set_user_quotas(order.user_quotas)
        set_hostname(SANDBOX_HOSTNAME)
        loopback_up()
        for source, target in ((request, 0), (channel, 1), (diagnostics, 2)):
            os.dup2(source, target)
        keep = sorted({0, 1, 2, out_w, err_w, status_w})
        # Up to the hard limit: no fd the template held can be above it.
        above_all = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        for low, high in zip(keep, [*keep[1:], above_all], strict=True):
            os.closerange(low + 1, high)
        os.setsid()  # no terminal of the daemon's to reach (TIOCSTI)
        drop_privileges(order.uid)
        os.chdir(WORKDIR)  # its own, mode 0700
        os.makedirs(MATPLOTLIB_CONFIG_DIR, exist_ok=True)  # the template's was on its /tmp
        set_limits(limits)
        install_seccomp(program)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.write(2, f"sandbox set-up failed: {e}\n".encode())
        os._exit(EX_SOFTWARE)
    try:
        serve(True, language, (out_w, err_w, status_w), results)
    finally:
        os._exit(EX_SOFTWARE)


if __name__ == "__main__":
    main()
