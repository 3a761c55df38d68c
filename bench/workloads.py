"""The programs the paths run: ``print(1)``, a small realistic script, and a data analysis.

The realistic script parses an embedded JSON document of 120 orders (about
13 KB), aggregates revenue per customer with the standard library, and prints
one JSON line. The data analysis uploads a ~1 MB CSV of orders with the
request, reads it with pandas, sums revenue per region and shows one
matplotlib bar chart (a PNG in the response's ``results``). Each is built
deterministically, so every path runs the same bytes and the expected output
is known before any sandbox runs it.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import json
import random
from dataclasses import dataclass
from typing import Any

from sandpool_client.protocol import file_entry


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    code: str
    expected_stdout: str
    files: tuple[tuple[str, bytes], ...] = ()  # uploaded with the request
    result_types: tuple[str, ...] = ()  # the response's ``results``, in order

    def request_body(self, pool: str | None) -> dict[str, Any]:
        """The POST /v1/run body for ``pool``; without a pool (None), a session run's body."""
        body: dict[str, Any] = {"code": self.code}
        if pool is not None:
            body["pool"] = pool
        if self.files:  # as the SDK sends them: text where that is lossless
            body["files"] = [file_entry(path, content) for path, content in self.files]
        return body

    def check(self, document: dict[str, Any]) -> bool:
        """Whether a POST /v1/run answer is this workload's correct result (PNGs by signature)."""
        if document.get("exit_code") != 0 or document.get("stdout") != self.expected_stdout:
            return False
        results = document.get("results") or []
        if tuple(item.get("type") for item in results) != self.result_types:
            return False
        return all(base64.b64decode(item["data"]).startswith(PNG_SIGNATURE)
                   for item in results if item["type"] == "image/png")


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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


# About 1 MB: the size of a CSV an agent is typically handed to analyse.
DATASCI_ROWS = 28_000
DATASCI_CSV = "orders.csv"
DATASCI_REGIONS = ("north", "south", "east", "west", "centre")
DATASCI_CODE = """\
import pandas as pd
import matplotlib.pyplot as plt

orders = pd.read_csv("orders.csv")
orders["revenue"] = orders["qty"] * orders["unit_price"]
by_region = orders.groupby("region")["revenue"].sum().sort_values()
by_region.plot.bar(title="Revenue by region")
plt.show()
print(len(orders), by_region.idxmax())
"""


def _orders_csv() -> tuple[bytes, str]:
    """The CSV, and the stdout DATASCI_CODE prints for it (computed without pandas)."""
    rng = random.Random(14)  # a fixed seed: the same bytes in every run
    products = [f"P-{i:03d}" for i in range(40)]
    revenue = dict.fromkeys(DATASCI_REGIONS, 0.0)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["order", "day", "region", "product", "qty", "unit_price"])
    for index in range(DATASCI_ROWS):
        region, qty = rng.choice(DATASCI_REGIONS), rng.randint(1, 9)
        price = f"{rng.uniform(0.5, 99.0):.2f}"
        day = f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        writer.writerow([index, day, region, rng.choice(products), qty, price])
        revenue[region] += qty * float(price)
    ranked = sorted(revenue.values())
    # pandas sums in another order; a wide margin keeps the winner the same.
    assert ranked[-1] - ranked[-2] > 1.0, "regions too close to name a winner"
    return buffer.getvalue().encode(), f"{DATASCI_ROWS} {max(revenue, key=revenue.__getitem__)}\n"


def build_datasci_workload() -> Workload:
    """``datasci``: a ~1 MB CSV in, pandas groupby, one PNG out in ``results``."""
    data, expected = _orders_csv()
    return Workload("datasci", DATASCI_CODE, expected, files=((DATASCI_CSV, data),),
                    result_types=("image/png",))


# The data analysis in the three steps an agent takes it in, each a turn of its
# own (load the CSV, a groupby summary, a chart): (name, the step's own code,
# what it prints). Together they are DATASCI_CODE's work.
ANALYSIS_STEPS = (
    ("load", 'import pandas as pd\n\norders = pd.read_csv("orders.csv")\n',
     "print(len(orders))\n"),
    ("summary", 'orders["revenue"] = orders["qty"] * orders["unit_price"]\n'
     'by_region = orders.groupby("region")["revenue"].sum().sort_values()\n',
     "print(by_region.idxmax())\n"),
    ("chart", "import matplotlib.pyplot as plt\n\n"
     'by_region.plot.bar(title="Revenue by region")\nplt.show()\n', ""),
)


@dataclass(frozen=True, slots=True)
class Analysis:
    """The three-step data analysis, as single-use runs and as one session's runs."""

    steps: tuple[str, ...]
    # Each step in a fresh sandbox: the CSV sent again, the earlier steps' code run again.
    single_use: tuple[Workload, ...]
    # Each step in the session's interpreter: the CSV sent with the first only, the
    # DataFrame kept.
    session: tuple[Workload, ...]


def build_analysis(datasci: Workload) -> Analysis:
    """``datasci``'s CSV analysed in ANALYSIS_STEPS; the same stdout and results per step
    on both paths (the rows, the top region, one PNG)."""
    rows, region = datasci.expected_stdout.split()
    expected = (f"{rows}\n", f"{region}\n", "")
    single_use, session = [], []
    done = ""
    for index, (name, code, output) in enumerate(ANALYSIS_STEPS):
        result_types = ("image/png",) if name == "chart" else ()
        single_use.append(Workload(f"{name}-single-use", done + code + output,
                                   expected[index], datasci.files, result_types))
        session.append(Workload(f"{name}-session", code + output, expected[index],
                                datasci.files if index == 0 else (), result_types))
        done += code
    return Analysis(tuple(name for name, _, _ in ANALYSIS_STEPS), tuple(single_use),
                    tuple(session))
