"""The Docker sandbox's lock-down, observed from inside through the real daemon."""

from __future__ import annotations

import json
import secrets
import subprocess
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from api.client import Client
from pool.backends.docker.definition import container_definition
from pool.config import PoolConfig
from pool.uids import SandboxUids
from tests.support import Daemon, docker_containers, host_processes_with, wait_until


def run(client: Client, code: str, **options: object) -> dict[str, object]:
    return client.run(textwrap.dedent(code), pool="python", **options)  # type: ignore[arg-type]


def test_tcp_egress_fails(client: Client) -> None:
    result = run(client, """
        import socket
        try:
            socket.create_connection(("1.1.1.1", 53), timeout=2)
            print("connected")
        except OSError as e:
            print("blocked", type(e).__name__)
    """)
    assert str(result["stdout"]).startswith("blocked")


def test_dns_fails(client: Client) -> None:
    result = run(client, """
        import socket
        try:
            socket.getaddrinfo("deb.debian.org", 80)
            print("resolved")
        except OSError as e:
            print("blocked")
    """)
    assert result["stdout"] == "blocked\n"


def test_only_loopback_interface(client: Client) -> None:
    result = run(client, "import socket; print(sorted(n for _, n in socket.if_nameindex()))")
    assert result["stdout"] == "['lo']\n"


def test_root_filesystem_is_read_only(client: Client) -> None:
    result = run(client, """
        for path in ("/etc/evil", "/usr/bin/evil", "/evil"):
            try:
                open(path, "w")
                print("wrote", path)
            except OSError as e:
                print(e.errno)
    """)
    assert result["stdout"] == "30\n30\n30\n"  # EROFS everywhere


def test_tmp_is_writable_and_bounded(client: Client) -> None:
    result = run(client, """
        import errno
        open("/tmp/small", "w").write("ok")
        written = 0
        try:
            with open("/tmp/big", "wb") as f:
                while True:
                    f.write(b"x" * 2**20)
                    f.flush()
                    written += 1
        except OSError as e:
            print(open("/tmp/small").read(), e.errno == errno.ENOSPC, written)
    """, timeout_s=15)
    ok, enospc, mib = str(result["stdout"]).split()
    assert (ok, enospc) == ("ok", "True")
    assert int(mib) <= 16


def test_runs_unprivileged_without_capabilities(client: Client) -> None:
    result = run(client, """
        import os
        wanted = ("CapEff", "CapPrm", "NoNewPrivs")
        caps = [line for line in open("/proc/self/status") if line.startswith(wanted)]
        print(os.getuid(), os.getgid())
        print("".join(caps), end="")
    """)
    lines = str(result["stdout"]).splitlines()
    uid, gid = (int(v) for v in lines[0].split())
    assert uid == gid
    assert uid in SandboxUids()  # a host uid of the sandbox's own, never root
    assert "CapPrm:\t0000000000000000" in lines
    assert "CapEff:\t0000000000000000" in lines
    assert "NoNewPrivs:\t1" in lines


def test_no_docker_socket_and_no_host_files(client: Client) -> None:
    result = run(client, """
        import os
        print(os.path.exists("/var/run/docker.sock"), os.path.exists("/run/docker.sock"),
              os.path.exists("/root/.bashrc"), os.path.exists("/work"))
    """)
    assert result["stdout"] == "False False False False\n"


def test_shell_pool(client: Client) -> None:
    result = client.run("echo hi; read x; echo got $x; echo err >&2; exit 4",
                        language="shell", stdin="data\n")
    assert result["pool"] == "shell"
    assert result["stdout"] == "hi\ngot data\n"
    assert result["stderr"] == "err\n"
    assert result["exit_code"] == 4


def test_process_left_behind_dies_with_the_sandbox(client: Client, daemon: Daemon) -> None:
    # A number below one second, so `sleep 1000 <marker>` accepts it, and an
    # argument no other process on the host has.
    marker = f"0.{secrets.randbelow(10**15):015d}"
    with ThreadPoolExecutor(1) as executor:
        running = executor.submit(run, client, f"""
            import subprocess, time
            subprocess.Popen(["sleep", "1000", "{marker}"], start_new_session=True)
            time.sleep(2)  # the host sees the sleeper while the code still runs
        """)
        # Seen from the host first, so the check below cannot pass vacuously.
        wait_until(lambda: bool(host_processes_with(marker)), "the sleeper runs on the host")
        result = running.result(timeout=60)
    assert result["exit_code"] == 0
    # The result arrived while the sleeper still ran: removing the container
    # ends it (after the run, or at the sweep's second look if that failed).
    wait_until(lambda: not host_processes_with(marker), "no host process left with the marker")
    container = f"sandpool-python-{result['sandbox_id']}"
    wait_until(
        lambda: container not in docker_container_names(daemon.instance_id),
        f"container {container} removed",
    )


def docker_container_names(instance_id: str) -> list[str]:
    return subprocess.run(
        ["docker", "ps", "-a", "--filter", f"label=sandpool.instance={instance_id}",
         "--format", "{{.Names}}"],
        check=True, capture_output=True, text=True, timeout=30,
    ).stdout.split()


def test_no_network_is_attached_and_nothing_of_the_hosts_shows(
    client: Client, daemon: Daemon
) -> None:
    result = run(client, """
        import json, socket
        print(json.dumps({
            "interfaces": sorted(n for _, n in socket.if_nameindex()),
            "resolv.conf": open("/etc/resolv.conf").read(),
            "hosts": open("/etc/hosts").read(),
        }))
    """)
    # With networking disabled the engine writes no resolver or hosts file; with it
    # enabled (even on the "none" network) the host's nameservers appear here.
    assert json.loads(str(result["stdout"])) == {
        "interfaces": ["lo"], "resolv.conf": "", "hosts": ""}
    # While networking is disabled, the "none" network mode changes nothing inside;
    # it is what keeps the container off every network if networking ever comes
    # back (dockerd refuses to connect a "none" container): so its record is read.
    (name, *_) = docker_containers(f"sandpool.instance={daemon.instance_id}")
    inspected = subprocess.run(
        ["docker", "inspect", "--format",
         "{{json .HostConfig.NetworkMode}} {{json .Config.NetworkDisabled}} "
         "{{json .NetworkSettings.Networks}}", name],
        check=True, capture_output=True, text=True, timeout=30,
    ).stdout.split()
    assert inspected == ['"none"', "true", "{}"], inspected


def test_the_devpts_instance_is_the_containers_own_except_under_gvisor(tmp_path: Path) -> None:
    def pts_mounts(runtime: str | None) -> list[dict[str, Any]]:
        body = container_definition(
            PoolConfig(name="pts", runtime=runtime), uid=1_900_000_000, instance_id="i",
            owner="o", guest_dir=tmp_path, ptys=42,
        )
        return [m for m in body["HostConfig"]["Mounts"] if m["Target"] == "/dev/pts"]

    (mount,) = pts_mounts(None)
    options = mount["VolumeOptions"]["DriverConfig"]["Options"]
    assert options["type"] == "devpts"
    assert {"newinstance", "max=42", "nosuid", "noexec"} <= set(options["o"].split(","))
    # gVisor's PTYs are its own kernel's, not the host's.
    assert pts_mounts("runsc") == []
