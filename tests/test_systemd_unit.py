"""systemd/sandpool.service: systemd accepts it, and it keeps the promises docs/systemd.md makes.

``systemd-analyze verify`` works offline (PID 1 need not be systemd). It checks
that ExecStart= exists, so it runs on a copy whose ExecStart= points at this
checkout's ``sandpool``; everything else is verified as shipped. verify exits 0
even for an unknown key or a value it cannot parse ("..., ignoring."), so the
test also requires that it says nothing about the unit at all.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from api.cli import build_parser
from api.daemon import WARM_TIMEOUT_S
from pool.config import ServerConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "sandpool.service"
EXAMPLE_CONFIG = ROOT / "systemd" / "sandpool.toml"
INSTALLED_SANDPOOL = "/opt/sandpool/.venv/bin/sandpool"
# What bubblewrap unshares for each sandbox (bwrap --unshare-all, user namespace included).
BWRAP_NAMESPACES = {"user", "pid", "net", "ipc", "uts", "cgroup", "mnt"}


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections -> (key, value) in order; keys may repeat (Environment=)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"line {number}: keep each directive on one line"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"line {number}: directive outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"line {number}: not key=value: {raw!r}"
        current.append((key.strip(), value.strip()))
    return sections


def directives(section: str) -> dict[str, str]:
    """The last value of each key, as systemd applies it for single-valued settings."""
    return dict(parse_unit(UNIT.read_text())[section])


def values(section: str, key: str) -> list[str]:
    return [v for k, v in parse_unit(UNIT.read_text())[section] if k == key]


def seconds(value: str) -> float:
    """systemd time spans as this unit writes them: plain seconds, or with s/min."""
    if value.endswith("min"):
        return float(value[:-3]) * 60
    return float(value.removesuffix("s"))


def local_sandpool_command() -> str:
    """This checkout's sandpool: the venv's console script, else ``python -m api.cli``."""
    script = Path(sys.executable).parent / "sandpool"
    if script.exists():
        return str(script)
    return f"{sys.executable} -m api.cli"


def verify_complaints(unit_text: str, directory: Path) -> tuple[int, list[str]]:
    """Run ``systemd-analyze verify`` on unit_text as sandpool.service.

    Returns its exit code and the output lines that name the unit.
    """
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail(
            "systemd-analyze is missing: run `make setup` as root "
            "(it installs Debian's systemd package) or `apt-get install systemd`"
        )
    unit = directory / "sandpool.service"
    unit.write_text(unit_text)
    done = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    output = (done.stdout + done.stderr).splitlines()
    return done.returncode, [line for line in output if "sandpool.service" in line]


def with_local_exec_start(text: str) -> str:
    before = f"ExecStart={INSTALLED_SANDPOOL} "
    assert text.count(before) == 1, "expected one ExecStart= running the installed sandpool"
    return text.replace(before, f"ExecStart={local_sandpool_command()} ")


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    code, complaints = verify_complaints(with_local_exec_start(UNIT.read_text()), tmp_path)
    assert complaints == []
    assert code == 0


@pytest.mark.parametrize(
    "mistake",
    ["WatchdogSecs=30", "ProtectSystem=strictt", "RestrictNamespaces=user pid nett"],
)
def test_verify_check_reports_a_broken_directive(tmp_path: Path, mistake: str) -> None:
    """The check above can fail: verify exits 0 here, but names the bad line."""
    text = with_local_exec_start(UNIT.read_text()).replace(
        "[Service]\n", f"[Service]\n{mistake}\n", 1
    )
    _, complaints = verify_complaints(text, tmp_path)
    assert complaints, f"verify said nothing about {mistake!r}"


def test_unit_keeps_the_promised_directives() -> None:
    service = directives("Service")
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert seconds(service["WatchdogSec"]) == 30
    assert service["Restart"] == "on-failure"
    assert service["KillMode"] == "mixed"
    assert service["RuntimeDirectory"] == "sandpool"
    assert service["RuntimeDirectoryMode"] == "0750"
    assert (service["User"], service["Group"]) == ("sandpool", "sandpool")
    assert service["SupplementaryGroups"] == "docker"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["ProtectHome"] == "yes"
    assert service["PrivateTmp"] == "yes"
    assert service["CapabilityBoundingSet"] == ""
    assert "PYTHONUNBUFFERED=1" in values("Service", "Environment")
    assert "ExecReload" not in service, "the daemon cannot reload its config"
    assert directives("Install")["WantedBy"] == "multi-user.target"


def test_unit_lets_bubblewrap_and_wasmtime_work() -> None:
    service = directives("Service")
    # wasmtime's JIT maps written code executable: MemoryDenyWriteExecute kills it.
    assert "MemoryDenyWriteExecute" not in service
    # ProtectKernelTunables: a read-only /proc/sys fails the /proc/sys/user limits
    # the daemon writes in each sandbox's user namespace (and bwrap --disable-userns).
    # ProtectHostname: its seccomp filter fails bwrap --hostname. Both, and
    # ProtectKernelLogs, overmount parts of /proc, which makes the kernel refuse
    # bwrap a fresh /proc once systemd (253+) detaches the old root.
    for key in ("ProtectKernelTunables", "ProtectKernelLogs", "ProtectHostname"):
        assert service.get(key, "no") == "no", f"{key}=yes breaks the process backend's bwrap"
    # systemd 257's filter answers openat2() with ENOSYS: bwrap 0.12 cannot open its sources.
    assert service.get("RestrictSUIDSGID", "no") == "no"
    # ... so nobody else may reach a setuid/setgid file the daemon could create.
    assert service["StateDirectoryMode"] == service["CacheDirectoryMode"] == "0700"
    assert service.get("ProcSubset", "all") == "all", "ProcSubset=pid breaks bwrap --proc"
    assert service.get("ProtectProc", "default") == "default", "hidepid breaks bwrap --proc"
    if "RestrictNamespaces" in service:
        assert set(service["RestrictNamespaces"].split()) >= BWRAP_NAMESPACES
    families = set(service["RestrictAddressFamilies"].split())
    # AF_NETLINK: bwrap --unshare-net brings up the sandbox's loopback over rtnetlink.
    assert {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"} <= families
    # A delegated cgroup subtree is useless if /sys/fs/cgroup is mounted read-only.
    assert service["Delegate"] == "yes"
    assert service.get("ProtectControlGroups", "no") == "no"


def test_timeouts_cover_warm_up_and_drain() -> None:
    service = directives("Service")
    assert seconds(service["TimeoutStartSec"]) > WARM_TIMEOUT_S, "READY=1 comes after warm-up"
    default_drain_s = ServerConfig().shutdown_timeout_s
    example_drain_s = load_config(EXAMPLE_CONFIG).server.shutdown_timeout_s
    assert seconds(service["TimeoutStopSec"]) > max(default_drain_s, example_drain_s)


def test_exec_start_parses_with_the_real_cli() -> None:
    argv = shlex.split(directives("Service")["ExecStart"])
    assert argv[0] == INSTALLED_SANDPOOL
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve"
    assert args.config == "/etc/sandpool/sandpool.toml"
    assert args.log_format == "json"


def test_example_config_loads_and_matches_the_unit() -> None:
    config = load_config(EXAMPLE_CONFIG)
    runtime_directory = Path("/run") / directives("Service")["RuntimeDirectory"]
    assert Path(config.server.socket).parent == runtime_directory
    assert config.server.socket_mode == 0o660, "clients reach the socket through its group"
    assert config.server.metrics_address == "127.0.0.1:9464", "the README's scrape config"


def test_every_directive_says_why() -> None:
    lines = UNIT.read_text().splitlines()
    for number, line in enumerate(lines):
        if "=" in line and not line.startswith(("#", ";", "[")):
            above = lines[number - 1] if number else ""
            assert above.startswith("#"), f"line {number + 1} ({line!r}) has no comment above it"
