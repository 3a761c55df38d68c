"""The Docker sandbox's lock-down, observed from inside through the real daemon."""

from __future__ import annotations

import textwrap

from api.client import Client


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
    assert lines[0] == "65534 65534"
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


def test_process_left_behind_dies_with_the_sandbox(client: Client) -> None:
    result = run(client, """
        import subprocess
        p = subprocess.Popen(["sleep", "1000"], start_new_session=True)
        print(p.pid)
    """)
    assert result["exit_code"] == 0
    # The result arrived while the sleeper still ran; the next request is a
    # different sandbox and cannot see it.
    other = run(client, """
        import os
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
        print(any(open(f"/proc/{p}/cmdline").read().startswith("sleep") for p in pids))
    """)
    assert other["stdout"] == "False\n"
