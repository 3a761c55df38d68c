"""The fork backend: each isolation step a sandbox takes on itself, and the template.

What any sandbox must do runs from test_behaviour.py and the security suite
against the ``python-fork`` pool too. Here is what the fork tier does itself
(``pool/isolate.py``, the template in ``pool/runner.py``): namespaces of the
sandbox's own apart from the template's and its siblings', capabilities gone
to the last set, private mounts, per-sandbox shares of the template's quotas,
and the template's life (replaced when killed, gone with the daemon).
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from api.client import Client
from pool.backends.fork.template import id_map
from pool.uids import SandboxUids
from pool.wire import CGROUP_MOUNT, SandboxExit, SpawnOrder, WireError
from tests.support import Daemon, start_daemon, stop_daemon, wait_until

POOL = "python-fork"
NAMESPACES = ("mnt", "pid", "ipc", "uts", "net", "cgroup")
TEMPLATE_MARKER = "runner.py template"


def run(client: Client, code: str, **options: object) -> dict[str, object]:
    return client.run(textwrap.dedent(code), pool=POOL, **options)  # type: ignore[arg-type]


def last_json(result: dict[str, object]) -> dict[str, object]:
    lines = str(result["stdout"]).splitlines()
    assert lines, result
    value = json.loads(lines[-1])
    assert isinstance(value, dict)
    return value


def templates() -> list[int]:
    """Host pids of every fork template running on this host: bwrap's child running
    the template (its sandboxes are forks of it, with the same command line)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                parent = Path(f"/proc/{_parent(int(entry.name))}/cmdline").read_bytes()
            except (OSError, ValueError):
                continue
            if TEMPLATE_MARKER in cmdline and "bwrap" not in cmdline and b"bwrap" in parent:
                pids.append(int(entry.name))
    return pids


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/status").read_text().split("PPid:")[1].split()[0])


def namespaces_of(pid: int) -> dict[str, str]:
    return {name: os.readlink(f"/proc/{pid}/ns/{name}") for name in (*NAMESPACES, "user")}


NAMESPACE_REPORT = """
    import json, os, time
    time.sleep({sleep})
    print(json.dumps({{name: os.readlink(f"/proc/self/ns/{{name}}")
                      for name in {names}}}))
"""


# --- seen from inside, through the daemon -----------------------------------


def test_every_namespace_but_the_users_is_the_sandboxs_own(
    daemon: Daemon, client: Client
) -> None:
    code = NAMESPACE_REPORT.format(sleep=1.0, names=(*NAMESPACES, "user"))

    def one() -> dict[str, object]:
        with daemon.client() as own:
            return last_json(run(own, code))

    with ThreadPoolExecutor(2) as workers:  # two siblings alive at once
        first, second = list(workers.map(lambda _: one(), range(2)))
    template_pids = [pid for pid in templates() if _daemon_of(pid) == daemon.pid]
    assert template_pids, "no template of this daemon found on the host"
    template_namespaces = [namespaces_of(pid) for pid in template_pids]
    own = namespaces_of(os.getpid())
    for name in NAMESPACES:
        assert first[name] != second[name], name  # not a sibling's
        assert first[name] != own[name], name  # not the host's
        assert all(first[name] != ns[name] for ns in template_namespaces), name
    # The user namespace is the template's (it maps each sandbox's host uid),
    # where the sandbox holds no capability (the next test).
    assert first["user"] == second["user"]
    assert first["user"] in {ns["user"] for ns in template_namespaces}


def test_no_capability_in_any_set_and_a_host_uid_of_its_own(client: Client) -> None:
    result = run(client, """
        import json, os
        sets = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")
        lines = open("/proc/self/status").read().splitlines()
        status = dict(line.split(":\\t", 1) for line in lines if line.split(":")[0] in sets)
        print(json.dumps({"status": {k: v.strip() for k, v in status.items()},
                          "ids": [os.getresuid(), os.getresgid(), os.getgroups()]}))
    """)
    report = last_json(result)
    status = report["status"]
    assert isinstance(status, dict)
    for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert status[name] == "0000000000000000", (name, status)
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"
    ids = report["ids"]
    assert isinstance(ids, list)
    uids, gids, groups = ids
    assert len(set(uids)) == 1
    assert uids[0] in SandboxUids()
    assert uids[0] != 0
    assert gids == uids
    assert groups == []


def test_only_its_own_processes_mounts_and_devices_are_visible(client: Client) -> None:
    result = run(client, f"""
        import json, os, socket
        mounts = {{line.split()[4]: line.split(" - ")[0].split()[5]
                  for line in open("/proc/self/mountinfo")}}
        print(json.dumps({{
            "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
            "cgroup": open("/proc/self/cgroup").read().split(":")[-1].strip(),
            "cgroup_dirs": os.path.exists("{CGROUP_MOUNT}"),
            "options": {{path: mounts.get(path, "") for path in ("/tmp", "/dev/shm", "/sandbox")}},
            "pts": sorted(os.listdir("/dev/pts")),
            "hostname": socket.gethostname(),
            "interfaces": sorted(name for _, name in socket.if_nameindex()),
            "workdir": [os.getcwd(), os.stat(".").st_uid == os.getuid()],
        }}))
    """)
    report = last_json(result)
    # PID 1 is the sandbox's runner, 2 the code: no template, no sibling.
    assert report["pids"] == [1, 2]
    assert report["cgroup"] == "/"  # its own cgroup namespace, rooted at its own cgroup
    assert report["cgroup_dirs"] is False  # the template's cgroup mounts are not there
    options = report["options"]
    assert isinstance(options, dict)
    for path, flags in options.items():
        assert {"nosuid", "nodev", "noexec"} <= set(flags.split(",")), (path, flags)
    assert report["pts"] == ["ptmx"]  # a devpts instance of its own
    assert report["hostname"] == "sandbox"
    assert report["interfaces"] == ["lo"]
    assert report["workdir"] == ["/sandbox", True]


def test_the_code_holds_no_descriptor_of_the_template(client: Client) -> None:
    # PID 1 closed every fd it did not need before it dropped privileges: the
    # template's control socket, its siblings' pipes and its diagnostics are gone.
    result = run(client, """
        import json, os
        fds = {}
        for fd in os.listdir("/proc/self/fd"):
            try:
                fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
            except FileNotFoundError:
                pass  # the listing's own fd, closed by now
        print(json.dumps(fds))
    """)
    targets = sorted(last_json(result).values())
    assert [t for t in targets if not t.startswith(("pipe:", "/memfd:"))] == [], targets
    # stdin (a memfd), stdout, stderr and the status pipe.
    assert len(targets) == 4, targets


def test_a_pty_or_shm_segment_of_one_sandbox_is_not_in_the_next(
    daemon: Daemon, client: Client
) -> None:
    first = run(client, """
        import ctypes, os, pty
        libc = ctypes.CDLL(None, use_errno=True)
        master, slave = pty.openpty()
        segment = libc.shmget(0x5a17, 4096, 0o1666)  # IPC_CREAT | 0666
        print(sorted(os.listdir("/dev/pts")), segment >= 0)
    """)
    assert str(first["stdout"]).split("]")[-1].strip() == "True", first
    second = run(client, """
        import os
        print(sorted(os.listdir("/dev/pts")), open("/proc/sysvipc/shm").read().count("\\n"))
    """)
    assert second["stdout"] == "['ptmx'] 1\n"  # the header line only


def test_user_quotas_and_rlimits_are_the_sandboxs_share(client: Client) -> None:
    result = run(client, """
        import resource
        quotas = [open(f"/proc/sys/user/max_inotify_{name}").read().strip()
                  for name in ("instances", "watches")]
        limits = [resource.getrlimit(getattr(resource, f"RLIMIT_{name}"))[0]
                  for name in ("MSGQUEUE", "SIGPENDING", "MEMLOCK")]
        print(*quotas, *limits)
    """)
    shares = [int(word) for word in str(result["stdout"]).split()]
    host = [int(Path(f"/proc/sys/fs/inotify/max_user_{name}").read_text())
            for name in ("instances", "watches")]
    import resource

    own = [resource.getrlimit(getattr(resource, f"RLIMIT_{name}"))[0]
           for name in ("MSGQUEUE", "SIGPENDING", "MEMLOCK")]
    # python-fork's max_size is 4: a fifth of each, the template included.
    assert shares == [value // 5 for value in host] + [value // 5 for value in own]


# --- the template's life ----------------------------------------------------------


# One fork pool of two sandboxes at most, for the tests that kill its template.
SMALL_FORK_POOL = """
[server]
metrics_address = "off"

[pools.python-fork]
backend = "fork"
min_idle = 1
max_size = 2
"""


def template_of(daemon: Daemon) -> int:
    """The host pid of the daemon's one fork template."""
    mine = [pid for pid in templates() if _daemon_of(pid) == daemon.pid]
    assert len(mine) == 1, mine
    return mine[0]


def test_a_killed_template_is_replaced_and_no_request_fails(spawn_daemon: object) -> None:
    daemon = spawn_daemon(SMALL_FORK_POOL)  # type: ignore[operator]
    with daemon.client() as client:
        assert run(client, "print(1)")["stdout"] == "1\n"
        killed = template_of(daemon)
        os.kill(killed, signal.SIGKILL)
        results = [run(client, "print(2)") for _ in range(5)]
    assert [r["stdout"] for r in results] == ["2\n"] * 5, results
    assert template_of(daemon) != killed


def test_a_request_whose_template_dies_under_it_runs_again_in_a_new_sandbox(
    spawn_daemon: object,
) -> None:
    # The code is silent while its template is killed: the sandbox dies with
    # the template, and its runner's end is not the code's exit 137.
    daemon = spawn_daemon(SMALL_FORK_POOL)  # type: ignore[operator]
    with daemon.client() as client:
        template = template_of(daemon)
        with ThreadPoolExecutor(1) as executor:
            running = executor.submit(
                run, client, "import time\ntime.sleep(2)\nprint('ran')", timeout_s=20)
            time.sleep(0.5)  # handed out, and asleep
            os.kill(template, signal.SIGKILL)
            result = running.result(timeout=60)
    assert (result["exit_code"], result["stdout"]) == (0, "ran\n"), result


def test_a_killed_daemon_takes_its_template_and_sandboxes_along(tmp_path: Path) -> None:
    config = """
        [server]
        metrics_address = "off"

        [pools.python-fork]
        backend = "fork"
        min_idle = 2
    """
    crashed = start_daemon(tmp_path, textwrap.dedent(config))
    mine = [pid for pid in templates() if _daemon_of(pid) == crashed.pid]
    assert len(mine) == 1
    sandboxes = _descendants(mine[0])
    assert len(sandboxes) >= 4  # two parked sandboxes: a runner and its child each
    crashed.process.kill()
    crashed.process.wait()
    wait_until(lambda: not (set(mine) | sandboxes) & _live_pids(), "the tree to go", timeout_s=10)


def test_a_stopped_daemon_has_waited_for_its_template_and_sandboxes(tmp_path: Path) -> None:
    config = """
        [server]
        metrics_address = "off"

        [pools.python-fork]
        backend = "fork"
        min_idle = 3
    """
    daemon = start_daemon(tmp_path, textwrap.dedent(config))
    mine = [pid for pid in templates() if _daemon_of(pid) == daemon.pid]
    assert len(mine) == 1
    tree = {mine[0], *_descendants(mine[0])}
    assert len(tree) >= 7  # the template and three parked sandboxes of two processes
    stop_daemon(daemon)
    assert daemon.process.returncode == 0
    # No waiting here: the daemon's exit comes after the template's, which comes
    # after every sandbox nested in its PID namespace was reaped.
    assert not tree & _live_pids()


def _daemon_of(pid: int) -> int | None:
    """The daemon a template belongs to: its ancestor running ``api.cli serve``."""
    current = pid
    for _ in range(8):
        try:
            status = Path(f"/proc/{current}/status").read_text()
            cmdline = Path(f"/proc/{current}/cmdline").read_bytes()
        except OSError:
            return None
        if b"api.cli" in cmdline and b"serve" in cmdline:
            return current
        current = int(status.split("PPid:")[1].split()[0])
        if current <= 1:
            return None
    return None


def _live_pids() -> set[int]:
    return {int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()}


def _descendants(root: int) -> set[int]:
    """Every process below ``root``, from the host's process table."""
    children: dict[int, list[int]] = {}
    for pid in _live_pids():
        try:
            children.setdefault(_parent(pid), []).append(pid)
        except (OSError, IndexError, ValueError):
            continue
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


# --- the control socket's messages, as the template and the daemon read them ------


def test_spawn_orders_round_trip_and_bad_ones_are_refused() -> None:
    procs = [f"{CGROUP_MOUNT}/memory/s1/cgroup.procs"]
    order = SpawnOrder("s1", 1_900_000_001, procs, 1 << 20, {"max_inotify_instances": 25}, 96)
    decoded = SpawnOrder.decode(order.encode())
    assert (decoded.sandbox, decoded.uid, decoded.cgroup_procs, decoded.ptys) == (
        "s1", 1_900_000_001, procs, 96)
    for bad in (
        b"not json",
        b"[]",
        SpawnOrder("../x", 5, procs, 1, {}, 1).encode(),
        SpawnOrder("s", 0, procs, 1, {}, 1).encode(),  # uid 0: the template's root
        SpawnOrder("s", 5, ["/sys/fs/cgroup/memory/cgroup.procs"], 1, {}, 1).encode(),
        SpawnOrder("s", 5, [f"{CGROUP_MOUNT}/../../etc/cgroup.procs"], 1, {}, 1).encode(),
        SpawnOrder("s", 5, procs, 0, {}, 1).encode(),
        SpawnOrder("s", 5, procs, 1, {"max_user_namespaces": 5}, 1).encode(),
        SpawnOrder("s", 5, procs, 1, {}, 0).encode(),  # no PTY limit is not "0 PTYs"
    ):
        with pytest.raises(WireError):
            SpawnOrder.decode(bad)


def test_sandbox_exits_round_trip_and_bad_ones_are_refused() -> None:
    assert SandboxExit.decode(SandboxExit("s1", -9).encode()).status == -9
    for bad in (b"{}", b'{"sandbox": "s", "status": 9999}', b'{"sandbox": 1, "status": 0}'):
        with pytest.raises(WireError):
            SandboxExit.decode(bad)


def test_the_template_maps_the_range_around_its_own_uid() -> None:
    uids = SandboxUids(base=100_000, count=10)
    assert id_map(100_004, uids) == "0 100004 1\n100000 100000 4\n100005 100005 5\n"
    assert id_map(100_000, uids) == "0 100000 1\n100001 100001 9\n"
    assert id_map(100_009, uids) == "0 100009 1\n100000 100000 9\n"
