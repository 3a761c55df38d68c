"""The daemon's image, run with the settings a pod gets, passes the suites it should.

``sandpool/daemon:bookworm`` is built first unless current (``make
daemon-image``; a rebuild after a source change takes about a minute). Then,
with exactly the documented ``docker run`` flags (tests/daemon_image.py,
docs/kubernetes-image.md): the behaviour and adversarial suites run against a
daemon in the container (process, shell and wasm pools), each of the pod's
settings is taken away in turn to show the sandboxes need it (the engine's
default seccomp profile, each call the profile adds, the unmasked /proc, the
delegated cgroup), and the image's own configuration serves TLS, tokens and
metrics at the paths the Kubernetes manifests mount. No container or cgroup of
these tests is left afterwards.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sandpool_client import Client

from deploy.image.build import DAEMON_STAGE_LABEL
from deploy.image.pod import container_address, remove_cgroup_parent
from deploy.seccomp import generate
from deploy.simulate.pki import make_pki
from tests.daemon_image import (
    CGROUP_PARENT,
    ensure_daemon_image,
    launch_container,
    leftover_cgroups,
    leftover_containers,
)
from tests.support import REPOSITORY, DaemonFailed, stop_daemon, wait_started

pytestmark = pytest.mark.docker

# The suites' cases that cannot apply to the daemon's image, and why. Everything
# else in them runs, for every pool the image serves.
NOT_APPLICABLE = {
    "tests/security/test_adversarial.py::test_docker_memory_cgroup_limit_cannot_be_raised_from_inside":
        "the docker tier, which the image does not serve",
}
SUITES = ["tests/test_behaviour.py", "tests/security/test_adversarial.py"]
SUITES_TIMEOUT_S = 900
START_TIMEOUT_S = 120.0

PROCESS_POOL = """
[server]
metrics_address = "off"

[pools.python-process]
backend = "process"
min_idle = 1
max_size = 2
"""
WASM_POOL = """
[server]
metrics_address = "off"

[pools.python-wasm]
backend = "wasm"
min_idle = 1
max_size = 2
"""


@pytest.fixture(scope="module", autouse=True)
def daemon_image() -> Iterator[None]:
    """The image, current; after the module, nothing of any container left."""
    ensure_daemon_image()
    yield
    assert leftover_containers() == []
    assert leftover_cgroups() == []
    remove_cgroup_parent(CGROUP_PARENT)


def start_failure(tmp_path: Path, config: str, **settings: object) -> str:
    """Start the image with ``settings`` changed; return the daemon's one-line
    refusal. AssertionError if it started instead."""
    workdir = tmp_path / f"daemon-{len(list(tmp_path.iterdir()))}"
    workdir.mkdir()
    workdir.chmod(0o755)
    daemon = launch_container(workdir, config, **settings)  # type: ignore[arg-type]
    try:
        with pytest.raises(DaemonFailed) as failed:
            wait_started(daemon, START_TIMEOUT_S)
    finally:
        stop_daemon(daemon)
    lines = [line for line in str(failed.value).splitlines() if line.startswith("sandpool: ")]
    assert lines, str(failed.value)
    return lines[-1]


def test_no_build_leaves_the_image_of_its_venv_stage() -> None:
    # The module's fixture built the image unless it was current. The classic
    # builder kept that stage's image, untagged: 275 MB on the host per build.
    left = subprocess.run(
        ["docker", "images", "--all", "--quiet", "--filter", f"label={DAEMON_STAGE_LABEL}"],
        capture_output=True, text=True, check=True, timeout=60,
    )
    assert left.stdout.split() == []


def test_the_profile_is_dockers_default_plus_the_namespace_calls() -> None:
    assert generate.main(["--check"]) == 0
    profile = json.loads(generate.PROFILE.read_text())
    default = json.loads(generate.DOCKER_DEFAULT.read_text())
    *kept, added = profile["syscalls"]
    assert {**profile, "syscalls": kept} == default
    assert added["action"] == "SCMP_ACT_ALLOW"
    assert "args" not in added
    assert "includes" not in added
    assert set(added["names"]) == set(generate.NAMESPACE_CALLS)
    # Docker's default grants none of them without CAP_SYS_ADMIN, pivot_root never.
    unconditional = {name for rule in default["syscalls"] if rule["action"] == "SCMP_ACT_ALLOW"
                     and not rule.get("includes") and not rule.get("args")
                     for name in rule["names"]}
    assert unconditional.isdisjoint(added["names"])


@pytest.mark.timeout(SUITES_TIMEOUT_S + 60)
def test_behaviour_and_adversarial_suites_pass_against_the_image(tmp_path: Path) -> None:
    report = tmp_path / "suites.xml"
    argv = [sys.executable, "-m", "pytest", *SUITES, "-q", "-p", "no:cacheprovider",
            f"--junitxml={report}", "-o", "junit_family=xunit2",
            *[f"--deselect={case}" for case in NOT_APPLICABLE]]
    ran = subprocess.run(argv, cwd=REPOSITORY, capture_output=True, text=True,
                         timeout=SUITES_TIMEOUT_S,
                         env={**os.environ, "SANDPOOL_TEST_DAEMON_IMAGE": "1"})
    summary = ran.stdout.strip().splitlines()[-1] if ran.stdout.strip() else ran.stderr[-2000:]
    assert ran.returncode == 0, ran.stdout[-6000:] + ran.stderr[-2000:]
    counts = dict((kind, int(n)) for n, kind in re.findall(r"(\d+) (passed|failed|error)",
                                                           summary))
    assert counts.get("failed", 0) == 0, summary
    assert counts.get("error", 0) == 0, summary
    # Both suites, both tiers: far more than a handful of cases actually ran.
    text = report.read_text()
    for pool in ("python-process", "python-wasm"):
        assert text.count(f"[{pool}") >= 20, f"few cases ran on {pool}: {summary}"
    assert counts.get("passed", 0) >= 80, summary


def test_the_engines_default_seccomp_profile_stops_both_tiers(tmp_path: Path) -> None:
    refusal = start_failure(tmp_path, PROCESS_POOL, seccomp=None)
    assert ("cannot make the sandbox's namespaces: unshare: unshare failed: "
            "Operation not permitted") in refusal, refusal
    refusal = start_failure(tmp_path, WASM_POOL, seccomp=None)
    assert "cannot bound its scratch space" in refusal, refusal


BOTH_POOLS = PROCESS_POOL + WASM_POOL.replace("[server]\nmetrics_address = \"off\"\n", "")
# How each tier's start-up says that the kernel refused it a sandbox.
REFUSALS = {
    "process": ("cannot start a bubblewrap sandbox", "cannot make the sandbox's namespaces"),
    "wasm": ("cannot bound its scratch",),
}


@pytest.mark.parametrize("call", list(generate.NAMESPACE_CALLS))
def test_each_call_the_profile_adds_is_needed(tmp_path: Path, call: str) -> None:
    tiers, _ = generate.NAMESPACE_CALLS[call]
    profile = generate.profile()
    profile["syscalls"][-1]["names"].remove(call)
    without = tmp_path / "profile.json"
    without.write_text(json.dumps(profile))
    without.chmod(0o644)
    tmp_path.chmod(0o755)
    refusal = start_failure(tmp_path, BOTH_POOLS, seccomp=str(without))
    assert any(words in refusal for tier in tiers for words in REFUSALS[tier]), refusal
    assert "Operation not permitted" in refusal or "No permissions" in refusal, refusal


def test_without_an_unmasked_proc_the_process_tier_refuses(tmp_path: Path) -> None:
    # The runtime's read-only /proc/sys: the sandbox's quotas cannot be set (and
    # bwrap, measured before the quotas, could not mount a fresh /proc either).
    refusal = start_failure(tmp_path, PROCESS_POOL, unmasked_proc=False)
    assert ("cannot make the sandbox's namespaces: sandpool-userns: 1: cannot create "
            "/proc/sys/user/max_inotify_instances: Read-only file system") in refusal, refusal


def test_without_a_delegated_cgroup_the_process_tier_refuses(tmp_path: Path) -> None:
    refusal = start_failure(tmp_path, PROCESS_POOL, delegate=False)
    assert "cannot create one ([Errno 30]" in refusal, refusal


def test_the_images_own_config_serves_tls_tokens_and_metrics(tmp_path: Path) -> None:
    """The contract the manifests rely on: the image's own config, its paths and ports."""
    tmp_path.chmod(0o755)
    pki = make_pki(tmp_path / "secrets", ["sandpool.test"], ["contract"])
    workdir = tmp_path / "daemon"
    workdir.mkdir()
    workdir.chmod(0o755)
    config = (REPOSITORY / "deploy" / "image" / "sandpool.toml").read_text()
    daemon = launch_container(workdir, config, extra_flags=(
        "--volume", f"{pki.tls_dir}:/etc/sandpool/tls:ro",
        "--volume", f"{pki.tokens_dir}:/etc/sandpool/tokens:ro",
    ))
    try:
        wait_started(daemon, START_TIMEOUT_S)
        assert daemon.container is not None
        address = container_address(daemon.container)
        verify = ssl.create_default_context(cafile=str(pki.ca_file))
        verify.check_hostname = False  # the address, not the certificate's name
        with Client(base_url=f"https://{address}:8443", token=pki.tokens["contract"],
                    verify=verify) as remote:
            for pool in ("python", "python-wasm"):
                assert remote.run("print(6 * 7)", pool=pool).stdout == "42\n"
        answer = httpx.get(f"https://{address}:8443/readyz", verify=verify,
                           headers={"Authorization": f"Bearer {pki.tokens['contract']}"})
        assert answer.status_code == 200
        assert httpx.get(f"https://{address}:8443/readyz", verify=verify).status_code == 401
        metrics = httpx.get(f"http://{address}:9464/metrics").text
        assert 'sandpool_requests_total{' in metrics
        with daemon.client() as local:  # the Unix socket, in the bind-mounted directory
            assert {p["name"] for p in local.pools()} == {"python", "python-wasm"}
        for path in ("/readyz", "/healthz"):  # the pod's exec probes
            probe = subprocess.run(["docker", "exec", daemon.container, "sandpool-probe", path],
                                   capture_output=True, text=True, timeout=60)
            assert probe.returncode == 0, probe.stdout + probe.stderr
    finally:
        stop_daemon(daemon)
