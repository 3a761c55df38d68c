"""Running a request's Python code as ``__main__``: what both guest runners share.

Spliced into ``pool/runner.py`` and ``pool/wasm_runner.py`` by ``pool/guest.py``
(a guest cannot import sandpool), so the same constraints as ``pool/wire.py``
hold: standard library only, no ``from __future__`` import, valid on every
interpreter a guest runs, and nothing here writes to the runner's channel
except through the ``emit`` callable a runner passes.

A run, as a notebook cell gives it: the request's files are written under the
working directory and ``out/`` is made; the code runs with the request's
``env`` and ``argv``; the value of a final bare expression and every
matplotlib figure shown or left open become rich results; an uncaught
exception becomes the outcome's error (and its traceback goes to stderr as
always); then every entry under ``out/`` is reported. All of it is held to the
request's OutcomeLimits here too, so a guest never sends what the daemon would
drop; the daemon enforces them again whatever arrives.
"""

import ast
import atexit
import builtins
import contextlib
import importlib
import importlib.util
import io
import linecache
import os
import stat
import sys
import traceback
import types
from collections.abc import Callable

from pool.wire import (
    DISPLAY,
    ERROR,
    FILE_OUT,
    MATPLOTLIB_CACHE,
    MATPLOTLIB_CONFIG_DIR,
    MAX_ERROR_BYTES,
    OUT_DIR,
    REQUEST,
    GuestRequest,
    OutcomeLimits,
    content_frames,
    header_frame,
)

# matplotlib draws into this module's figures' PNGs (MPLBACKEND names it);
# pyplot.show() hands it the open figures, like a notebook's inline backend.
DISPLAY_BACKEND = "sandpool_display"
MAX_REPR_CHARS = 64 * 1024  # a final expression's repr, cut beyond
MAX_OUT_DEPTH = 32  # directories below out/ that are looked into


def prepare_interpreter(preload: "list[str]", results: "Results") -> None:
    """Before the runner reports ready: matplotlib's backend and writable config,
    then ``preload`` imported and warmed. Raises ImportError for a missing module.

    Warming runs each preloaded library's first-call paths once (a figure
    drawn to PNG, a CSV parsed and grouped), so no request pays for them.
    """
    install_display_backend(results)
    # One thread per numeric library: a sandbox has a fraction of a core and a
    # pids limit, and BLAS would start a thread per host core at import.
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    os.environ.setdefault("MPLCONFIGDIR", MATPLOTLIB_CONFIG_DIR)
    if os.path.isdir(MATPLOTLIB_CACHE):  # the image's font cache: no rebuild per sandbox
        with contextlib.suppress(OSError):
            os.makedirs(os.environ["MPLCONFIGDIR"], exist_ok=True)
            for name in os.listdir(MATPLOTLIB_CACHE):
                with open(f"{MATPLOTLIB_CACHE}/{name}", "rb") as source, open(
                    f"{os.environ['MPLCONFIGDIR']}/{name}", "wb"
                ) as target:
                    target.write(source.read())
    for name in preload:
        importlib.import_module(name)
    warm()


def warm() -> None:
    pandas = sys.modules.get("pandas")
    if pandas is not None:
        frame = pandas.read_csv(io.StringIO("k,v\na,1\nb,2\na,3\n"))
        frame.groupby("k")["v"].agg(["sum", "mean"]).to_string()
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        # A line with a legend, and a titled bar chart on category labels (the
        # first of each costs tens of ms more than the next), then pandas' own
        # plotting module, which it imports at the first .plot.
        figure = pyplot.figure()
        figure.gca().plot([0, 1], [1, 0], label="warm")
        figure.gca().legend()
        figure.savefig(io.BytesIO(), format="png")
        pyplot.close(figure)
        figure = pyplot.figure()
        figure.gca().bar(["a", "b"], [1, 2])
        figure.gca().set_title("warm")
        figure.savefig(io.BytesIO(), format="png")
        pyplot.close(figure)
        if pandas is not None:
            pandas.Series([1, 2], index=["a", "b"]).plot.bar(title="warm")
            pyplot.gcf().savefig(io.BytesIO(), format="png")
            pyplot.close("all")


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


def take_request(fd: int) -> GuestRequest:
    """The one request on ``fd`` (REQUEST, header, contents). Raises WireError."""
    header_size, contents_size = REQUEST.unpack(read_exact(fd, REQUEST.size))
    header = read_exact(fd, header_size)
    return GuestRequest.decode(header, read_exact(fd, contents_size))


def exit_status(code: object) -> int:
    """The process exit status Python gives ``sys.exit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    with contextlib.suppress(Exception):
        print(code, file=sys.stderr)
    return 1


def fresh_main(argv: "list[str] | None" = None) -> "dict[str, object]":
    """The globals of a new, empty ``__main__``, registered as the running program's."""
    module = types.ModuleType("__main__")
    module.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = module
    sys.argv = ["-c", *(argv or [])]
    return module.__dict__


def prepare(request: GuestRequest) -> str:
    """The request's files under the working directory (WORKDIR in every tier), an
    empty ``out/``, its env; returns that directory. Raises OSError.

    Paths were validated by the daemon (relative, no ``..``); each file is
    created new and never through a link, whatever was there.
    """
    base = os.getcwd()
    for path, content in request.files:
        parts = path.split("/")
        if path.startswith("/") or any(part in ("", ".", "..") for part in parts):
            raise OSError(f"refused file path {path!r}")
        directory = base
        for part in parts[:-1]:
            directory = f"{directory}/{part}"
            with contextlib.suppress(FileExistsError):
                os.mkdir(directory)
        # A session's earlier run may have left this path: replaced, never
        # written through (a link there stays the code's own business).
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{base}/{path}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(f"{base}/{path}", flags, 0o644)
        try:
            write_all(fd, content)
        finally:
            os.close(fd)
    with contextlib.suppress(FileExistsError):
        os.mkdir(f"{base}/{OUT_DIR}")
    os.environ.update(request.env)
    return base


class Results:
    """The rich results of one run, rendered as they come and held to the limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.items: list[tuple[str, bytes]] = []  # (type, data)

    def add(self, mime: str, data: bytes) -> None:
        if self.used < self.limit:
            self.items.append((mime, data))
            self.used += len(data)

    def add_figures(self) -> None:
        """Every open matplotlib figure as a PNG, then closed (a notebook's show())."""
        pyplot = sys.modules.get("matplotlib.pyplot")
        if pyplot is None:
            return
        for number in pyplot.get_fignums():
            figure = pyplot.figure(number)
            if self.used < self.limit:
                buffer = io.BytesIO()
                figure.savefig(buffer, format="png")
                self.add("image/png", buffer.getvalue())
            pyplot.close(figure)

    def add_value(self, value: object) -> None:
        if value is not None:
            text = repr(value)
            if len(text) > MAX_REPR_CHARS:
                text = text[:MAX_REPR_CHARS] + "..."
            self.add("text/plain", text.encode("utf-8", "replace"))


class DisplayBackend:
    """The matplotlib backend ``module://sandpool_display``, for MPLBACKEND.

    Made by this import finder when matplotlib first imports it, so its
    FigureCanvas is a real attribute (matplotlib reads the module's vars) and
    Agg is loaded only by code that plots. Nothing on disk: no path the code
    could write to is ever imported.
    """

    def __init__(self, results: "Results") -> None:
        self.results = results

    def find_spec(self, name: str, path: object = None, target: object = None) -> object:
        if name != DISPLAY_BACKEND:
            return None
        return importlib.util.spec_from_loader(name, self)  # type: ignore[arg-type]

    def create_module(self, spec: object) -> None:
        return None  # the default module

    def exec_module(self, module: types.ModuleType) -> None:
        agg = importlib.import_module("matplotlib.backends.backend_agg")
        results = self.results

        def show(*args: object, **kwargs: object) -> None:
            results.add_figures()

        module.FigureCanvas = agg.FigureCanvasAgg  # type: ignore[attr-defined]
        module.FigureManager = agg.FigureManagerBase  # type: ignore[attr-defined]
        module.show = show  # type: ignore[attr-defined]


def install_display_backend(results: Results) -> None:
    """Make matplotlib draw through DisplayBackend (pyplot.show() hands it the figures)."""
    sys.meta_path.append(DisplayBackend(results))  # type: ignore[arg-type]
    os.environ["MPLBACKEND"] = f"module://{DISPLAY_BACKEND}"


def run_main(
    request: GuestRequest,
    before_exit: "list[Callable[[], object]]",
    results: Results,
    namespace: "dict[str, object] | None" = None,
) -> "tuple[int, dict[str, str] | None]":
    """Run the code as ``python -c`` would, up to its exit functions: (status, error).

    Tracebacks start at the code's own frame and show its lines. A final bare
    expression's value becomes a text/plain result, as a notebook cell's.
    Then each of ``before_exit`` (what the interpreter's shutdown runs:
    waiting for threads, atexit) is called; one that raises prints its
    traceback and turns a 0 status into 1. Figures still open are rendered.

    ``namespace``: a session's ``__main__`` globals, kept from run to run as a
    notebook's; a session's run is a cell, so the interpreter's exit steps
    (``atexit``) are not run after it, only ``before_exit``.
    """
    code = request.code
    cell = namespace is not None
    if namespace is None:
        namespace = fresh_main(request.argv)
    else:
        sys.argv = ["-c", *request.argv]
    # Register the source so tracebacks show the offending lines.
    linecache.cache["<string>"] = (len(code), None, code.splitlines(keepends=True), "<string>")
    status, error = 0, None
    try:
        body, last = split_final_expression(code)
        exec(body, namespace)
        if last is not None:
            results.add_value(eval(last, namespace))
    except SystemExit as e:
        status = exit_status(e.code)
    except BaseException as e:
        tb = e.__traceback__
        tb = tb.tb_next if tb is not None else None  # start at the code's own frame
        text = "".join(traceback.format_exception(type(e), e, tb))
        sys.stderr.write(text)
        error = {"name": type(e).__name__, "value": str(e)[:MAX_ERROR_BYTES // 4],
                 "traceback": text[-MAX_ERROR_BYTES // 2 :]}
        status = 1
    # Figures before atexit: matplotlib registers one that closes them all.
    exit_steps = [] if cell else [atexit._run_exitfuncs]
    for step in [*before_exit, results.add_figures, *exit_steps]:
        try:
            step()
        except BaseException:
            traceback.print_exc()
            status = status or 1
    flush_std_streams()
    return status, error


def split_final_expression(code: str) -> "tuple[types.CodeType, types.CodeType | None]":
    """The code compiled as a module, and apart its final bare expression if it ends with one.

    Raises SyntaxError as compiling the whole would.
    """
    tree = ast.parse(code, "<string>")
    final = tree.body[-1] if tree.body else None
    if not isinstance(final, ast.Expr):
        return compile(tree, "<string>", "exec", dont_inherit=True), None
    tree.body.pop()
    last = ast.Expression(final.value)
    return (
        compile(tree, "<string>", "exec", dont_inherit=True),
        compile(last, "<string>", "eval", dont_inherit=True),
    )


def outcome_frames(
    base: str, limits: OutcomeLimits, results: Results, error: "dict[str, str] | None",
    files: bool = True, seen: "dict[str, tuple[int, int, int]] | None" = None,
) -> bytes:
    """Everything the run leaves besides its output, as frames (pool/wire.py's Outcome).

    ``files=False`` leaves out/ to the host (the wasm tier, whose host reads the
    guest's scratch directly, where each directory call from inside costs ~1 ms).
    ``seen``: a session's out/ as its last answer reported it (out_dir_frames).
    """
    frames = []
    for mime, data in results.items:
        frames.append(header_frame(DISPLAY, {"type": mime}) + content_frames(data))
    if error is not None:
        frames.append(header_frame(ERROR, error))
    if files:
        frames.extend(out_dir_frames(base, limits, seen))
    return b"".join(frames)


def out_dir_frames(
    base: str, limits: OutcomeLimits, seen: "dict[str, tuple[int, int, int]] | None" = None
) -> "list[bytes]":
    """Every entry under ``out/``, depth first in name order, within ``limits``.

    ``seen`` (a session's): path -> (inode, size, mtime) of what an earlier
    answer reported; an entry unchanged since is left out, and ``seen`` is
    updated, so each run of a session reports what is new or changed.

    Symlinks are reported by kind and never followed; FIFOs, sockets and
    devices likewise, never opened. The wasm tier's daemon runs this on the
    guest's scratch from the host once the guest has ended (no process of it
    is left to change the tree meanwhile). Paths, not directory fds: WASI has
    no ``dir_fd`` calls, and in the other tiers whatever the code swaps in
    meanwhile is still inside its own sandbox.
    """
    frames: list[bytes] = []
    budget = [limits.max_files + 1, limits.max_files_bytes]  # entries (one past: dropped), bytes
    _walk(f"{base}/{OUT_DIR}", OUT_DIR, limits, budget, frames, 0, seen)
    return frames


def _walk(
    directory: str, prefix: str, limits: OutcomeLimits, budget: "list[int]",
    frames: "list[bytes]", depth: int, seen: "dict[str, tuple[int, int, int]] | None",
) -> None:
    try:
        with os.scandir(directory) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
    except OSError:
        return  # removed or replaced by the code: nothing more to report
    for entry in entries:
        if budget[0] <= 0 or depth > MAX_OUT_DEPTH:
            return
        path = f"{prefix}/{entry.name}"
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISDIR(info.st_mode):
            _walk(entry.path, path, limits, budget, frames, depth + 1, seen)
            continue
        if seen is not None:
            state = (info.st_ino, info.st_size, info.st_mtime_ns)
            if seen.get(path) == state:
                continue
            seen[path] = state
        budget[0] -= 1
        kind = _kind(info.st_mode)
        frames.append(header_frame(FILE_OUT, {"path": path, "kind": kind, "size": info.st_size}))
        if kind == "file":
            data = _read_file(entry.path, min(limits.max_file_bytes, budget[1]))
            budget[1] -= len(data)
            frames.append(content_frames(data))


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISREG, "file"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "device"), (stat.S_ISBLK, "device")):
        if test(mode):
            return kind
    return "other"


def _read_file(path: str, limit: int) -> bytes:
    """At most ``limit`` bytes; b"" for what cannot be opened as a regular file."""
    if limit <= 0:
        return b""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return b""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return b""
        parts, left = [], limit
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            parts.append(chunk)
            left -= len(chunk)
        return b"".join(parts)
    except OSError:
        return b""
    finally:
        os.close(fd)


def flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(BaseException):
            stream.flush()  # type: ignore[union-attr]
