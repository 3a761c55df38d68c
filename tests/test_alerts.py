"""The Prometheus alert rules query only metrics sandpool exports, the way Prometheus names them.

A renamed metric makes an alert silently never fire. These tests read
``metrics/alerts.yml`` and compare every ``sandpool_*`` series it queries with a
fresh ``Metrics`` registry, as tests/test_grafana.py does for the dashboard.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import unexported_series

RULES = Path(__file__).resolve().parent.parent / "metrics" / "alerts.yml"
METRIC_NAME = re.compile(r"\bsandpool_[A-Za-z0-9_]+")
DURATION = re.compile(r"\d+[smhd]")


def load_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def unknown_series(rules: list[dict[str, Any]]) -> list[str]:
    return unexported_series(m for rule in rules for m in METRIC_NAME.findall(rule["expr"]))


def test_every_queried_metric_is_exported() -> None:
    assert unknown_series(load_rules()) == []


@pytest.mark.parametrize(
    ("real", "mistake"),
    [
        ("sandpool_backend_up", "sandpool_backend_up_total"),  # a gauge has no _total
        ("sandpool_oom_kills_total", "sandpool_oom_kills"),  # counter without _total
        ("sandpool_acquire_wait_seconds_bucket", "sandpool_acquire_wait_seconds"),
    ],
)
def test_a_misspelled_metric_is_reported(real: str, mistake: str) -> None:
    rules = load_rules()
    replaced = 0
    for rule in rules:
        if real in rule["expr"]:
            rule["expr"] = re.sub(rf"\b{real}\b", mistake, rule["expr"])
            replaced += 1
    assert replaced, f"no rule queries {real}; pick another example"
    assert mistake in unknown_series(rules)


def test_the_promised_alerts_are_there() -> None:
    queried = {rule["alert"]: set(METRIC_NAME.findall(rule["expr"])) for rule in load_rules()}
    assert "sandpool_backend_up" in queried["SandpoolBackendDown"]
    assert "sandpool_oom_kills_total" in queried["SandpoolOomKillRateHigh"]
    assert "sandpool_queue_waiters" in queried["SandpoolQueueSaturated"]
    assert "sandpool_acquire_wait_seconds_bucket" in queried["SandpoolAcquireWaitP99OverTarget"]
    assert "sandpool_request_duration_seconds_bucket" in queried["SandpoolRequestP99OverTarget"]


def test_every_rule_is_complete() -> None:
    rules = load_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert DURATION.fullmatch(rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


def test_counters_are_only_queried_as_rates_and_quantiles_keep_le() -> None:
    for expr in (rule["expr"] for rule in load_rules()):
        for match in re.finditer(r"\bsandpool_\w+_total\b", expr):
            assert re.search(r"\b(rate|irate|increase)\($", expr[: match.start()].rstrip()), expr
        if "histogram_quantile" in expr:
            grouping = re.search(r"\bby\s*\(([^)]*)\)", expr)
            assert grouping, expr
            assert "le" in {label.strip() for label in grouping.group(1).split(",")}, expr
