"""The one seccomp allowlist, its two renderings, and scratch space that cannot run programs.

Fast tests check the policy as data and its BPF program against the real kernel
(a child Python loads the filter, then runs the probe). End-to-end tests run the
same probe in the Docker and the process pool of the shared daemon and require
the same answer, call by call, from both: the tiers agree.

Every answer is asserted by its errno, so a missing filter fails: without one,
``io_uring_setup(1, NULL)`` says EFAULT, ``unshare(0)`` succeeds, and an AF_ALG
socket opens.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from api.client import Client
from pool.backends.process.scratch import SCRATCH_ROOT, sweep_stale_scratch
from pool.seccomp import (
    ALLOWED_SYSCALLS,
    NAMESPACE_MASK,
    POLICY,
    build_filter,
    docker_profile,
    known_syscalls,
    render_docker_profile,
)

REPOSITORY = Path(__file__).resolve().parents[2]

# Calls a sandbox never needs, with arguments that do nothing even where the
# call is allowed (NULL pointers, bad fds, a no-op unshare), so the probe is
# harmless wherever it runs. Each must answer ENOSYS: it is not on the list.
UNLISTED_CALLS: dict[str, list[int]] = {
    "io_uring_setup": [1, 0],
    "io_uring_enter": [-1, 0, 0, 0, 0, 0],
    "io_uring_register": [-1, 0, 0, 0],
    "memfd_secret": [0],
    "modify_ldt": [0, 0, 0],  # read the LDT: 0 where allowed
    "userfaultfd": [0o2000000],  # O_CLOEXEC
    "bpf": [1000, 0, 0],
    "perf_event_open": [0, 0, -1, -1, 0],
    "keyctl": [0, -3, 0],  # KEYCTL_GET_KEYRING_ID of the session keyring
    "add_key": [0, 0, 0, 0, 0],
    "request_key": [0, 0, 0, 0],
    "ptrace": [7, 0, 0, 0],  # PTRACE_CONT of pid 0: ESRCH where allowed
    "process_vm_readv": [1, 0, 0, 0, 0, 0],
    "process_vm_writev": [1, 0, 0, 0, 0, 0],
    "mount": [0, 0, 0, 0, 0],
    "umount2": [0, 0],
    "pivot_root": [0, 0],
    "chroot": [0],
    "fsopen": [0, 0],
    "open_tree": [-1, 0, 0],
    "move_mount": [-1, 0, -1, 0, 0],
    "unshare": [0],  # a no-op the kernel allows anyone
    "setns": [-1, 0],
    "clone3": [0, 0],  # ENOSYS is what makes glibc fall back to clone()
    "init_module": [0, 0, 0],
    "finit_module": [-1, 0, 0],
    "delete_module": [0, 0],
    "name_to_handle_at": [-1, 0, 0, 0, 0],
    "open_by_handle_at": [-1, 0, 0],
    "fanotify_init": [0, 0],
    "syslog": [10, 0, 0],  # SYSLOG_ACTION_SIZE_BUFFER
    "sethostname": [0, -1],
    "reboot": [0, 0, 0, 0],  # no magic numbers: EINVAL where allowed
    "swapon": [0, 0],
}

# Syscalls newer than the host's libseccomp, by their distance from its last:
# runc answers ENOSYS for them itself, the BPF program by number.
NEWER: dict[str, int] = {"libseccomp's last + 1": 1, "libseccomp's last + 5": 5}

AF_UNIX, AF_INET, AF_INET6, AF_NETLINK = 1, 2, 10, 16
SOCK_STREAM, SOCK_DGRAM, SOCK_RAW, SOCK_SEQPACKET = 1, 2, 3, 5
# Socket families as (family, type, protocol): the refused ones, then what code needs.
SOCKETS: dict[str, tuple[int, int, int]] = {
    "AF_VSOCK": (40, SOCK_STREAM, 0),
    "AF_PACKET": (17, SOCK_DGRAM, 0),
    "AF_KEY": (15, SOCK_RAW, 2),
    "AF_ALG": (38, SOCK_SEQPACKET, 0),
    "AF_BLUETOOTH": (31, SOCK_STREAM, 0),
    "AF_RDS": (21, SOCK_SEQPACKET, 0),
    "AF_NETLINK/NETLINK_AUDIT": (AF_NETLINK, SOCK_RAW, 9),
    "AF_UNIX": (AF_UNIX, SOCK_STREAM, 0),
    "AF_INET": (AF_INET, SOCK_STREAM, 0),
    "AF_INET6": (AF_INET6, SOCK_DGRAM, 0),
    "AF_NETLINK/NETLINK_ROUTE": (AF_NETLINK, SOCK_RAW, 0),
}

CLONE_NEWUSER, CLONE_NEWNET, SIGCHLD = 0x10000000, 0x40000000, 17
ADDR_NO_RANDOMIZE = 0x0040000

EXPECTED: dict[str, str] = {
    **dict.fromkeys(UNLISTED_CALLS, "ENOSYS"),
    **dict.fromkeys(NEWER, "ENOSYS"),
    **{f"socket {name}": "EAFNOSUPPORT" for name in list(SOCKETS)[:6]},
    "socket AF_NETLINK/NETLINK_AUDIT": "EPROTONOSUPPORT",
    **{f"socket {name}": "ok" for name in list(SOCKETS)[7:]},
    "clone CLONE_NEWUSER": "EPERM",
    "clone CLONE_NEWNET": "EPERM",
    "clone fork": "ok",
    "personality ADDR_NO_RANDOMIZE": "EPERM",
    "personality query": "ok",
}

# Run in the sandbox (or in a child that loaded the filter). Prints one JSON
# line: call -> "ok" or the errno's name. Syscall numbers come from the host's
# libseccomp, so the probe needs no table of its own.
PROBE = """
import ctypes, errno, json, os
NUMBERS, CALLS, SOCKETS = json.loads(%r)
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def call(name, *args):
    ctypes.set_errno(0)
    rc = libc.syscall(ctypes.c_long(NUMBERS[name]), *(ctypes.c_long(a) for a in args))
    if rc == 0 and name == "clone":  # the child of a clone the filter let through
        os._exit(0)
    if rc > 0 and name == "clone":
        os.waitpid(rc, 0)
    return "ok" if rc >= 0 else errno.errorcode[ctypes.get_errno()]
out = {}
for name, args in CALLS.items():
    if name in NUMBERS:  # modify_ldt exists on x86 only
        out[name] = call(name, *args)
for name, args in SOCKETS.items():
    out["socket " + name] = call("socket", *args)
out["clone CLONE_NEWUSER"] = call("clone", %d, 0, 0, 0, 0)
out["clone CLONE_NEWNET"] = call("clone", %d, 0, 0, 0, 0)
out["clone fork"] = call("clone", %d, 0, 0, 0, 0)
out["personality ADDR_NO_RANDOMIZE"] = call("personality", %d)
call("personality", 0)  # undo it where the filter let it through
out["personality query"] = call("personality", 0xFFFFFFFF)
print(json.dumps(out))
"""


def probe_code() -> str:
    known = known_syscalls()
    names = [*UNLISTED_CALLS, "socket", "clone", "personality"]
    numbers = {name: known[name] for name in names if name in known}
    numbers.update({name: max(known.values()) + after for name, after in NEWER.items()})
    calls = {**UNLISTED_CALLS, **{name: [0] * 6 for name in NEWER}}
    payload = json.dumps([numbers, calls, SOCKETS])
    return PROBE % (
        payload,
        CLONE_NEWUSER | SIGCHLD,
        CLONE_NEWNET | SIGCHLD,
        SIGCHLD,
        ADDR_NO_RANDOMIZE,
    )


def expected_here() -> dict[str, str]:
    return {k: v for k, v in EXPECTED.items() if k not in UNLISTED_CALLS or k in known_syscalls()}


# Loads the filter in this process the way bwrap does (no_new_privs, then
# PR_SET_SECCOMP with the program), then runs the probe.
LOAD_FILTER = """
import ctypes, sys
program = open(sys.argv[1], "rb").read()
class Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.byref(Program(len(program) // 8, program)), 0, 0) == 0
"""


def run_probe_under(program: bytes | None, tmp_path: Path, extra: str = "") -> dict[str, str]:
    """The probe in a child Python: under ``program`` (BPF), or unfiltered with None."""
    path = tmp_path / "filter.bpf"
    path.write_bytes(program or b"")
    code = (LOAD_FILTER if program is not None else "") + extra + probe_code()
    done = subprocess.run(
        [sys.executable, "-I", "-c", code, str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, str] = json.loads(done.stdout.splitlines()[-1])
    return result


# --- the policy as data -------------------------------------------------------


def test_what_the_policy_leaves_out_is_on_no_allow_rule() -> None:
    allowed = {name for rule in POLICY.rules if rule.errno is None for name in rule.names}
    never = {
        *UNLISTED_CALLS, "kexec_load", "kexec_file_load", "acct", "swapoff", "quotactl",
        "lookup_dcookie", "kcmp", "pidfd_getfd", "process_madvise", "landlock_create_ruleset",
        "mount_setattr", "fsmount", "fsconfig", "fspick", "setdomainname", "iopl", "ioperm",
    }  # fmt: skip
    assert allowed & never == set()
    assert len(set(ALLOWED_SYSCALLS)) == len(ALLOWED_SYSCALLS), "a name listed twice"


def test_every_rule_compares_each_argument_once() -> None:
    # runc ORs the conditions of one profile entry that name the same argument;
    # the BPF program ANDs them. Distinct arguments keep the two renderings equal.
    for rule in POLICY.rules:
        indexes = [c.index for c in rule.conditions]
        assert len(indexes) == len(set(indexes)), rule


def test_the_docker_profile_is_the_same_policy() -> None:
    known = ["io_uring_setup", "memfd_secret", "modify_ldt", "read", "clone", "socket", "clone3"]
    profile = json.loads(render_docker_profile(known, "x86_64"))
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    # Native only; the list is also what makes runc add its ENOSYS stub.
    assert profile["architectures"] == ["SCMP_ARCH_X86_64"]
    assert profile["defaultErrnoRet"] == errno.EPERM
    unlisted = profile["syscalls"][-1]
    assert unlisted == {
        "names": ["clone3", "io_uring_setup", "memfd_secret", "modify_ldt"],
        "action": "SCMP_ACT_ERRNO",
        "errnoRet": errno.ENOSYS,
    }
    allowed = [e for e in profile["syscalls"] if e["action"] == "SCMP_ACT_ALLOW"]
    assert not {"io_uring_setup", "memfd_secret", "modify_ldt"} & {
        n for e in allowed for n in e["names"]
    }
    clone = next(e for e in allowed if e["names"] == ["clone"])
    assert clone["args"] == [
        {"index": 0, "value": NAMESPACE_MASK, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}
    ]
    families = sorted(e["args"][0]["value"] for e in allowed if e["names"] == ["socket"])
    assert families == [AF_UNIX, AF_INET, AF_INET6, AF_NETLINK]
    assert len(profile["syscalls"]) == len(POLICY.rules) + 1


def test_the_host_profile_answers_enosys_for_what_docker_allows_here() -> None:
    # The engine's default profile allows these; sandpool's must not.
    unlisted = json.loads(docker_profile())["syscalls"][-1]["names"]
    for name in ("io_uring_setup", "memfd_secret", "userfaultfd", "ptrace", "clone3"):
        assert name in unlisted, name
    if platform.machine() == "x86_64":
        assert "modify_ldt" in unlisted


# --- the BPF program against the kernel ---------------------------------------


def test_the_compiled_filter_gives_each_denial_its_errno(tmp_path: Path) -> None:
    assert run_probe_under(build_filter(), tmp_path) == expected_here()


def test_the_probe_tells_a_missing_filter_apart(tmp_path: Path) -> None:
    # Proves the probe can fail: without the filter most answers change. Socket
    # families are not in the list: which exist unfiltered depends on the kernel.
    unfiltered = run_probe_under(None, tmp_path)
    differ = {k for k, v in expected_here().items() if unfiltered[k] != v}
    for call in (
        "io_uring_setup",
        "unshare",
        "clone3",
        "personality ADDR_NO_RANDOMIZE",
    ):
        assert call in differ, (call, unfiltered[call])


def test_python_and_a_shell_work_under_the_filter(tmp_path: Path) -> None:
    path = tmp_path / "filter.bpf"
    path.write_bytes(build_filter())
    done = subprocess.run(
        [sys.executable, "-I", "-c", LOAD_FILTER + textwrap.dedent(NEEDS), str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == NEEDS_OUTPUT


NEEDS = """
import json, sqlite3, ctypes, subprocess, threading, socket, tempfile, os
t = threading.Thread(target=print, args=("thread ok",)); t.start(); t.join()
print(subprocess.run(["sh", "-c", "echo shell ok"], capture_output=True, text=True).stdout, end="")
print(sqlite3.connect(":memory:").execute("select 'sqlite ok'").fetchone()[0])
print(json.loads('"json ok"'))
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); s.listen()
    print("tcp listen ok")
# AI_ADDRCONFIG has glibc ask rtnetlink which address families are configured.
print(len(socket.getaddrinfo("127.0.0.1", 80, flags=socket.AI_ADDRCONFIG)) > 0)
with tempfile.TemporaryDirectory() as d:
    print("tempdir ok")
print(len(os.urandom(8)))
"""
NEEDS_OUTPUT = [
    "thread ok",
    "shell ok",
    "sqlite ok",
    "json ok",
    "tcp listen ok",
    "True",
    "tempdir ok",
    "8",
]


# --- the tiers agree ----------------------------------------------------------

# The shared daemon's Docker, process and fork pools.
TIERS = ["python", "python-process", "python-fork"]


@pytest.fixture(scope="module")
def probed(daemon: Any) -> dict[str, dict[str, str]]:
    """The probe's answers per tier, from the shared daemon."""
    answers: dict[str, dict[str, str]] = {}
    with daemon.client() as client:
        for pool in TIERS:
            result = client.run(probe_code(), pool=pool, timeout_s=15)
            assert result["exit_code"] == 0, result
            answers[pool] = json.loads(str(result["stdout"]).splitlines()[-1])
    return answers


@pytest.mark.docker
@pytest.mark.parametrize("pool", TIERS)
def test_each_tier_gives_each_denial_its_errno(
    probed: dict[str, dict[str, str]], pool: str
) -> None:
    assert probed[pool] == expected_here()


@pytest.mark.docker
def test_the_docker_process_and_fork_tiers_agree(probed: dict[str, dict[str, str]]) -> None:
    assert probed["python"] == probed["python-process"] == probed["python-fork"]


@pytest.mark.docker
@pytest.mark.parametrize("pool", TIERS)
def test_what_python_needs_still_works(client: Client, pool: str) -> None:
    result = client.run(textwrap.dedent(NEEDS), pool=pool, timeout_s=15)
    assert result["exit_code"] == 0, result
    assert str(result["stdout"]).splitlines() == NEEDS_OUTPUT


@pytest.mark.docker
def test_the_shell_pool_still_works(client: Client) -> None:
    result = client.run("echo shell ok; grep Seccomp: /proc/self/status", pool="shell")
    assert result["exit_code"] == 0, result
    assert str(result["stdout"]).split() == ["shell", "ok", "Seccomp:", "2"]


# --- scratch space that cannot run programs -----------------------------------

SCRATCH_PROBE = """
import errno, glob, json, os, shutil, subprocess
out = {}
loader = (glob.glob("/lib64/ld-linux-*.so.*") + glob.glob("/lib/ld-linux-*.so.*"))[0]
for directory in ("/tmp", os.getcwd(), "/dev/shm"):
    binary = os.path.join(directory, "true-copy")
    shutil.copy("/bin/true", binary)
    script = os.path.join(directory, "script.sh")
    with open(script, "w") as f:
        f.write("#!/bin/sh\\necho ran\\n")
    for path in (binary, script):
        os.chmod(path, 0o755)
        try:
            subprocess.run([path], check=False)
            out[path] = "ran"
        except OSError as e:
            out[path] = errno.errorcode[e.errno]
    # The dynamic loader maps the program itself: a noexec mount refuses PROT_EXEC.
    loaded = subprocess.run([loader, binary], capture_output=True, text=True, check=False)
    out[binary + " via the loader"] = loaded.returncode
    fs = os.statvfs(directory)
    out[directory + " MiB"] = fs.f_blocks * fs.f_frsize // 2**20
    flags = {"noexec": os.ST_NOEXEC, "nosuid": os.ST_NOSUID, "nodev": os.ST_NODEV}
    out[directory + " flags"] = sorted(name for name, bit in flags.items() if fs.f_flag & bit)
print(json.dumps(out))
"""


@pytest.mark.docker
@pytest.mark.parametrize("pool", TIERS)
def test_scratch_directories_cannot_run_programs(client: Client, pool: str) -> None:
    result = client.run(SCRATCH_PROBE, pool=pool, timeout_s=15)
    assert result["exit_code"] == 0, result
    outcome = json.loads(str(result["stdout"]).splitlines()[-1])
    expected: dict[str, Any] = {}
    for directory in ("/tmp", "/sandbox", "/dev/shm"):
        expected[f"{directory}/true-copy"] = "EACCES"
        expected[f"{directory}/script.sh"] = "EACCES"
        expected[f"{directory}/true-copy via the loader"] = 127  # "failed to map segment"
        expected[f"{directory} MiB"] = 16  # tmpfs_mb, /dev/shm included
        expected[f"{directory} flags"] = ["nodev", "noexec", "nosuid"]
    assert outcome == expected


def scratch_mounts_of(pid: int) -> list[str]:
    """Mount points on the host below the scratch directories of the daemon ``pid``."""
    prefix = f"{SCRATCH_ROOT}/sandpool-{pid}-"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p.startswith(prefix) and p.count("/") > prefix.count("/")]


@pytest.mark.docker
def test_ready_sandboxes_leave_no_scratch_mount_on_the_host(daemon: Any) -> None:
    if os.geteuid() != 0:
        pytest.skip("only a root daemon makes its own scratch mounts")
    with daemon.client() as client:
        result = client.run("open('/tmp/marker', 'w').write('x')", pool="python-process")
    assert result["exit_code"] == 0, result
    # A refill may be starting: its mounts are the host's until its runner is ready.
    deadline = time.monotonic() + 20
    while (left := scratch_mounts_of(daemon.process.pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == []


def test_a_dead_daemons_scratch_mounts_are_swept(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = tmp_path / f"sandpool-{gone.pid}-0123456789ab-python-process"
    alive = tmp_path / f"sandpool-{os.getpid()}-0123456789ab-python-process"
    for pool_dir in (stale, alive):
        (pool_dir / "sandbox" / "tmp").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", stale / "sandbox" / "tmp"],
                   check=True, timeout=10)  # fmt: skip
    (stale / "sandbox" / "tmp" / "guest-data").write_text("left behind")
    try:
        sweep_stale_scratch(tmp_path)
    finally:
        subprocess.run(["umount", "-l", stale / "sandbox" / "tmp"], capture_output=True, timeout=10)
    assert not stale.exists()
    assert (alive / "sandbox" / "tmp").is_dir()  # a live daemon's directory stays
