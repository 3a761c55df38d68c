"""The result files: JSON (machine-readable), markdown tables, and a PNG of latency against load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCHEMA = "sandpool-bench/1"
WORKLOADS = ("print1", "realistic")
# Every result carries these top-level sections, in quick mode too.
SECTIONS = ("machine", "workloads", "churn_ceiling", "cold_paths", "sandpool", "datasci",
            "sessions", "targets", "cleanup")
COLD_PATHS = ("seed_docker_py", "aiodocker_cold", "llm_sandbox")


def _ms(stats: dict[str, Any] | None, key: str) -> str:
    if not stats or not stats.get("n"):
        return "-"
    value = stats[key]
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _stats_cells(stats: dict[str, Any] | None) -> list[str]:
    return [_ms(stats, "p50_ms"), _ms(stats, "p95_ms"), _ms(stats, "p99_ms"),
            str(stats.get("n", 0)) if stats else "0"]


def headline_rows(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any] | None,
                                                      dict[str, Any] | None, str]]:
    """(path, print1 stats, realistic stats, note) for the headline table."""
    rows: list[tuple[str, dict[str, Any] | None, dict[str, Any] | None, str]] = []
    cold = doc["cold_paths"]

    def add(label: str, section: dict[str, Any], note: str) -> None:
        if "skipped" in section or "error" in section:
            rows.append((label, None, None, section.get("skipped") or section.get("error", "")))
            return
        rows.append((label, section["print1"]["result"], section["realistic"]["result"], note))

    add("seed: docker-py run+wait+logs+remove", cold["seed_docker_py"],
        "result read, before remove")
    add("aiodocker cold: create+start+wait+delete", cold["aiodocker_cold"],
        "result read, before delete")
    peer = cold["llm_sandbox"]
    if "skipped" in peer:
        rows.append(("llm-sandbox", None, None, peer["skipped"]))
    else:
        add(f"llm-sandbox {peer['version']} session per request", peer["session"],
            "needs root, writable rootfs, skip_environment_setup")
        add(f"llm-sandbox {peer['version']} pool", peer["pool"],
            "containers reused (not single-use); same needs")
    for name, pool in doc["sandpool"].get("latency", {}).items():
        print1, realistic = pool.get("print1", {}), pool.get("realistic", {})
        rate = print1.get("rate_per_s")
        note = f"paced {rate:g}/s, warm pool" if rate else ""
        errors = [part["error"] for part in (print1, realistic) if "error" in part]
        rows.append((f"sandpool `{name}` ({pool['backend']}) via socket", print1.get("e2e"),
                     realistic.get("e2e"), "; ".join([note, *errors]).strip("; ")))
    return rows


def _load_table(name: str, load: dict[str, Any], note: str = "") -> list[str]:
    """One pool's open-loop steps as a markdown table (``note`` after its name)."""
    lines: list[str] = []
    if "steps" not in load:
        lines += [f"### `{name}`{note}", "", f"Not measured: {load.get('error')}", ""]
        return lines
    lines += [
        f"### `{name}`{note}", "",
        "| offered/s | arrived/s | completed/s | rejected | failed | p50 ms | p95 ms | p99 ms "
        "| hand-out p99 ms | drain s | CPU: daemon / dockerd / host "
        "| CPU ms/req: daemon / host | saturated (queue grows) | latency knee |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|",
    ]
    for step in load["steps"]:
        cpu = step.get("cpu") or {}
        cpu_cell = " / ".join(
            f"{cpu[k]:g} %" if cpu.get(k) is not None else "-"
            for k in ("daemon_cpu_percent", "dockerd_cpu_percent", "host_busy_percent")
        )
        lines.append(
            f"| {step['offered_per_s']:g}{' (refined)' if step.get('refined') else ''} | "
            f"{step['arrived_per_s']:g} | "
            f"{step['achieved_ok_per_s']:g} | {step['rejected']} | {step['failed']} | "
            f"{_ms(step['e2e'], 'p50_ms')} | {_ms(step['e2e'], 'p95_ms')} | "
            f"{_ms(step['e2e'], 'p99_ms')} | {_ms(step['handout'], 'p99_ms')} | "
            f"{step['drain_s']:g} | {cpu_cell} | "
            f"{step.get('daemon_cpu_ms_per_request') or '-'} / "
            f"{step.get('host_cpu_ms_per_request') or '-'} | {step['saturated'] or 'no'} | "
            f"{step.get('latency_knee') or 'no'} |"
        )
    lines += ["", f"Sustained (highest completed/s of an unsaturated step): "
                  f"{load['sustained_ok_per_s']}/s; peak completed/s: "
                  f"{load['peak_ok_per_s']}/s; stopped: {load['stopped']}. A refined rate "
                  f"lies between the ladder's last unsaturated rate and its first saturated "
                  f"one.", ""]
    return lines


def datasci_markdown(doc: dict[str, Any]) -> list[str]:
    """The data analysis: cold path against the datasci pools, memory, load."""
    datasci = doc.get("datasci") or {}
    lines = ["", "## Data analysis (1 MB CSV in, pandas groupby, one PNG out)", ""]
    if "latency" not in datasci:
        why = datasci.get("skipped") or datasci.get("error") or "not run"
        return [*lines, f"Not measured: {why}", ""]
    lines += [doc["workloads"]["datasci"]["description"] + ".", "",
              "| path | p50 ms | p95 ms | p99 ms | n | p50 vs cold | note |",
              "|---|---:|---:|---:|---:|---:|---|"]
    cold = datasci.get("cold") or {}
    cold_stats = (cold.get("datasci") or {}).get("result")
    cold_p50 = cold_stats.get("p50_ms") if cold_stats and cold_stats.get("n") else None
    if cold_stats:
        lines.append("| cold: docker-py run+wait+logs+read PNG+remove | "
                     + " | ".join(_stats_cells(cold_stats)) + " | 1x | result read, before "
                     f"remove; with remove p50 {_ms(cold['datasci']['with_remove'], 'p50_ms')} |")
    else:
        lines.append(f"| cold: docker run | - | - | - | 0 | - | "
                     f"{cold.get('skipped') or cold.get('error', '')} |")
    settings = datasci.get("pool_settings", {})
    for name, entry in datasci["latency"].items():
        e2e = entry.get("e2e")
        ratio = (f"{cold_p50 / e2e['p50_ms']:.1f}x faster" if cold_p50 and e2e and e2e.get("n")
                 else "-")
        pool = settings.get(name, {})
        note = (f"paced {entry.get('rate_per_s', 0):g}/s, warm pool, cpus {pool.get('cpus')}, "
                f"memory_mb {pool.get('memory_mb')}, hand-out to result p50 "
                f"{_ms(entry.get('execution'), 'p50_ms')} ms")
        if "error" in entry:
            note = entry["error"]
        lines.append(f"| sandpool `{name}` ({entry.get('backend')}) via socket | "
                     + " | ".join(_stats_cells(e2e)) + f" | {ratio} | {note} |")
    floor = datasci.get("floor") or {}
    if floor.get("wall"):
        lines.append("| floor: the script alone in one warm interpreter (no sandbox) | "
                     + " | ".join(_stats_cells(floor["wall"])) + " | - | CPU p50 "
                     f"{_ms(floor['cpu'], 'p50_ms')} ms; imports done, PNG into memory; the "
                     f"first run after the warm-up {floor['first_run_wall_ms']} ms |")
    for name, entry in (datasci.get("print1_latency") or {}).items():
        lines.append(f"| sandpool `{name}`, `print(1)` | " + " | ".join(
            _stats_cells(entry.get("e2e"))) + " | - | what a preloaded sandbox adds to any "
            f"request; hand-out to result p50 {_ms(entry.get('execution'), 'p50_ms')} ms |")
    for name, why in datasci.get("pools_not_started", {}).items():
        lines.append(f"| sandpool `{name}` | - | - | - | 0 | - | did not start: "
                     f"`{why.strip().splitlines()[-1]}` |")
    lines += ["", "Warm sandbox memory (idle, after preload; /proc/<pid>/smaps_rollup summed "
                  "over the sandbox's processes; PSS shares each shared page among the "
                  "processes mapping it, USS counts the pages no other process maps; a fork "
                  "sandbox shares its template's pages until it writes them, so its PSS "
                  "shrinks as more are warm):", "",
              "| pool | warm sandboxes | processes each | RSS MiB (median) | PSS MiB (median) "
              "| USS MiB (median) | PSS MiB, all warm together |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, memory in datasci.get("memory", {}).items():
        lines.append(_memory_row(f"`{name}`", memory))
        if not memory.get("sandboxes"):
            continue
        template = memory.get("template")
        if template:
            lines.append(f"| `{name}`: its template (once per pool) | 1 | "
                         f"{template['processes']} | {template['rss_mib']} | "
                         f"{template['pss_mib']} | {template['uss_mib']} | "
                         f"{template['pss_mib']} |")
    for name, memory in datasci.get("memory_many", {}).items():
        lines.append(_memory_row(
            f"`{name}`, {memory.get('warm', '?')} warm (a daemon of its own)", memory))
    lines += ["", "Open-loop load, the data analysis (Poisson arrivals):", ""]
    if datasci.get("config"):
        lines += ["Daemon configuration:", "", "```toml", datasci["config"].rstrip(), "```", ""]
    for name, load in datasci.get("load", {}).items():
        lines += _load_table(name, load)
    return lines


def _memory_row(label: str, memory: dict[str, Any]) -> str:
    """One row of the warm-memory table: a pool's warm sandboxes, or why none was read."""
    if not memory.get("sandboxes"):
        return f"| {label} | 0 | - | - | - | - | {memory.get('error', '')} |"
    return (f"| {label} | {memory['sandboxes']} | {memory['processes_per_sandbox']} "
            f"| {memory['rss_mib_median']} | {memory['pss_mib_median']} "
            f"| {memory.get('uss_mib_median', '-')} | {memory['pss_mib_total']} |")


def _delta(after: dict[str, Any] | None, before: dict[str, Any] | None) -> str:
    """p50 of ``after`` minus p50 of ``before``, signed, or '-'."""
    if not after or not after.get("n") or not before or not before.get("n"):
        return "-"
    return f"{after['p50_ms'] - before['p50_ms']:+.2f}"


def sessions_markdown(doc: dict[str, Any]) -> list[str]:
    """Sessions against single use: print(1) per tier, create + delete, the three-step
    analysis."""
    section = doc.get("sessions") or {}
    lines = ["", "## Sessions against single use", ""]
    if "print1" not in section:
        why = section.get("skipped") or section.get("error") or "not run"
        return [*lines, f"Not measured: {why}", ""]
    lines += [
        "Sequential, one client on one keep-alive connection; every request is sent once "
        "its pool is quiet (`min_idle` idle, nothing starting or busy), so no request pays "
        "for another's refill. `print(1)`: a `/v1/run` and a run of one long-lived session "
        "in pairs, the order flipping every pair; then session create and delete.", "",
        "| pool (tier) | single-use p50 | p99 | session run p50 | p99 | pairs | session minus "
        "single-use p50 | hand-out to result p50: single-use / session | create p50 | delete "
        "p50 | create + delete p50 | p99 | cycles |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for name, entry in section["print1"].items():
        if "error" in entry:
            lines.append(f"| `{name}` | {entry['error']} |" + " |" * 11)
            continue
        single, session = entry["single_use"], entry["session"]
        both = entry["create_plus_delete"]
        lines.append(
            f"| `{name}` ({entry['backend']}) | {_ms(single['e2e'], 'p50_ms')} | "
            f"{_ms(single['e2e'], 'p99_ms')} | {_ms(session['e2e'], 'p50_ms')} | "
            f"{_ms(session['e2e'], 'p99_ms')} | {session['e2e'].get('n', 0)} | "
            f"{_delta(session['e2e'], single['e2e'])} | "
            f"{_ms(single['execution'], 'p50_ms')} / {_ms(session['execution'], 'p50_ms')} | "
            f"{_ms(entry['create'], 'p50_ms')} | {_ms(entry['delete'], 'p50_ms')} | "
            f"{_ms(both, 'p50_ms')} | {_ms(both, 'p99_ms')} | {both.get('n', 0)} |")
    analysis = section.get("analysis") or {}
    if analysis:
        lines += [
            "", "The data analysis's CSV "
            f"({doc['workloads']['datasci']['csv_bytes'] / 1e6:.2f} MB, "
            f"{doc['workloads']['datasci']['rows']} rows) in three steps, as an agent "
            "takes it: load, a groupby summary, a PNG chart. Single use: three `/v1/run` "
            "calls, each sending the CSV again and running the earlier steps again; "
            "session: create, three runs (the CSV sent with the first, the DataFrame kept), "
            "delete. Each step waits for a quiet pool (an agent's think time), not counted; "
            "the two paths alternate which goes first. p50 per step and of the totals, ms:",
            "",
            "| pool (tier) | path | load | summary | chart | total p50 | total p99 | n "
            "| total vs session |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
    for name, entry in analysis.items():
        if "error" in entry:
            lines.append(f"| `{name}` | {entry['error']} |" + " |" * 7)
            continue
        session_total = entry["session"]["total"]
        rows = (("single use: 3 runs", entry["single_use"], entry["single_use"]["total"]),
                ("session: create + 3 runs + delete", entry["session"], session_total),
                ("session: the 3 runs alone", entry["session"], entry["session"]["runs_only"]))
        for label, path, total in rows:
            ratio = (f"{total['p50_ms'] / session_total['p50_ms']:.2f}x"
                     if total.get("n") and session_total.get("n") else "-")
            cells = [_ms(path["steps"][step]["e2e"], "p50_ms") for step in path["steps"]]
            lines.append(f"| `{name}` ({entry['backend']}) | {label} | " + " | ".join(cells)
                         + f" | {_ms(total, 'p50_ms')} | {_ms(total, 'p99_ms')} | "
                         f"{total.get('n', 0)} | {ratio} |")
        lines.append(f"| `{name}` | session create / delete p50 | "
                     f"{_ms(entry['session']['create'], 'p50_ms')} / "
                     f"{_ms(entry['session']['delete'], 'p50_ms')} | | | | | | |")
    for name, why in section.get("pools_not_started", {}).items():
        lines += ["", f"Pool `{name}` was not measured: `{why.strip().splitlines()[-1]}`."]
    if section.get("config"):
        lines += ["", "The section's daemon:", "", "```toml", section["config"].rstrip(), "```"]
    lines += ["", f"Left after the section: {section.get('sessions_left')} sessions, "
                  f"{section.get('leftover_containers')} containers, "
                  f"{section.get('leftover_sandbox_processes')} sandbox processes.", ""]
    return lines


# The sections ``python -m bench --only`` runs alone, each as the whole run renders it.
SECTION_MARKDOWN = {"datasci": datasci_markdown, "sessions": sessions_markdown}


def markdown(doc: dict[str, Any]) -> str:
    """The whole result as markdown tables."""
    m = doc["machine"]
    lines = [
        f"# sandpool benchmark {doc['name']} ({doc['mode']})",
        "",
        f"`{doc['command']}` — {doc['duration_s']:.0f} s, started {doc['started_at']}.",
        "",
        f"Machine: {m.get('cores')} cores ({m.get('cpu_model')}), {m.get('memory_mib')} MiB, "
        f"kernel {m.get('kernel')}, {m.get('os')}, Docker {m.get('docker_server')} "
        f"({m.get('docker_runtime')}, {m.get('storage_driver')}, cgroup {m.get('cgroup')}), "
        f"Python {m.get('python')}; load average at start {m.get('loadavg_at_start')}, "
        f"at end {doc.get('loadavg_at_end')}; image `{doc['image']}`.",
        "",
    ]
    if doc.get("note"):
        lines += [f"**{doc['note']}**", ""]
    if doc.get("dockerd_restarted_during_run"):
        lines += ["**dockerd restarted during this run (another process restarted it): "
                  "the Docker figures are disturbed.**", ""]
    if doc.get("only"):  # one section alone, as the whole run makes it
        lines += SECTION_MARKDOWN[doc["only"]](doc)
        return "\n".join([*lines, *_footer(doc)]) + "\n"
    lines += [
        "## Latency per request (ms)",
        "",
        "| path | print(1) p50 | p95 | p99 | n | realistic p50 | p95 | p99 | n | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for label, print1, realistic, note in headline_rows(doc):
        lines.append(f"| {label} | " + " | ".join(_stats_cells(print1) + _stats_cells(realistic))
                     + f" | {note} |")
    lines += ["", "Realistic script: " + doc["workloads"]["realistic"]["description"], ""]

    churn = doc["churn_ceiling"]
    lines += ["## Churn ceiling (raw create + start + delete, sandpool's container settings)", ""]
    if "workers" in churn:
        lines += ["| workers | containers/s | create+start p50 ms | delete p50 ms | cycles |",
                  "|---:|---:|---:|---:|---:|"]
        for workers, level in churn["workers"].items():
            lines.append(f"| {workers} | {level['ops_per_s']:.2f} | "
                         f"{_ms(level['create_start'], 'p50_ms')} | "
                         f"{_ms(level['delete'], 'p50_ms')} | {level['cycles']} |")
        lines += ["", f"Ceiling: **{churn['ceiling_ops_per_s']:.2f}/s** "
                      f"({churn['best_workers']} workers), "
                      f"{churn['workers'][str(churn['best_workers'])]['host_cpu_ms_per_cycle']} "
                      "ms of host CPU per cycle.", ""]
        start_cpu = churn.get("sandbox_start_cpu") or {}
        if "runner" in start_cpu:
            lines += ["A churn cycle deletes its container before anything runs in it. A pool "
                      "sandbox also starts Python: CPU inside one container until it waits on "
                      f"stdin, p50: sandpool's runner {_ms(start_cpu['runner'], 'p50_ms')} ms, "
                      f"a bare `python3 -I` {_ms(start_cpu['bare_python'], 'p50_ms')} ms "
                      "(cgroup CPU counter).", ""]
    else:
        lines += [f"Not measured: {churn.get('skipped') or churn.get('error')}", ""]

    sandpool = doc["sandpool"]
    lines += ["## sandpool open-loop load (Poisson arrivals, `print(1)`)", ""]
    for name, why in sandpool.get("pools_not_started", {}).items():
        lines += [f"Pool `{name}` of the default configuration was not measured: its "
                  f"backend did not start here (`{why.strip().splitlines()[-1]}`).", ""]
    if sandpool.get("config"):
        lines += ["Daemon configuration:", "", "```toml", sandpool["config"].rstrip(), "```", ""]
    for name, load in sandpool.get("load", {}).items():
        preload = (load.get("pool_settings") or {}).get("preload")
        lines += _load_table(name, load, f" (preload {', '.join(preload)})" if preload else "")
    versus = sandpool.get("docker_vs_ceiling")
    if versus:
        lines += [f"Docker pool sustained single-use throughput (the highest completed/s of "
                  f"a step whose queue did not grow) {versus['sustained_ok_per_s']}/s = "
                  f"**{versus['sustained_fraction']:.0%}** of the churn ceiling "
                  f"{versus['ceiling_ops_per_s']}/s; peak completed/s "
                  f"{versus['peak_ok_per_s']}/s ({versus['peak_fraction']:.0%}).", ""]
        if versus.get("cpu_bound_fraction"):
            lines += [f"Host CPU per single-use request at the pool's peak: "
                      f"{versus['sandbox_host_cpu_ms_per_request']} ms, against "
                      f"{versus['churn_host_cpu_ms_per_cycle']} ms per churn cycle: where the "
                      f"host is CPU-bound, single-use work can reach at most "
                      f"**{versus['cpu_bound_fraction']:.0%}** of the ceiling.", ""]

    lines += ["## Daemon", ""]
    rss = sandpool.get("rss", {})
    if rss.get("rss_mib") is not None:
        lines.append(f"- RSS with {rss['warm_docker_sandboxes']} warm Docker sandboxes: "
                     f"**{rss['rss_mib']:.1f} MiB** (VmRSS of the daemon process).")
    for label, idle in (("benchmark daemon, all pools warm", sandpool.get("idle_cpu")),
                        ("Docker-only daemon, 16 warm", rss.get("idle_cpu"))):
        if idle:
            lines.append(f"- Idle CPU ({label}): {idle['cpu_percent_of_one_core']:.2f} % of one "
                         f"core over {idle['window_s']:g} s.")
    for key, label in (("api_floor", "back to back"), ("api_floor_paced", "paced 25/s")):
        if sandpool.get(key):
            lines.append(f"- HTTP floor (GET /healthz round trip, same client, {label}): p50 "
                         f"{_ms(sandpool[key], 'p50_ms')} ms, p99 "
                         f"{_ms(sandpool[key], 'p99_ms')} ms.")
    for name, pool in sandpool.get("latency", {}).items():
        if "handout_idle" not in pool.get("print1", {}):
            continue
        print1 = pool["print1"]
        lines.append(f"- `{name}` `print(1)`: hand-out (`queued_ms`, idle sandbox) p99 "
                     f"{_ms(print1['handout_idle'], 'p99_ms')} ms; hand-out to result "
                     f"(`duration_ms`) p50 {_ms(print1['execution'], 'p50_ms')} ms; e2e minus "
                     f"both p50 {_ms(print1.get('outside_backend'), 'p50_ms')} ms.")
    lines += datasci_markdown(doc)
    lines += sessions_markdown(doc)
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for target in doc["targets"]:
        met = {True: "yes", False: "**no**", None: "n/a"}[target["met"]]
        lines.append(f"| {target['target']} | {target['measured']} | {met} |")
    return "\n".join([*lines, *_footer(doc)]) + "\n"


def _footer(doc: dict[str, Any]) -> list[str]:
    lines = ["", f"Cleanup: {doc['cleanup'].get('leftover_containers', '?')} containers "
                 "left after the run."]
    if doc.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e}" for e in doc["errors"]]
    return lines


def plot(doc: dict[str, Any], path: Path) -> str | None:
    """Latency against offered load, one panel per backend.

    Returns None when the PNG was written, else why not (matplotlib absent, no load test).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'): no plot"
    loads = {k: v for k, v in doc["sandpool"].get("load", {}).items() if "steps" in v}
    loads |= {f"{k}, data analysis": v for k, v in
              ((doc.get("datasci") or {}).get("load") or {}).items() if "steps" in v}
    if not loads:
        return "no load test ran: no plot"
    columns = min(4, len(loads))
    rows = -(-len(loads) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 4 * rows), squeeze=False)
    for ax in axes.flat[len(loads):]:
        ax.set_visible(False)
    for ax, (name, load) in zip(axes.flat, loads.items(), strict=False):
        steps = [s for s in load["steps"] if s["e2e"].get("n")]
        rates = [s["offered_per_s"] for s in steps]
        for key, style in (("p50_ms", "o-"), ("p95_ms", "s--"), ("p99_ms", "^-")):
            ax.plot(rates, [s["e2e"][key] for s in steps], style, label=key.split("_")[0])
        for s in steps:
            if s["saturated"]:
                ax.axvspan(s["offered_per_s"] * 0.97, s["offered_per_s"] * 1.03, color="red",
                           alpha=0.15)
        if load.get("backend") == "docker" and "ceiling_ops_per_s" in doc["churn_ceiling"]:
            ax.axvline(doc["churn_ceiling"]["ceiling_ops_per_s"], color="grey", linestyle=":",
                       label="churn ceiling")
        if any(s["e2e"]["p50_ms"] > 0 for s in steps):
            ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "no request completed", transform=ax.transAxes, ha="center")
        ax.set_xlabel("offered load (requests/s, Poisson)")
        ax.set_ylabel("e2e latency from scheduled arrival (ms)")
        ax.set_title(f"{name} ({load.get('backend')})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"sandpool {doc['name']}: latency vs offered load (print(1) unless named); "
                 "red = saturated step", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write(doc: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """Write <name>.json, <name>.md and <name>.png (when possible); their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / doc["name"]
    paths = {"json": str(base.with_suffix(".json")), "markdown": str(base.with_suffix(".md"))}
    try:
        note = plot(doc, base.with_suffix(".png"))
    except Exception as e:  # a failed plot must not lose the measurements
        note = f"plot failed: {type(e).__name__}: {e}"
    if note is None:
        paths["png"] = str(base.with_suffix(".png"))
    doc["plot"] = {"path": paths.get("png"), "note": note}
    doc["files"] = paths
    Path(paths["markdown"]).write_text(markdown(doc))
    Path(paths["json"]).write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    return paths
