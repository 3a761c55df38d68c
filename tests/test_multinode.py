"""Three daemons behind HAProxy under load: one drained, one killed, nothing lost that could
be kept.

The shorter run of ``make simulate`` (deploy/simulate/run.py): three containers
of the daemon's image with the pod's settings, HAProxy in front (TLS, /readyz
health checks, retries of 503s and failed connections only), the client
package driving runs; node 2 gets SIGTERM, later node 3 SIGKILL while it has
runs in flight. Every outcome is counted: no failure a retry could have
avoided, every lost run one the killed node had and reported as lost, no run
executed twice (the daemons' own logs, by the request id each run carries), no
container, cgroup or sandbox process left.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from deploy.image.pod import containers_labelled, leftover_cgroups
from deploy.simulate import nodes
from deploy.simulate.run import SHORT, Outcome, render, simulate, spans_kill
from tests.daemon_image import ensure_daemon_image


def test_a_run_counts_as_lost_to_the_kill_only_if_it_spanned_the_kill() -> None:
    def run(started_s: float, latency_ms: float) -> Outcome:
        return Outcome("id", "python", started_s, latency_ms, "in_flight_lost")

    window = (16.0, 16.4)  # the SIGKILL sent at 16.0 s, the node's exit seen at 16.4
    assert spans_kill(run(15.5, 600), window)  # sent before, broke after the kill
    assert spans_kill(run(16.2, 100), window)  # sent while the node was dying
    assert not spans_kill(run(15.0, 900), window)  # over before the kill was sent
    assert not spans_kill(run(16.5, 50), window)  # sent after the node was gone
    assert not spans_kill(run(15.5, 600), None)  # no kill happened


@pytest.mark.docker
@pytest.mark.timeout(900)
def test_drain_and_kill_under_load_lose_only_the_killed_nodes_runs(tmp_path: Path) -> None:
    assert shutil.which("haproxy"), "haproxy is missing: `make setup` installs it"
    ensure_daemon_image()
    tmp_path.chmod(0o755)
    report = asyncio.run(simulate(SHORT, tmp_path, say=lambda line: None))
    shown = render(report)
    assert report.leaks == [], shown
    assert report.violations == [], shown
    assert report.requests >= 50, shown  # the load was real
    assert report.ok >= report.requests - report.in_flight_lost, shown
    assert report.failures == {}, shown  # nothing failed but the killed node's runs
    assert report.failures_retriable == 0, shown
    # The kill hit runs in flight, and each one that broke was reported lost;
    # `check` made it a violation for a lost run not to span the kill.
    assert report.in_flight_at_kill >= 1, shown
    assert report.in_flight_lost >= 1, shown
    assert report.drained_exit_code == 0, shown  # the drain finished every run it had
    assert report.killed_exit_code == 137, shown
    assert set(report.runs_per_node) == set(report.nodes), shown  # each node served
    assert containers_labelled(nodes.LABEL) == []
    assert leftover_cgroups(nodes.CGROUP_PARENT) == []
