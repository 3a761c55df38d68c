"""The two programs every path runs: ``print(1)`` and a small realistic script.

The realistic script parses an embedded JSON document of 120 orders (about
13 KB), aggregates revenue per customer with the standard library, and prints
one JSON line. It is built deterministically, so every path runs the same bytes
and the expected output is known before any sandbox runs it.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    code: str
    expected_stdout: str


def _orders_document() -> str:
    rng = random.Random(8)  # a fixed seed: the same document in every run
    customers = [f"customer-{i:02d}" for i in range(24)]
    skus = [f"SKU-{i:04d}" for i in range(60)]
    orders = [
        {
            "id": i,
            "customer": rng.choice(customers),
            "sku": rng.choice(skus),
            "qty": rng.randint(1, 9),
            "unit_price": round(rng.uniform(0.5, 99.0), 2),
            "tags": rng.sample(["gift", "express", "bulk", "promo", "return"], k=2),
        }
        for i in range(120)
    ]
    return json.dumps({"currency": "EUR", "orders": orders}, separators=(",", ":"))


_REALISTIC_TEMPLATE = """\
import json
import statistics

doc = json.loads({document!r})
revenue = {{}}
for order in doc["orders"]:
    if "return" in order["tags"]:
        continue
    total = order["qty"] * order["unit_price"]
    revenue[order["customer"]] = revenue.get(order["customer"], 0.0) + total
ranked = sorted(revenue.items(), key=lambda item: (-item[1], item[0]))
print(json.dumps({{
    "customers": len(revenue),
    "top": ranked[0][0],
    "top_revenue": round(ranked[0][1], 2),
    "median": round(statistics.median(revenue.values()), 2),
    "currency": doc["currency"],
}}, sort_keys=True))
"""


def _expected(code: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<workload>", "exec"), {"__name__": "__main__"})
    return out.getvalue()


def build_workloads() -> tuple[Workload, ...]:
    """``print1`` and ``realistic``, each with the stdout it must produce."""
    realistic = _REALISTIC_TEMPLATE.format(document=_orders_document())
    return (
        Workload("print1", "print(1)", "1\n"),
        Workload("realistic", realistic, _expected(realistic)),
    )
