"""A non-root daemon's user namespace for a process sandbox (pool/backends/process/userns.py).

Run as uid 65534, as such a daemon is: the namespace is made with a quota,
bwrap runs a probe in it the way the backend does (``--userns``, ``--cap-drop
ALL``, no seccomp filter, so only the namespace stands in the way), and the
probe reports what it could do; then a whole process backend as uid 65534,
in a cgroup delegated to it, gives its sandbox its share of the uid's quotas.
The daemon behind the same path is the adversarial suite's per-user quota
attack against the daemon's image (tests/test_daemon_image.py).
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
from pool.backends.process.userns import make_user_namespace, unshare_command
from pool.errors import BackendError

REPOSITORY = Path(__file__).resolve().parent.parent
NOBODY = 65534
# CAP_DAC_READ_SEARCH only to reach this checkout's interpreter and code (under /root
# here); the sandbox runs the host's /usr/bin/python3.
AS_NOBODY = (
    "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
    "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search",
)
QUOTAS = {"max_inotify_instances": 3, "max_inotify_watches": 64}

# Inside the sandbox: what the code can do about the namespaces it was given.
INSIDE = """
import ctypes, json, os
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
print(json.dumps({"uid": os.getuid(), "held": held, "inotify_errno": inotify_errno,
                  "nested": nested, "nested_errno": nested_errno, "raise_errno": raised,
                  "caps": caps}))
"""

# As uid 65534: make the namespace, run bwrap in it, and check that the daemon
# keeps no fd and no child of the making.
OUTSIDE = """
import asyncio, json, os, shutil, subprocess
from pool.backends.process.definition import UNSHARE_ALL_BUT_USER
from pool.backends.process.userns import make_user_namespace

async def main():
    before = sorted(os.listdir("/proc/self/fd"))
    namespace = await make_user_namespace(shutil.which("unshare"), QUOTAS)
    made = sorted(os.listdir("/proc/self/fd"))
    bwrap = await asyncio.create_subprocess_exec(
        # bwrap refuses to run with a capability (the ambient one this test added).
        "setpriv", "--inh-caps=-all", "--ambient-caps=-all",
        "bwrap", "--userns", str(namespace), *UNSHARE_ALL_BUT_USER,
        "--uid", "65534", "--gid", "65534", "--cap-drop", "ALL", "--die-with-parent",
        "--as-pid-1",  # as the backend runs it: the probe is the namespace's PID 1
        "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev",
        "--", "/usr/bin/python3", "-I", "-c", INSIDE,
        pass_fds=(namespace,), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await bwrap.communicate()
    os.close(namespace)
    children = open(f"/proc/self/task/{os.getpid()}/children").read().split()
    print(json.dumps({"inside": out.decode(), "stderr": err.decode()[-2000:],
                      "fds_made": len(made) - len(before),
                      "fds_after": sorted(os.listdir("/proc/self/fd")) == before,
                      "children": children}))

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
    for tool in ("setpriv", "unshare", "bwrap"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")


def test_a_sandbox_in_the_made_namespaces_has_its_quota_and_can_change_nothing(
    nobody: None,
) -> None:
    code = (f"QUOTAS = {QUOTAS!r}\nINSIDE = {INSIDE!r}\n" + textwrap.dedent(OUTSIDE))
    seen = as_nobody(code)
    assert seen["stderr"] == "", seen
    inside = json.loads(str(seen["inside"]))
    assert inside["uid"] == NOBODY
    # The namespace's quota holds the sandbox, with a spent quota's error.
    assert inside["held"] == QUOTAS["max_inotify_instances"], inside
    assert inside["inotify_errno"] == errno.EMFILE, inside
    # As with bwrap --disable-userns: no user namespace inside.
    assert inside["nested"] == -1, inside
    assert inside["nested_errno"] == errno.ENOSPC, inside
    # Neither can the code raise its quota: no capability, and /proc/sys read-only.
    assert inside["raise_errno"] in (errno.EROFS, errno.EACCES, errno.EPERM), inside
    # Not one capability left in any set, the bounding set included.
    assert set(inside["caps"].values()) == {"0000000000000000"}, inside
    assert len(inside["caps"]) == 5, inside
    # The daemon holds the namespace's fd until bwrap has it, then nothing.
    assert seen["fds_made"] == 1, seen
    assert seen["fds_after"] is True, seen
    assert seen["children"] == [], seen


async def test_a_maker_that_fails_is_a_backend_error_with_its_own_words(
    tmp_path: Path,
) -> None:
    failing = tmp_path / "unshare"
    failing.write_text("#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\n"
                       "exit 1\n")
    failing.chmod(0o755)
    before = sorted(os.listdir("/proc/self/fd"))
    with pytest.raises(BackendError) as refused:
        await make_user_namespace(str(failing), QUOTAS)
    assert refused.value.code == "userns_failed"
    assert str(refused.value.message) == (
        "cannot make the sandbox's user namespace: "
        "unshare: unshare failed: Operation not permitted"
    )
    assert sorted(os.listdir("/proc/self/fd")) == before
    assert children() == []


def children() -> list[str]:
    """This process's children (its main thread's, which spawned them)."""
    return Path(f"/proc/self/task/{os.getpid()}/children").read_text().split()


async def test_a_maker_that_hangs_is_killed_and_reaped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pool.backends.process import userns

    monkeypatch.setattr(userns, "MAKE_TIMEOUT_S", 0.5)
    hanging = tmp_path / "unshare"
    hanging.write_text("#!/bin/sh\nexec sleep 60\n")
    hanging.chmod(0o755)
    with pytest.raises(BackendError, match=r"no answer in 0\.5 s"):
        await make_user_namespace(str(hanging), QUOTAS)
    assert children() == []


def test_every_quota_is_needed() -> None:
    with pytest.raises(KeyError):
        unshare_command("unshare", {"max_inotify_instances": 3})


# As uid 65534 in cgroups delegated to it: one process backend of max_size 1 in
# a daemon whose process pools hold 3 sandboxes at most (so 4 holders, the
# daemon included), one sandbox, what its code finds.
BACKEND = """
import asyncio, ctypes, json
from pool.backends.base import RunRequest
from pool.backends.process import ProcessBackend
from pool.config import PoolConfig
from pool.uids import SandboxUids

# Read under /root with CAP_DAC_READ_SEARCH; bwrap refuses to start with a capability.
ctypes.CDLL(None).prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL

async def main():
    backend = ProcessBackend(PoolConfig(name="nobody", backend="process", max_size=1),
                             "nobody", uids=SandboxUids(own_uid_sandboxes=3))
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
IN_SANDBOX = """
import ctypes, json, resource
libc = ctypes.CDLL(None, use_errno=True)
held = 0
while libc.inotify_init1(0) >= 0:
    held += 1
print(json.dumps({"inotify": held, "rlimits": [resource.getrlimit(getattr(resource, name))[0]
                  for name in ("RLIMIT_MSGQUEUE", "RLIMIT_SIGPENDING", "RLIMIT_MEMLOCK")]}))
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
    code = f"CODE = {IN_SANDBOX!r}\n" + textwrap.dedent(BACKEND)
    seen = as_nobody(
        code, prefix=("/bin/sh", "-c", f'{join} && exec "$@"', "sh"),
        groups=f"--groups={docker}", env={"STATE_DIRECTORY": str(nobodys_state)},
    )
    assert seen["stderr"] == "", seen
    inside = json.loads(str(seen["stdout"]))
    holders = 3 + 1
    host = int(Path("/proc/sys/fs/inotify/max_user_instances").read_text())
    assert inside["inotify"] == host // holders, inside
    own = [resource.getrlimit(getattr(resource, name))[0]
           for name in ("RLIMIT_MSGQUEUE", "RLIMIT_SIGPENDING", "RLIMIT_MEMLOCK")]
    assert inside["rlimits"] == [value // holders for value in own], inside
