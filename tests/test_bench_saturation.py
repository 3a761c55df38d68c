"""The load test's rules: a step is saturated only when its queue grows; a latency knee is not;
the rates between the last that held and the first that did not are measured too; a run is
compared with the same pools of the run before it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.__main__ import _load_detail, reference_run
from bench.sandpool_paths import latency_knee, refining_rate, saturation


def step(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "arrivals": 100, "rejected": 0, "failed": 0, "arrived_per_s": 6.0,
        "achieved_ok_per_s": 6.0, "drain_s": 0.2, "e2e": {"n": 100, "p99_ms": 12.0},
    }
    return {**base, **overrides}


def test_a_pool_that_keeps_up_is_not_saturated_even_past_the_latency_knee() -> None:
    first = step()
    dry_now_and_then = step(e2e={"n": 100, "p99_ms": 480.0})
    assert saturation(dry_now_and_then) is None
    assert latency_knee(dry_now_and_then, first) == "p99 480.0 ms > 10x the first step's 12.0 ms"
    assert latency_knee(step(e2e={"n": 100, "p99_ms": 90.0}), first) is None  # under 100 ms


def test_a_growing_queue_is_saturated() -> None:
    assert saturation(step(achieved_ok_per_s=5.0)) == (
        "completed 5.0/s of 6.0/s arrived (< 90%)"
    )
    assert saturation(step(drain_s=2.5)) == "backlog: last answer 2.50 s after the last arrival"
    assert saturation(step(rejected=2)) == "2 rejected and 0 failed of 100"


def ladder(*rates: tuple[float, bool]) -> list[dict[str, Any]]:
    return [{"offered_per_s": rate, "saturated": "queue grows" if full else None}
            for rate, full in rates]


def test_refining_steps_halve_the_gap_between_held_and_saturated_rates() -> None:
    # 81.92/s held and 131.07/s did not: the capacity is anywhere in between.
    steps = ladder((51.2, False), (81.92, False), (131.07, True), (209.72, True))
    assert refining_rate(steps) == 103.62  # sqrt(81.92 x 131.07)
    steps += ladder((103.62, False))
    assert refining_rate(steps) == 116.54  # between what held last and 131.07
    steps += ladder((116.54, True))
    assert refining_rate(steps) == 109.89


def test_no_refining_step_without_a_gap_to_narrow() -> None:
    assert refining_rate(ladder((20.0, False), (32.0, False))) is None  # never saturated
    assert refining_rate(ladder((20.0, True), (32.0, True))) is None  # saturated from the start
    assert refining_rate(ladder((100.0, False), (108.0, True))) is None  # within 10 %


def test_the_reference_run_gives_each_tier_its_plain_pools_p50(tmp_path: Path) -> None:
    # The plain pool comes first in a run's latency section, as in targets();
    # a later pool of the same backend (the pinned wasm module's) is not the tier's.
    def pool(backend: str, p50: float) -> dict[str, Any]:
        return {"backend": backend, "print1": {"e2e": {"p50_ms": p50}}}

    latency = {"python-wasm": pool("wasm", 3.64), "python-wasm-cpython312": pool("wasm", 2.78),
               "python-fork": pool("fork", 2.64)}
    run = {"mode": "full", "name": "2026-12-01", "sandpool": {"latency": latency}}
    (tmp_path / "2026-12-01.json").write_text(json.dumps(run))
    reference = reference_run(tmp_path, "2026-12-02")
    assert reference is not None
    assert reference["print1_p50_ms"] == {"wasm": 3.64, "fork": 2.64}
    assert reference_run(tmp_path, "2026-12-01") is None  # never a run its own reference


def test_a_load_test_is_a_floor_only_when_no_step_saturated() -> None:
    held = {"offered_per_s": 104.86, "saturated": None}
    full = {"offered_per_s": 167.77, "saturated": "queue grows"}
    stopped_early = {"steps": [held, full], "stopped": "time budget", "peak_ok_per_s": 119.6}
    assert "a floor" not in _load_detail(stopped_early)
    never_full = {"steps": [held], "stopped": "time budget", "peak_ok_per_s": 102.0}
    assert _load_detail(never_full).endswith("stopped: time budget; a floor: no step saturated")
