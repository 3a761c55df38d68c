"""A non-root daemon's namespaces for a process sandbox (pool/backends/process/userns.py).

Run as uid 65534, as such a daemon is: the namespaces are made with a quota
and the pool's scratch, bwrap runs a probe in them the way the backend does
(``nsenter`` into them, ``--unshare-user --disable-userns``, ``--cap-drop ALL``,
the staged scratch bound in, no seccomp filter, so only the namespaces and
mounts stand in the way), and the probe reports what it could do; then a whole
process backend as uid 65534, in a cgroup delegated to it, gives its sandbox
its share of the uid's quotas and noexec scratch. The daemon behind the same
path is the adversarial suite against the daemon's image
(tests/test_daemon_image.py).
"""

from __future__ import annotations

import contextlib
import errno
import grp
import json
import os
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pool.backends.process.cgroups import CGROUP_ROOT, unified_host
from pool.backends.process.userns import NamespaceMaker, unshare_command
from pool.errors import BackendError
from tests.support import RUN_WRITTEN_PROGRAMS, SCRATCH_DIRECTORIES

REPOSITORY = Path(__file__).resolve().parent.parent
NOBODY = 65534
# CAP_DAC_READ_SEARCH only to reach this checkout's interpreter and code (under /root
# here); the scripts drop it (ambient) before they start anything, and the
# sandbox runs the host's /usr/bin/python3.
AS_NOBODY = (
    "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
    "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search",
)
# prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL): bwrap refuses to start with a capability.
DROP_AMBIENT = "import ctypes; ctypes.CDLL(None).prctl(47, 4, 0, 0, 0)\n"
QUOTAS = {"max_inotify_instances": 3, "max_inotify_watches": 64}
PTYS = 5
# Inside the sandbox: what the code can do about its namespaces and scratch.
INSIDE = "import errno, shutil, subprocess\n" + RUN_WRITTEN_PROGRAMS + """
import ctypes, json, os, resource
libc = ctypes.CDLL(None, use_errno=True)
held = 0
while libc.inotify_init1(0) >= 0:
    held += 1
inotify_errno = ctypes.get_errno()
nested = libc.unshare(0x10000000)  # CLONE_NEWUSER
nested_errno = ctypes.get_errno()
try:
    with open("/proc/sys/user/max_inotify_instances", "w") as f:
        f.write("1000")
    raised = 0
except OSError as e:
    raised = e.errno
caps = {key: value.strip() for key, _, value in
        (line.partition(":") for line in open("/proc/self/status")) if key.startswith("Cap")}
ptys = []
try:
    while True:
        ptys.append(os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY))
except OSError as e:
    pty_errno = e.errno
options = {fields[4]: fields[5].split(",") for fields in
           (line.split() for line in open("/proc/self/mountinfo"))}
rlimits = [resource.getrlimit(getattr(resource, name))[0]
           for name in ("RLIMIT_MSGQUEUE", "RLIMIT_SIGPENDING", "RLIMIT_MEMLOCK")]
print(json.dumps({"uid": os.getuid(), "held": held, "inotify_errno": inotify_errno,
                  "rlimits": rlimits, "ptys": len(ptys), "pty_errno": pty_errno,
                  "nested": nested, "nested_errno": nested_errno, "raise_errno": raised,
                  "caps": caps, "ran": ran,
                  "options": {d: options.get(d, []) for d in ran}}))
"""

# As uid 65534: stage a pool's scratch, make the namespaces, run bwrap in them
# as the backend does, and check that nothing of the making is left.
OUTSIDE = """
import asyncio, json, os, shutil, subprocess
from pool.backends.process.scratch import StagedScratch
from pool.backends.process.userns import NamespaceMaker, nsenter_command

async def main():
    staged = StagedScratch(f"sandpool-{os.getpid()}-test-userns")
    staged.start(1 << 20, PTYS)
    try:
        maker = await NamespaceMaker.make(shutil.which("unshare"), staged.fstab, QUOTAS)
        bwrap = await asyncio.create_subprocess_exec(
            *nsenter_command(shutil.which("nsenter"), maker.pid),
            "bwrap", "--unshare-all", "--unshare-user", "--disable-userns",
            "--uid", "65534", "--gid", "65534", "--cap-drop", "ALL", "--die-with-parent",
            "--as-pid-1",  # as the backend runs it: the probe is the namespace's PID 1
            *[arg for top in ("usr", "bin", "lib", "lib64", "etc") if os.path.exists(f"/{top}")
              for arg in ("--ro-bind", f"/{top}", f"/{top}")],
            "--proc", "/proc", "--dev", "/dev", *staged.bwrap_args(),
            "--", "/usr/bin/python3", "-I", "-c", INSIDE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await bwrap.communicate()
        await maker.release()
        host_mounts = open("/proc/self/mountinfo").read().count(str(staged.directory))
        staged_files = sorted(str(p.relative_to(staged.directory))
                              for p in staged.directory.rglob("*"))
    finally:
        staged.close()
    children = open(f"/proc/self/task/{os.getpid()}/children").read().split()
    print(json.dumps({"inside": out.decode(), "stderr": err.decode()[-2000:],
                      "host_mounts": host_mounts, "staged": staged_files,
                      "staging_left": staged.directory.exists(), "children": children}))

asyncio.run(main())
"""


def as_nobody(code: str, prefix: tuple[str, ...] = (), groups: str = "--clear-groups",
              env: dict[str, str] | None = None) -> dict[str, object]:
    command = [*prefix, *AS_NOBODY, sys.executable, "-c", code]
    done = subprocess.run(
        [groups if arg == "--clear-groups" else arg for arg in command],
        capture_output=True, text=True, timeout=120, cwd="/",
        env={"PATH": os.environ["PATH"], "HOME": "/tmp", "PYTHONPATH": str(REPOSITORY),
             **(env or {})},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout.splitlines()[-1]))


@pytest.fixture
def nobody() -> None:
    if os.geteuid() != 0:
        pytest.skip("runs as uid 65534, which needs root to set up")
    for tool in ("setpriv", "unshare", "nsenter", "bwrap"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")


def children() -> set[str]:
    """This process's children (its main thread's, which spawned them): earlier
    tests of the session may have left some of theirs, so compare before and after."""
    return set(Path(f"/proc/self/task/{os.getpid()}/children").read_text().split())


def assert_noexec_scratch(ran: dict[str, object], options: dict[str, list[str]]) -> None:
    """A program copied to each scratch directory did not run (EACCES), and each
    is a mount of the sandbox's with noexec, nosuid and nodev."""
    assert ran == dict.fromkeys(SCRATCH_DIRECTORIES, "EACCES"), ran
    for directory in SCRATCH_DIRECTORIES:
        assert {"noexec", "nosuid", "nodev"} <= set(options[directory]), options


def test_a_sandbox_in_the_made_namespaces_has_its_quota_and_can_change_nothing(
    nobody: None,
) -> None:
    code = (DROP_AMBIENT + f"QUOTAS = {QUOTAS!r}\nPTYS = {PTYS}\nINSIDE = {INSIDE!r}\n"
            + textwrap.dedent(OUTSIDE))
    seen = as_nobody(code)
    assert seen["stderr"] == "", seen
    inside = json.loads(str(seen["inside"]))
    assert inside["uid"] == NOBODY
    # The namespace's quota holds the sandbox, with a spent quota's error.
    assert inside["held"] == QUOTAS["max_inotify_instances"], inside
    assert inside["inotify_errno"] == errno.EMFILE, inside
    # bwrap --disable-userns still works inside, and holds: no user namespace.
    assert inside["nested"] == -1, inside
    assert inside["nested_errno"] == errno.ENOSPC, inside
    # Neither can the code raise its quota: no capability, and /proc/sys read-only.
    assert inside["raise_errno"] in (errno.EROFS, errno.EACCES, errno.EPERM), inside
    # Not one capability left in any set, the bounding set included.
    assert set(inside["caps"].values()) == {"0000000000000000"}, inside
    assert len(inside["caps"]) == 5, inside
    assert_noexec_scratch(inside["ran"], inside["options"])
    # Its own devpts instance, with the pool's share of the host's PTYs as max.
    assert (inside["ptys"], inside["pty_errno"]) == (PTYS, errno.ENOSPC), inside
    # The mounts were never the host's; the staging held only its empty
    # directories and fstab, and is gone; the maker is reaped.
    assert seen["host_mounts"] == 0, seen
    assert seen["staged"] == ["fstab", "pts", "shm", "tmp", "work"], seen
    assert seen["staging_left"] is False, seen
    assert seen["children"] == [], seen


async def test_a_maker_that_fails_is_a_backend_error_with_its_own_words(
    tmp_path: Path,
) -> None:
    failing = tmp_path / "unshare"
    failing.write_text("#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\n"
                       "exit 1\n")
    failing.chmod(0o755)
    before, running = sorted(os.listdir("/proc/self/fd")), children()
    with pytest.raises(BackendError) as refused:
        await NamespaceMaker.make(str(failing), tmp_path / "fstab", QUOTAS)
    assert refused.value.code == "userns_failed"
    assert str(refused.value.message) == (
        "cannot make the sandbox's namespaces: "
        "unshare: unshare failed: Operation not permitted"
    )
    assert sorted(os.listdir("/proc/self/fd")) == before
    assert children() <= running


async def test_a_maker_that_hangs_is_killed_and_reaped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pool.backends.process import userns

    monkeypatch.setattr(userns, "MAKE_TIMEOUT_S", 0.5)
    hanging = tmp_path / "unshare"
    hanging.write_text("#!/bin/sh\nexec sleep 60\n")
    hanging.chmod(0o755)
    running = children()
    with pytest.raises(BackendError, match=r"no answer in 0\.5 s"):
        await NamespaceMaker.make(str(hanging), tmp_path / "fstab", QUOTAS)
    assert children() <= running


def test_every_quota_is_needed() -> None:
    with pytest.raises(KeyError):
        unshare_command("unshare", Path("/fstab"), {"max_inotify_instances": 3})


# As uid 65534 in cgroups delegated to it: one process backend of max_size 1 in
# a daemon whose process pools hold 3 sandboxes at most (so 4 holders, the
# daemon included), one sandbox, what its code finds (INSIDE).
BACKEND = """
import asyncio, json
from pool.backends.base import RunRequest
from pool.backends.process import ProcessBackend
from pool.config import PoolConfig
from pool.quotas import Holders

async def main():
    backend = ProcessBackend(PoolConfig(name="nobody", backend="process", max_size=1),
                             "nobody", holders=Holders(own_uid=3, ptys=8))
    await backend.start()
    try:
        sandbox = await backend.start_sandbox()
        try:
            result = await backend.run(sandbox, RunRequest(code=CODE, stdin="", timeout_s=20))
        finally:
            await backend.destroy_sandbox(sandbox)
    finally:
        await backend.close()
    print(json.dumps({"stdout": result.stdout.decode(), "stderr": result.stderr.decode()}))

asyncio.run(main())
"""
@pytest.fixture
def delegated_cgroups(nobody: None) -> Iterator[list[Path]]:
    """cgroup v1 memory, pids and cpu directories owned by 65534, as systemd's
    Delegate=yes would give; removed after, with what the backend left in them."""
    if unified_host():
        pytest.skip("delegates cgroup v1 directories (this host is cgroup v2)")
    name = f"sandpool-test-nobody-{secrets.token_hex(4)}"
    made = []
    try:
        for controller in ("memory", "pids", "cpu"):
            directory = CGROUP_ROOT / controller / name
            directory.mkdir()
            made.append(directory)
            for path in (directory, directory / "cgroup.procs", directory / "tasks"):
                os.chown(path, NOBODY, NOBODY)
        yield made
    finally:
        for directory in made:
            for _ in range(100):  # until the last process of the test has gone
                with contextlib.suppress(OSError):
                    for child in sorted(directory.glob("*/"), reverse=True):
                        child.rmdir()
                    directory.rmdir()
                    break
                time.sleep(0.05)
        assert not any(directory.exists() for directory in made), made


@pytest.fixture
def nobodys_state() -> Iterator[Path]:
    """A state directory of 65534's, for its export of the image's root file
    system: outside pytest's tmp_path, which its tar could not reach."""
    state = Path(tempfile.mkdtemp(prefix="sandpool-test-nobody-"))
    try:
        state.chmod(0o755)
        os.chown(state, NOBODY, NOBODY)
        yield state
    finally:
        shutil.rmtree(state)


def test_a_non_root_backends_sandbox_gets_its_share_of_the_uids_quotas(
    delegated_cgroups: list[Path], nobodys_state: Path
) -> None:
    try:
        docker = grp.getgrnam("docker").gr_gid
    except KeyError:
        pytest.skip("needs the docker group, to export the image's root file system")
    join = " && ".join(f'echo $$ > {d}/cgroup.procs' for d in delegated_cgroups)
    code = DROP_AMBIENT + f"CODE = {INSIDE!r}\n" + textwrap.dedent(BACKEND)
    seen = as_nobody(
        code, prefix=("/bin/sh", "-c", f'{join} && exec "$@"', "sh"),
        groups=f"--groups={docker}", env={"STATE_DIRECTORY": str(nobodys_state)},
    )
    assert seen["stderr"] == "", seen
    inside = json.loads(str(seen["stdout"]))
    holders = 3 + 1
    host = int(Path("/proc/sys/fs/inotify/max_user_instances").read_text())
    assert inside["held"] == host // holders, inside
    own = [resource.getrlimit(getattr(resource, name))[0]
           for name in ("RLIMIT_MSGQUEUE", "RLIMIT_SIGPENDING", "RLIMIT_MEMLOCK")]
    assert inside["rlimits"] == [value // holders for value in own], inside
    assert_noexec_scratch(inside["ran"], inside["options"])
    # Its share of the host's PTYs: the daemon holds 8 such sandboxes at most.
    free = (int(Path("/proc/sys/kernel/pty/max").read_text())
            - int(Path("/proc/sys/kernel/pty/reserve").read_text()))
    assert (inside["ptys"], inside["pty_errno"]) == (free // 8, errno.ENOSPC), inside
