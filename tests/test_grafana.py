"""The Grafana dashboard queries only metrics sandpool exports, the way Prometheus names them.

A renamed metric breaks a dashboard silently: the panel just shows "No data".
These tests read ``metrics/grafana-dashboard.json`` and compare every
``sandpool_*`` series it queries with a fresh ``Metrics`` registry.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import METRIC_NAMES, unexported_series

DASHBOARD = Path(__file__).resolve().parent.parent / "metrics" / "grafana-dashboard.json"
DATASOURCE_UID = "${DS_PROMETHEUS}"
METRIC_NAME = re.compile(r"\bsandpool_[A-Za-z0-9_]+")
# The metrics sandpool promises (tests/support.py keeps the one list),
# as metric families: a counter's family has no _total.
PROMISED_METRICS = tuple(name.removesuffix("_total") for name in METRIC_NAMES)


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every JSON object in the document, depth first (rows nest panels)."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression: panel targets and template-variable queries."""
    found = [t["expr"] for p in panels(dashboard) for t in p.get("targets", []) if "expr" in t]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        found.append(query["query"] if isinstance(query, dict) else str(query or ""))
        found.append(str(variable.get("definition", "")))
    return [q for q in found if q]


def unknown_series(dashboard: dict[str, Any]) -> list[str]:
    """The ``sandpool_*`` names the dashboard queries that sandpool never exports."""
    return unexported_series(m for q in queries(dashboard) for m in METRIC_NAME.findall(q))


def test_every_queried_metric_is_exported() -> None:
    dashboard = load_dashboard()
    assert queries(dashboard), "the dashboard has no queries at all"
    assert unknown_series(dashboard) == []


@pytest.mark.parametrize(
    ("real", "mistake"),
    [
        ("sandpool_request_duration_seconds_bucket", "sandpool_request_duration_second_bucket"),
        ("sandpool_oom_kills_total", "sandpool_oom_kills"),  # counter without _total
        ("sandpool_sandboxes", "sandpool_sandboxes_total"),  # a gauge has no _total
        ("sandpool_acquire_wait_seconds_bucket", "sandpool_acquire_wait_seconds"),  # bare histogram
        ("sandpool_queue_waiters", "sandpool_queue_waiter"),
    ],
)
def test_a_misspelled_metric_is_reported(real: str, mistake: str) -> None:
    dashboard = copy.deepcopy(load_dashboard())
    replaced = 0
    for target in walk(dashboard):
        if isinstance(target.get("expr"), str) and real in target["expr"]:
            target["expr"] = re.sub(rf"\b{real}\b", mistake, target["expr"])
            replaced += 1
    assert replaced, f"the dashboard does not query {real}; pick another example"
    assert mistake in unknown_series(dashboard)


def test_dashboard_covers_the_promised_metrics() -> None:
    queried = {m for q in queries(load_dashboard()) for m in METRIC_NAME.findall(q)}
    bases = {re.sub(r"_(bucket|sum|count|total)$", "", name) for name in queried}
    assert sorted(set(PROMISED_METRICS) - bases) == []


def test_dashboard_imports_with_a_prometheus_datasource_input() -> None:
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] == 39
    inputs = {i["name"]: i for i in dashboard["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource"
    assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(dashboard):
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        targets = panel.get("targets", [])
        if panel["type"] == "row":
            continue
        assert targets, f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["uid"] == DATASOURCE_UID, panel["title"]
        ref_ids = [t["refId"] for t in targets]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in targets:
            assert target["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] == DATASOURCE_UID, variable["name"]


def test_histogram_quantiles_keep_the_le_label() -> None:
    """Aggregating buckets without ``le`` makes histogram_quantile return nothing."""
    for expr in queries(load_dashboard()):
        if "histogram_quantile" not in expr:
            continue
        assert "_bucket" in expr, expr
        grouping = re.search(r"\bby\s*\(([^)]*)\)", expr)
        assert grouping, expr
        assert "le" in {label.strip() for label in grouping.group(1).split(",")}, expr


def test_counters_are_only_queried_as_rates() -> None:
    """A raw counter resets with every restart: graph rate() or increase() of it."""
    for expr in queries(load_dashboard()):
        for match in re.finditer(r"\bsandpool_\w+_total\b", expr):
            before = expr[: match.start()].rstrip()
            assert re.search(r"\b(rate|irate|increase)\($", before), expr


def test_expressions_have_balanced_brackets() -> None:
    pairs = {")": "(", "]": "[", "}": "{"}
    for expr in queries(load_dashboard()):
        stack: list[str] = []
        for char in re.sub(r'"[^"]*"', '""', expr):
            if char in "([{":
                stack.append(char)
            elif char in pairs:
                assert stack, expr
                assert stack.pop() == pairs[char], expr
        assert not stack, expr
