"""The wire both sides speak (pool/wire.py) and the guest programs built on it (pool/guest.py).

No daemon: the codec is fed bytes, the runner's command line is parsed as
lists, and the composed runners run as plain subprocesses.
"""

from __future__ import annotations

import ast
import json
import marshal
import os
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from pool import guest, wire
from pool.errors import BackendError
from pool.protocol import FrameDecoder, ProtocolViolation, decode_exit

# --- frames -----------------------------------------------------------------------


def test_frames_survive_any_chunking() -> None:
    stream = wire.READY_FRAME + wire.frame(wire.STDOUT, b"out") + wire.frame(
        wire.STDERR, b"") + wire.frame(wire.EXIT, wire.STATUS.pack(3))
    for size in (1, 2, 5, len(stream)):
        decoder = wire.FrameDecoder()
        frames = []
        for offset in range(0, len(stream), size):
            frames += decoder.feed(stream[offset : offset + size])
        assert frames == [
            (wire.READY, b""), (wire.STDOUT, b"out"), (wire.STDERR, b""),
            (wire.EXIT, struct.pack(">i", 3)),
        ]


@pytest.mark.parametrize(
    "garbage",
    [
        b"Z\x00\x00\x00\x00",  # unknown frame type
        b"O" + struct.pack(">I", wire.MAX_FRAME_BYTES + 1),  # longer than any runner sends
        b"\xff" * 5,
    ],
)
def test_the_decoder_refuses_forged_frames_before_buffering_them(garbage: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.FrameDecoder().feed(garbage)
    with pytest.raises(ProtocolViolation) as raised:  # the daemon's reading of the same
        FrameDecoder().feed(garbage)
    assert raised.value.code == "sandbox_protocol_error"


def test_a_frame_cut_short_waits_for_the_rest() -> None:
    decoder = wire.FrameDecoder()
    assert decoder.feed(wire.frame(wire.STDOUT, b"hello")[:-1]) == []
    assert decoder.feed(b"o") == [(wire.STDOUT, b"hello")]


@pytest.mark.parametrize("status", [0, 1, 137, 255])
def test_exit_statuses_0_to_255_decode(status: int) -> None:
    assert decode_exit(wire.STATUS.pack(status)) == status


@pytest.mark.parametrize("payload", [struct.pack(">i", -1), struct.pack(">i", 256),
                                     struct.pack(">i", 2**31 - 1), b"\x00\x00\x00", b""])
def test_impossible_exit_statuses_are_forgeries(payload: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        decode_exit(payload)


# --- requests -----------------------------------------------------------------------


@pytest.mark.parametrize(("code", "stdin"), [
    ("print(1)", ""), ("x = '\x00'", "a\x00b"), ("s = '\udcff'", "\U0001f600\udc80"),
])
def test_requests_round_trip_nul_bytes_and_lone_surrogates(code: str, stdin: str) -> None:
    decoded = decode_request(wire.GuestRequest(code, stdin).encode())
    assert (decoded.code, decoded.stdin) == (code, stdin)


def decode_request(encoded: bytes) -> wire.GuestRequest:
    """What a guest reads: REQUEST's two lengths, which must account for every byte."""
    header_size, contents_size = wire.REQUEST.unpack(encoded[: wire.REQUEST.size])
    body = encoded[wire.REQUEST.size :]
    assert len(body) == header_size + contents_size
    return wire.GuestRequest.decode(body[:header_size], body[header_size:])


@pytest.mark.parametrize("body", [b"not json", b"[1]", b'{"stdin": ""}', b'{"code": 1}',
                                  b'{"code": "", "stdin": 2}', b"\xff"])
def test_a_malformed_request_is_a_wire_error(body: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.GuestRequest.decode(body, b"")


def test_the_output_capture_stops_each_stream_at_its_cap() -> None:
    capture = wire.OutputCapture(4)
    assert capture.add(wire.STDOUT, b"abc")
    assert not capture.add(wire.STDOUT, b"def")
    assert capture.add(wire.STDERR, b"xy")
    assert (bytes(capture.stdout), capture.stdout_truncated) == (b"abcd", True)
    assert (bytes(capture.stderr), capture.stderr_truncated) == (b"xy", False)


# --- the runner's command line -------------------------------------------------------


def test_runner_arguments_round_trip() -> None:
    arguments = wire.RunnerArguments(
        wire.DIRECT, "shell", (5, 6, 7), {"RLIMIT_AS": (10, 20), "RLIMIT_CORE": (0, 0)}
    )
    argv = arguments.to_argv()
    assert argv == ["direct", "shell", "5", "6", "7", "RLIMIT_AS=10:20", "RLIMIT_CORE=0:0"]
    parsed = wire.RunnerArguments.parse(argv)
    assert (parsed.mode, parsed.language, parsed.fds, parsed.limits) == (
        "direct", "shell", (5, 6, 7), {"RLIMIT_AS": (10, 20), "RLIMIT_CORE": (0, 0)}
    )
    relay = wire.RunnerArguments.parse(["relay", "python"])
    assert (relay.fds, relay.limits) == (None, {})


@pytest.mark.parametrize(("argv", "says"), [
    ([], "usage"),
    (["python"], "usage"),
    (["fork", "python"], "unknown mode"),
    (["relay", "ruby"], "unknown language"),
    (["direct", "python", "3", "4"], "needs 3 fds"),
    (["direct", "python", "3", "4", "x"], "needs 3 fds"),
    (["relay", "python", "RLIMIT_AS=1"], "bad limit"),
    (["relay", "python", "AS=1:2"], "bad limit"),
    (["relay", "python", "RLIMIT_AS=-1:2"], "bad limit"),
])
def test_bad_runner_arguments_say_what_is_wrong(argv: list[str], says: str) -> None:
    with pytest.raises(wire.WireError, match=says):
        wire.RunnerArguments.parse(argv)


# --- the guest programs ----------------------------------------------------------------


@pytest.mark.parametrize("program", [p for p in guest.PROGRAMS if p.endswith(".py")])
def test_a_composed_guest_program_imports_nothing_of_sandpool(program: str) -> None:
    source = guest.compose(program)
    imported = {
        name
        for node in ast.walk(ast.parse(source))
        for name in (
            [node.module or ""] if isinstance(node, ast.ImportFrom)
            else [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        )
    }
    assert not {name for name in imported if name.split(".")[0] in ("pool", "api", "metrics")}
    # Each spliced module once, so every wire constant has one definition.
    assert source.count("\nFRAME = struct.Struct") == 1
    assert source.count("\nclass RunnerArguments") == 1


def test_a_program_importing_more_of_sandpool_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = guest._source
    monkeypatch.setattr(
        guest, "_source",
        lambda name: "from pool.config import Config\n" if name == "bad.py" else real(name),
    )
    with pytest.raises(ValueError, match=r"pool\.config"):
        guest.compose("bad.py")


def run_runner(
    directory: Path, *argv: str, verbose: bool = False
) -> subprocess.CompletedProcess[str]:
    """The installed runner under this interpreter; ``verbose``: with ``-v``, whose
    stderr says where each module's code came from."""
    return subprocess.run(
        [sys.executable, "-I", *(["-v"] if verbose else []), str(directory / guest.RUNNER), *argv],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("argv", [[], ["fork", "python"], ["relay", "python", "RLIMIT_NOPE=1:1"]])
def test_the_runner_refuses_a_bad_command_line_with_one_line(
    tmp_path: Path, argv: list[str]
) -> None:
    directory = guest.install(tmp_path / "guest")
    ran = run_runner(directory, *argv)
    assert ran.returncode == 64
    assert ran.stderr.count("\n") == 1
    assert ran.stderr.startswith("runner: ")
    assert ran.stdout == ""  # never a ready frame


class Relayed:
    """What the relay-mode runner sent for one request: output, outcome, exit status."""

    def __init__(self, frames: list[tuple[bytes, bytes]], limits: wire.OutcomeLimits) -> None:
        self.stdout = b"".join(p for k, p in frames if k == wire.STDOUT)
        self.stderr = b"".join(p for k, p in frames if k == wire.STDERR)
        self.outcome = wire.Outcome(limits)
        for kind, payload in frames:
            if kind in wire.OUTCOME_KINDS:
                self.outcome.add(kind, payload)
        assert frames[-1][0] == wire.EXIT
        self.exit_code = decode_exit(frames[-1][1])


ROOMY = wire.OutcomeLimits(max_files=8, max_file_bytes=1 << 20, max_files_bytes=1 << 21,
                           max_display_bytes=1 << 20)


def relay(
    tmp_path: Path, request: wire.GuestRequest, *arguments: str, language: str = "python"
) -> Relayed:
    """The installed runner, outside any sandbox, in relay mode with ``tmp_path/work`` as cwd."""
    directory = guest.install(tmp_path / "guest")
    work = tmp_path / "work"
    work.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-I", str(directory / guest.RUNNER), "relay", language, *arguments],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=work,
    )
    try:
        assert process.stdin is not None
        assert process.stdout is not None
        decoder = wire.FrameDecoder()
        assert decoder.feed(process.stdout.read(wire.FRAME.size)) == [(wire.READY, b"")]
        process.stdin.write(request.encode())
        process.stdin.flush()
        frames: list[tuple[bytes, bytes]] = []
        while not frames or frames[-1][0] != wire.EXIT:
            data = os.read(process.stdout.fileno(), 65536)
            assert data, "the runner ended without its exit frame"
            frames += decoder.feed(data)
    finally:
        process.kill()
        process.communicate(timeout=30)
    return Relayed(frames, request.limits)


def test_the_installed_runner_speaks_the_wire_from_its_own_file(tmp_path: Path) -> None:
    ran = relay(tmp_path, wire.GuestRequest(
        "import resource, sys; print(resource.getrlimit(resource.RLIMIT_CORE)); "
        "print(sys.stdin.read()); sys.exit(3)", "in", limits=ROOMY), "RLIMIT_CORE=0:0")
    assert ran.stdout == b"(0, 0)\nin\n"
    assert ran.exit_code == 3


def test_files_env_and_argv_reach_the_code_and_out_comes_back(tmp_path: Path) -> None:
    code = """
import os, sys
print(open("data/in.csv").read(), os.environ["GREETING"], sys.argv[1:])
os.makedirs("out/deep", exist_ok=True)
open("out/deep/b.txt", "w").write("bee")
open("out/a.bin", "wb").write(bytes(range(256)))
os.symlink("/etc/passwd", "out/link")
os.mkfifo("out/fifo")
os.chdir("/")  # the scan still finds out/ where the run began
"""
    ran = relay(tmp_path, wire.GuestRequest(
        code, files=[("data/in.csv", b"a,b")], env={"GREETING": "hi"}, argv=["x", "y"],
        limits=ROOMY))
    assert ran.stdout == b"a,b hi ['x', 'y']\n"
    assert ran.exit_code == 0
    assert [(f.path, f.kind, bytes(f.content)) for f in ran.outcome.files] == [
        ("out/a.bin", "file", bytes(range(256))),
        ("out/deep/b.txt", "file", b"bee"),
        ("out/fifo", "fifo", b""),
        ("out/link", "symlink", b""),
    ]


def test_a_final_expression_and_an_uncaught_error_are_results(tmp_path: Path) -> None:
    value = relay(tmp_path / "v", wire.GuestRequest("x = 20\nx * 2 + 2", limits=ROOMY))
    assert [(d.mime, bytes(d.data)) for d in value.outcome.results] == [("text/plain", b"42")]
    assert value.outcome.error is None
    failed = relay(tmp_path / "e", wire.GuestRequest("def f():\n    1 / 0\nf()", limits=ROOMY))
    assert failed.exit_code == 1
    assert failed.outcome.error is not None
    assert failed.outcome.error["name"] == "ZeroDivisionError"
    assert failed.outcome.error["value"] == "division by zero"
    assert 'line 2, in f' in failed.outcome.error["traceback"]
    assert b"ZeroDivisionError: division by zero" in failed.stderr  # stderr as always


def test_os_exit_still_returns_the_files(tmp_path: Path) -> None:
    ran = relay(tmp_path, wire.GuestRequest(
        "import os\nopen('out/x', 'w').write('x')\nos._exit(7)", limits=ROOMY))
    assert ran.exit_code == 7
    assert [f.path for f in ran.outcome.files] == ["out/x"]


def test_a_shell_run_returns_its_files_and_argv(tmp_path: Path) -> None:
    ran = relay(tmp_path, wire.GuestRequest(
        'echo "$1-$2" > out/args; cat in.txt; exit 4', files=[("in.txt", b"file")],
        argv=["a", "b"], limits=ROOMY), language="shell")
    assert (ran.stdout, ran.exit_code) == (b"file", 4)
    assert [(f.path, bytes(f.content)) for f in ran.outcome.files] == [("out/args", b"a-b\n")]


def test_the_guest_keeps_to_the_limits_it_is_sent(tmp_path: Path) -> None:
    limits = wire.OutcomeLimits(max_files=1, max_file_bytes=3, max_files_bytes=3,
                                max_display_bytes=0)
    ran = relay(tmp_path, wire.GuestRequest(
        "open('out/a', 'w').write('12345')\nopen('out/b', 'w').write('x')\n'value'",
        limits=limits))
    assert [(f.path, bytes(f.content), f.truncated) for f in ran.outcome.files] == [
        ("out/a", b"123", False)]  # the guest cut it; the daemon saw nothing to cut
    assert ran.outcome.files_dropped == 1
    assert ran.outcome.results == []


def test_preloaded_modules_are_imported_before_ready(tmp_path: Path) -> None:
    ran = relay(tmp_path, wire.GuestRequest(
        "import sys; print('decimal' in sys.modules)", limits=ROOMY), "preload=decimal")
    assert ran.stdout == b"True\n"


def test_a_preload_that_fails_never_reports_ready(tmp_path: Path) -> None:
    directory = guest.install(tmp_path / "guest")
    ran = run_runner(directory, "relay", "python", "preload=no_such_module_here")
    assert ran.returncode == 64
    assert "preload failed: ModuleNotFoundError" in ran.stderr
    assert ran.stdout == ""


def installed_files(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}


def test_install_writes_read_only_files_once_and_replaces_damaged_ones(tmp_path: Path) -> None:
    base = tmp_path / "guest"
    directory = guest.install(base)
    assert guest.install(base) == directory  # content-addressed: the same directory
    layout = guest.layout()
    assert installed_files(directory) == set(layout)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o555
    for name, content in layout.items():
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o444
        assert stat.S_IMODE((directory / name).parent.stat().st_mode) == 0o555
        if isinstance(content, str):
            assert (directory / name).read_text() == content
    assert (directory / f"{guest.RUNNER_MODULE}.py").read_text() == guest.compose(guest.RUNNER)
    damaged = directory / guest.RUNNER
    directory.chmod(0o755)
    damaged.chmod(0o644)
    damaged.write_text("print('not the runner')")
    assert guest.install(base) == directory
    assert damaged.read_text() == guest.RUNNER_LOADER
    assert [p.name for p in base.iterdir()] == [directory.name]  # nothing staged left
    directory.chmod(0o755)
    (directory / "extra.py").write_text("planted")  # a file no program of ours is
    assert guest.install(base) == directory
    assert installed_files(directory) == set(layout)


def test_install_replaces_bytecode_that_is_not_the_runners(tmp_path: Path) -> None:
    # A pyc with the runner's header (magic, flags, source hash) but other code
    # would run in place of the runner: the hash check is the guest's, and it
    # covers only the source.
    base = tmp_path / "guest"
    directory = guest.install(base)
    bytecode = guest.runner_bytecode_path()
    assert bytecode is not None
    pyc = directory / bytecode
    genuine = pyc.read_bytes()
    forged = genuine[:16] + marshal.dumps(compile("print('not the runner')", "x", "exec"))
    directory.chmod(0o755)
    pyc.parent.chmod(0o755)
    pyc.chmod(0o644)
    pyc.write_bytes(forged)
    assert guest.install(base) == directory
    assert pyc.read_bytes()[:16] == genuine[:16]
    assert marshal.loads(pyc.read_bytes()[16:]) == marshal.loads(genuine[16:])


def test_a_guest_imports_the_runner_from_its_bytecode(tmp_path: Path) -> None:
    directory = guest.install(tmp_path / "guest")
    ran = run_runner(directory, verbose=True)
    assert ran.returncode == 64  # no command line: the runner's own usage error
    module = directory / f"{guest.RUNNER_MODULE}.py"
    bytecode = directory / (guest.runner_bytecode_path() or "")
    assert f"# {bytecode} matches {module}" in ran.stderr.splitlines()
    # A source that is not the one hashed into the pyc is compiled instead.
    directory.chmod(0o755)
    module.chmod(0o644)
    module.write_text(module.read_text() + "\n# changed\n")
    ran = run_runner(directory, verbose=True)
    assert ran.returncode == 64
    assert f"# code object from {module}" in ran.stderr.splitlines()


def test_install_refuses_a_directory_another_user_owns(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the directory to another uid")
    base = tmp_path / "guest"
    base.mkdir()
    os.chown(base, 65534, 65534)
    with pytest.raises(BackendError) as raised:
        guest.install(base)
    assert raised.value.code == "guest_programs_untrusted"


# --- outcome: files out, rich results, the error ------------------------------------


LIMITS = wire.OutcomeLimits(max_files=2, max_file_bytes=10, max_files_bytes=15,
                            max_display_bytes=8)


def outcome_of(stream: bytes, limits: wire.OutcomeLimits = LIMITS) -> wire.Outcome:
    outcome = wire.Outcome(limits)
    for kind, payload in wire.FrameDecoder().feed(stream):
        outcome.add(kind, payload)
    return outcome


def file_out(path: str, content: bytes, kind: str = "file") -> bytes:
    header = wire.header_frame(wire.FILE_OUT, {"path": path, "kind": kind, "size": len(content)})
    return header + wire.content_frames(content)


def test_a_guest_request_round_trips_files_env_argv_and_limits() -> None:
    request = wire.GuestRequest(
        "print(1)", "in\udc80", [("data.csv", b"a,b\n\x00\xff"), ("sub/x", b"")],
        {"K": "v"}, ["-x", "\x00"], LIMITS,
    )
    encoded = request.encode()
    assert b"\x00\xff" in encoded  # the contents travel as they are, not as base64
    decoded = decode_request(encoded)
    assert (decoded.code, decoded.stdin, decoded.files, decoded.env, decoded.argv) == (
        "print(1)", "in\udc80", [("data.csv", b"a,b\n\x00\xff"), ("sub/x", b"")],
        {"K": "v"}, ["-x", "\x00"],
    )
    assert decoded.limits.to_json() == LIMITS.to_json()


@pytest.mark.parametrize(("header", "contents"), [
    (b'{"code": "", "files": [["a"]]}', b""), (b'{"code": "", "files": [["a", "!!"]]}', b""),
    (b'{"code": "", "files": [["a", -1]]}', b""), (b'{"code": "", "files": [["a", true]]}', b"x"),
    (b'{"code": "", "files": [["a", 2]]}', b"x"), (b'{"code": "", "files": [["a", 1]]}', b"xy"),
    (b'{"code": "", "files": [["a", 1.0]]}', b"x"),
    (b'{"code": "", "env": {"a": 1}}', b""), (b'{"code": "", "argv": "x"}', b""),
    (b'{"code": "", "limits": {"max_files": -1}}', b""),
])
def test_a_malformed_guest_request_is_a_wire_error(header: bytes, contents: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.GuestRequest.decode(header, contents)


def test_each_file_takes_its_own_bytes_of_the_contents() -> None:
    decoded = wire.GuestRequest.decode(
        b'{"code": "", "files": [["a", 2], ["b", 0], ["c", 3]]}', b"xyz\x00w")
    assert decoded.files == [("a", b"xy"), ("b", b""), ("c", b"z\x00w")]


def test_files_results_and_the_error_are_kept_within_their_limits() -> None:
    stream = (
        file_out("out/a.txt", b"0123456789ABC")  # over the per-file cap: cut at 10
        + file_out("out/b.txt", b"xyzxyz")  # the total cap leaves 5
        + file_out("out/c.txt", b"dropped")  # past max_files
        + wire.header_frame(wire.DISPLAY, {"type": "image/png"}) + wire.content_frames(b"PNG")
        + wire.header_frame(wire.DISPLAY, {"type": "text/plain"}) + wire.content_frames(b"12345")
        + wire.header_frame(wire.DISPLAY, {"type": "text/plain"}) + wire.content_frames(b"gone")
        + wire.header_frame(wire.ERROR, {"name": "E", "value": "v", "traceback": "tb"})
    )
    outcome = outcome_of(stream)
    assert [(f.path, bytes(f.content), f.truncated) for f in outcome.files] == [
        ("out/a.txt", b"0123456789", True), ("out/b.txt", b"xyzxy", True),
    ]
    assert outcome.files_dropped == 1
    assert [(d.mime, bytes(d.data), d.truncated) for d in outcome.results] == [
        ("image/png", b"PNG", False), ("text/plain", b"12345", False),
    ]
    assert outcome.results_dropped == 1
    assert outcome.error == {"name": "E", "value": "v", "traceback": "tb"}


def test_a_symlink_is_reported_with_no_content() -> None:
    outcome = outcome_of(file_out("out/link", b"", kind="symlink"))
    assert [(f.path, f.kind, bytes(f.content)) for f in outcome.files] == [
        ("out/link", "symlink", b"")]
    with pytest.raises(wire.WireError):
        outcome_of(file_out("out/link", b"/etc/passwd", kind="symlink"))


@pytest.mark.parametrize("header", [
    {"path": "../etc/passwd", "kind": "file", "size": 1},
    {"path": "/out/a", "kind": "file", "size": 1},
    {"path": "out/../../x", "kind": "file", "size": 1},
    {"path": "out/a\x00b", "kind": "file", "size": 1},
    {"path": "out", "kind": "file", "size": 1},
    {"path": "out/a", "kind": "hardlink", "size": 1},
    {"path": "out/a", "kind": "file", "size": -1},
    {"path": "out/a", "kind": "file", "size": True},
])
def test_a_forged_file_header_is_a_wire_error(header: dict[str, object]) -> None:
    with pytest.raises(wire.WireError):
        outcome_of(wire.header_frame(wire.FILE_OUT, header))


def test_outcome_frames_never_exceed_a_chunk() -> None:
    frames = wire.FrameDecoder().feed(wire.content_frames(b"x" * (3 * wire.CHUNK + 1)))
    assert [len(payload) for _, payload in frames] == [wire.CHUNK] * 3 + [1]


# --- the JavaScript child -----------------------------------------------------------


def test_the_composed_javascript_carries_the_wires_values() -> None:
    source = guest.compose(guest.NODE_RUNNER)
    assert guest.WIRE_MARKER not in source
    start = source.index("const WIRE = Object.freeze(") + len("const WIRE = Object.freeze(")
    constants = json.loads(source[start : source.index(");\n", start)])
    assert constants == guest.wire_constants()
    assert (constants["EXIT"], constants["FILE_OUT"], constants["CONTENT"], constants["ERROR"]) == (
        "X", "F", "C", "T")
    assert (constants["FRAME_BYTES"], constants["CHUNK"], constants["OUT_DIR"]) == (
        wire.FRAME.size, wire.CHUNK, wire.OUT_DIR)
    assert constants["LIMITS"] == sorted(wire.OutcomeLimits.__slots__)
    # The program's own source names none of those values: they come from the header.
    raw = guest._source(guest.NODE_RUNNER)
    for value in (wire.CHUNK, wire.MAX_ERROR_BYTES, wire.MAX_FRAME_BYTES):
        assert str(value) not in raw


def test_a_wire_struct_the_javascript_does_not_encode_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(wire, "STATUS", struct.Struct(">q"))
    with pytest.raises(ValueError, match=r"wire\.STATUS"):
        guest.compose(guest.NODE_RUNNER)


needs_node = pytest.mark.skipif(shutil.which("node") is None, reason="no node on this host")


@needs_node
def test_the_javascript_child_speaks_the_wire(tmp_path: Path) -> None:
    code = """
const fs = require('fs');
console.log(fs.readFileSync(0, 'utf8'), fs.readFileSync('data/in.csv', 'utf8'),
            process.env.GREETING, process.argv.slice(2));
fs.mkdirSync('out/deep');
fs.writeFileSync('out/deep/b.txt', 'bee');
fs.symlinkSync('/etc/passwd', 'out/link');
process.chdir('/');  // out/ is still found where the run began
process.exitCode = 3;
"""
    ran = relay(tmp_path, wire.GuestRequest(
        code, "in", files=[("data/in.csv", b"a,b")], env={"GREETING": "hi"}, argv=["x"],
        limits=ROOMY), language="javascript")
    assert ran.stdout == b"in a,b hi [ 'x' ]\n"
    assert ran.exit_code == 3
    assert [(f.path, f.kind, bytes(f.content)) for f in ran.outcome.files] == [
        ("out/deep/b.txt", "file", b"bee"), ("out/link", "symlink", b"")]


@needs_node
def test_an_uncaught_javascript_error_is_the_outcomes_error(tmp_path: Path) -> None:
    ran = relay(tmp_path, wire.GuestRequest(
        "function f() {\n  throw new TypeError('bad');\n}\nf();", limits=ROOMY),
        language="javascript")
    assert ran.exit_code == 1
    assert ran.outcome.error is not None
    assert (ran.outcome.error["name"], ran.outcome.error["value"]) == ("TypeError", "bad")
    assert "main.js:2:" in ran.outcome.error["traceback"]
    assert ran.stderr.decode() == ran.outcome.error["traceback"] + "\n"


@needs_node
def test_the_javascript_child_keeps_to_the_limits_it_is_sent(tmp_path: Path) -> None:
    limits = wire.OutcomeLimits(max_files=1, max_file_bytes=3, max_files_bytes=3,
                                max_display_bytes=0)
    ran = relay(tmp_path, wire.GuestRequest(
        "const fs = require('fs');\n"
        "fs.writeFileSync('out/a', '12345');\nfs.writeFileSync('out/b', 'x');", limits=limits),
        language="javascript")
    assert [(f.path, bytes(f.content), f.truncated) for f in ran.outcome.files] == [
        ("out/a", b"123", False)]
    assert ran.outcome.files_dropped == 1


def test_a_runner_whose_node_cannot_start_never_reports_ready(tmp_path: Path) -> None:
    directory = guest.install(tmp_path / "guest")
    ran = subprocess.run(
        [sys.executable, "-I", str(directory / guest.RUNNER), "relay", "javascript"],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
        env={"PATH": str(tmp_path)},  # no node on it
    )
    assert ran.returncode == 69
    assert ran.stdout == ""
    assert "runner: cannot run node" in ran.stderr
    assert "before it was ready" in ran.stderr
