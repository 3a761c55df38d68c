"""The benchmark harness keeps working: ``python -m bench --quick`` writes a well-formed result.

No timing is asserted here (timings belong to ``make bench``); only that every
section is present, that the numbers are self-consistent (p50 <= p95 <= p99,
completions never exceed arrivals, ...), and that the run left nothing behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from bench import report

REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.docker, pytest.mark.timeout(400)]


def assert_stats(stats: dict[str, Any], where: str) -> None:
    assert stats["n"] >= 1, where
    values = [stats[k] for k in ("min_ms", "p50_ms", "p95_ms", "p99_ms", "max_ms")]
    assert values == sorted(values), f"{where}: percentiles out of order {stats}"
    assert stats["min_ms"] >= 0, where
    assert stats["min_ms"] <= stats["mean_ms"] <= stats["max_ms"], where


def assert_path(section: dict[str, Any], where: str, key: str = "result") -> None:
    """A measured path has both workloads; a skipped one says which package is missing."""
    if "skipped" in section:
        assert "pip install" in section["skipped"], where
        return
    assert "error" not in section, f"{where}: {section['error']}"
    for workload in report.WORKLOADS:
        assert_stats(section[workload][key], f"{where} {workload}")


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out), "--name", "quick"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=380,
    )
    result_path = out / "quick.json"
    assert result_path.exists(), process.stderr[-4000:]
    doc: dict[str, Any] = json.loads(result_path.read_text())
    if doc.get("dockerd_restarted_during_run"):
        pytest.skip("another process restarted dockerd during the quick benchmark")
    assert process.returncode == 0, process.stderr[-4000:]
    doc["_out"] = str(out)
    return doc


def test_every_section_is_present(quick_result: dict[str, Any]) -> None:
    assert quick_result["schema"] == report.SCHEMA
    assert quick_result["mode"] == "quick"
    for section in report.SECTIONS:
        assert section in quick_result, section
    assert quick_result["errors"] == []
    machine = quick_result["machine"]
    assert machine["cores"] >= 1
    assert machine["memory_mib"] > 0
    assert machine["kernel"]
    assert machine["python"]
    assert machine["docker_server"]


def test_cold_paths_and_churn_ceiling_are_sane(quick_result: dict[str, Any]) -> None:
    cold = quick_result["cold_paths"]
    assert set(report.COLD_PATHS) <= set(cold)
    assert_path(cold["seed_docker_py"], "seed")
    assert_path(cold["aiodocker_cold"], "aiodocker")
    peer = cold["llm_sandbox"]
    if "skipped" not in peer:
        assert peer["requirements"], "llm-sandbox's figures must say what it needed"
        assert_path(peer["session"], "llm-sandbox session")
        assert_path(peer["pool"], "llm-sandbox pool")
    churn = quick_result["churn_ceiling"]
    assert set(churn["workers"]) == {"1", "2", "4"}
    for workers, level in churn["workers"].items():
        assert level["cycles"] >= 1, workers
        assert level["ops_per_s"] > 0, workers
        assert_stats(level["create_start"], f"churn {workers}")
        assert level["host_cpu_ms_per_cycle"] > 0, workers
    assert churn["ceiling_ops_per_s"] == max(v["ops_per_s"] for v in churn["workers"].values())
    start_cpu = churn["sandbox_start_cpu"]
    if "skipped" not in start_cpu:  # a cgroup layout without a readable CPU counter
        for variant in ("runner", "bare_python"):
            assert_stats(start_cpu[variant], f"sandbox start CPU, {variant}")


def test_sandpool_sections_are_sane(quick_result: dict[str, Any]) -> None:
    sandpool = quick_result["sandpool"]
    served = {p["name"]: p["backend"] for p in sandpool["pools"]}
    assert served.get("python") == "docker"
    # One plain pool per tier (the wasm tier: one per module, the default
    # pool's and the pinned one), whose latency is measured; a preloaded pool
    # (a fork pool alone) only under load, its latency beside its data analysis.
    configured = tomllib.loads(sandpool["config"])["pools"]
    plain = {name for name in served if not configured[name].get("preload")}
    kinds = {(served[name], configured[name].get("wasm_module")) for name in plain}
    assert len(kinds) == len(plain), served
    assert {module for backend, module in kinds if backend == "wasm"} == {"datasci", None}
    assert {served[name] for name in set(served) - plain} <= {"fork"}, served
    assert set(sandpool["latency"]) == plain
    for name, entry in sandpool["latency"].items():
        for workload in report.WORKLOADS:
            measured = entry[workload]
            for key in ("e2e", "handout_all", "execution"):
                assert_stats(measured[key], f"{name} {workload} {key}")
            # The daemon's own hand-out and execution times fit inside the client's e2e.
            assert measured["execution"]["min_ms"] <= measured["e2e"]["max_ms"]
    assert set(sandpool["load"]) == set(served)
    for name, load in sandpool["load"].items():
        assert load["steps"], name
        for step in load["steps"]:
            assert step["ok"] + step["rejected"] + step["failed"] == step["arrivals"], step
            assert step["achieved_ok_per_s"] >= 0
            assert step["drain_s"] >= 0
            if step["ok"]:
                assert_stats(step["e2e"], f"{name} load {step['offered_per_s']}")
    assert 0 <= sandpool["idle_cpu"]["cpu_percent_of_one_core"] <= 200
    rss = sandpool["rss"]
    assert rss["warm_docker_sandboxes"] >= 1
    assert 10 < rss["rss_mib"] < 4096
    assert rss["stop_status"] == 0
    assert rss["leftover_containers"] == 0
    assert sandpool["stop_status"] == 0
    assert sandpool["leftover_containers"] == 0


def test_datasci_section_is_sane(quick_result: dict[str, Any]) -> None:
    datasci = quick_result["datasci"]
    if "skipped" in datasci:  # the datasci image is not built here
        assert "image build --profile datasci" in datasci["skipped"]
        return
    assert "error" not in datasci, datasci.get("error")
    assert quick_result["workloads"]["datasci"]["csv_bytes"] > 900_000
    cold = datasci["cold"]
    if "skipped" not in cold:
        assert_stats(cold["datasci"]["result"], "datasci cold")
        assert cold["datasci"]["with_remove"]["min_ms"] >= cold["datasci"]["result"]["min_ms"]
    if "skipped" not in datasci["floor"]:
        assert_stats(datasci["floor"]["wall"], "datasci floor")
    served = {p["name"]: p["backend"] for p in datasci["pools"]}
    assert served.get("datasci") == "docker"
    assert set(datasci["latency"]) == set(served) == set(datasci["load"])
    for name in served:
        for key in ("e2e", "handout_all", "execution"):
            assert_stats(datasci["latency"][name][key], f"{name} datasci {key}")
            assert_stats(datasci["print1_latency"][name][key], f"{name} print(1) {key}")
        memory = datasci["memory"][name]
        assert memory["sandboxes"] >= 1, name
        for tree in memory["per_sandbox"]:
            # A preloaded interpreter holds tens of MiB; PSS never exceeds RSS.
            assert 20 < tree["rss_mib"] < 1024, (name, tree)
            assert 0 < tree["pss_mib"] <= tree["rss_mib"], (name, tree)
        for step in datasci["load"][name]["steps"]:
            assert step["ok"] + step["rejected"] + step["failed"] == step["arrivals"], step
    for name in (name for name, backend in served.items() if backend == "fork"):
        # The template holds the preload once; its sandboxes share its pages.
        template = datasci["memory"][name]["template"]
        assert 20 < template["rss_mib"] < 1024, template
        assert 0 < template["pss_mib"] <= template["rss_mib"], template
        # Again with rss_warm of them warm, each sharing the template with more.
        many = datasci["memory_many"][name]
        assert many["sandboxes"] == many["warm"] > datasci["memory"][name]["sandboxes"], many
        assert 0 < many["pss_mib_median"] <= datasci["memory"][name]["pss_mib_median"], many
    assert datasci["stop_status"] == 0
    assert datasci["leftover_containers"] == 0


def test_sessions_section_is_sane(quick_result: dict[str, Any]) -> None:
    section = quick_result["sessions"]
    assert "error" not in section, section.get("error")
    served = {p["name"]: p["backend"] for p in section["pools"]}
    # print(1) side by side in every tier's plain pool, and in the datasci ones there.
    plain = {name for name in served if not name.startswith("datasci")}
    assert served.get("python") == "docker", served
    # A tier left out says why (its backend did not start here).
    assert set(served) | set(section["pools_not_started"]) >= {
        "python", "python-process", "python-fork"}, served
    assert plain <= set(section["print1"]) <= set(served)
    for name, entry in section["print1"].items():
        for path in ("single_use", "session"):
            for key in ("e2e", "execution"):
                assert_stats(entry[path][key], f"{name} print(1) {path} {key}")
            # The daemon's hand-out to result fits inside the client's e2e.
            assert entry[path]["execution"]["min_ms"] <= entry[path]["e2e"]["max_ms"]
        # Interleaved pairs: as many requests of each path.
        assert entry["single_use"]["e2e"]["n"] == entry["session"]["e2e"]["n"], name
        for key in ("create", "delete", "create_plus_delete"):
            assert_stats(entry[key], f"{name} {key}")
        assert entry["create_plus_delete"]["min_ms"] >= entry["create"]["min_ms"]
    datasci = {name for name in served if name.startswith("datasci")}
    assert set(section["analysis"]) == datasci
    if datasci:
        assert section["pools_not_started"] == {}
    for name, entry in section["analysis"].items():
        assert entry["repetitions"] >= 1, name
        for path in ("single_use", "session"):
            steps = entry[path]["steps"]
            assert list(steps) == ["load", "summary", "chart"], name
            for step, measured in steps.items():
                assert_stats(measured["e2e"], f"{name} {path} {step}")
                assert measured["e2e"]["n"] == entry["repetitions"], (name, path, step)
            # A total is its steps' sum in each repetition, so at least the sum of their minima.
            total = entry[path]["total"]
            assert_stats(total, f"{name} {path} total")
            assert total["min_ms"] >= sum(m["e2e"]["min_ms"] for m in steps.values()) - 0.01
        session = entry["session"]
        # The session's total adds its create and delete to its runs.
        assert session["total"]["min_ms"] >= session["runs_only"]["min_ms"]
        assert session["total"]["p50_ms"] >= session["runs_only"]["p50_ms"]
        assert_stats(session["create"], f"{name} analysis create")
    # Every session was deleted, and nothing of the section's daemon is left.
    assert section["sessions_left"] == 0
    assert section["leased_left"] == 0
    assert section["stop_status"] == 0
    assert section["leftover_containers"] == 0
    assert section["leftover_sandbox_processes"] == 0


def test_the_sessions_section_alone_renders_alone(quick_result: dict[str, Any]) -> None:
    """What ``--only sessions`` writes: the section's markdown without the others'."""
    alone = report.markdown({**quick_result, "only": "sessions"})
    assert "## Sessions against single use" in alone
    assert "## Latency per request" not in alone
    assert "## Targets" not in alone
    assert "| `python` (docker) |" in alone


def test_targets_files_and_cleanup(quick_result: dict[str, Any]) -> None:
    targets = quick_result["targets"]
    # sandpool's print(1) targets (the wasm pool's throughput from its memory
    # image among them), the fork tier's, the datasci pools' latency and
    # speed-up, and print(1) against the last published run, per backend.
    assert len(targets) == 10 + 6 + 3 * 2 + 4
    assert any("from a memory image" in target["target"] for target in targets)
    for target in targets:
        assert target["met"] in (True, False, None)
        assert target["measured"]
    assert quick_result["cleanup"]["leftover_containers"] == 0
    out = Path(quick_result["_out"])
    markdown = (out / "quick.md").read_text()
    assert "## Latency per request (ms)" in markdown
    assert "## Targets" in markdown
    assert "## Data analysis" in markdown
    assert "## Sessions against single use" in markdown
    if quick_result["plot"]["path"] is not None:
        assert (out / "quick.png").read_bytes().startswith(b"\x89PNG")
    else:
        assert quick_result["plot"]["note"]
