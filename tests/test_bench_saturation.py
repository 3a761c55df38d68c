"""The load test's rules: a step is saturated only when its queue grows; a latency knee is not."""

from __future__ import annotations

from typing import Any

from bench.sandpool_paths import latency_knee, saturation


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
