"""Real agent code in the data-science pools: a CSV in, pandas, a chart and a file out.

Runs against a real daemon on the datasci image (``make setup`` builds it),
with pandas and pyplot preloaded as the default datasci pool has them.
"""

from __future__ import annotations

import base64
import csv
import io
from collections.abc import Iterator

import pytest

from tests.support import Daemon, running_daemon

DATASCI_CONFIG = """
[server]
metrics_address = "off"

[pools.datasci]
image = "sandpool/datasci:bookworm"
min_idle = 1
max_size = 2
timeout_s = 30
memory_mb = 512
preload = ["numpy", "pandas", "matplotlib.pyplot"]

[pools.datasci-process]
backend = "process"
image = "sandpool/datasci:bookworm"
min_idle = 1
max_size = 2
timeout_s = 30
memory_mb = 512
preload = ["numpy", "pandas", "matplotlib.pyplot"]

[pools.datasci-fork]
backend = "fork"
image = "sandpool/datasci:bookworm"
min_idle = 1
max_size = 2
timeout_s = 30
memory_mb = 512
preload = ["numpy", "pandas", "matplotlib.pyplot"]
"""
POOLS = ["datasci", "datasci-process", "datasci-fork"]

ANALYSIS = """
import pandas as pd
import matplotlib.pyplot as plt
orders = pd.read_csv("orders.csv")
totals = orders.groupby("region")["amount"].sum().sort_values()
totals.to_csv("out/totals.csv")
totals.plot.bar(title="Sales by region")
plt.show()
plt.figure()
plt.plot(orders["amount"].values[:50])
totals.idxmax()
"""


def orders_csv(rows: int = 20_000) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["order", "region", "amount"])
    regions = ("north", "south", "east", "west")
    for index in range(rows):
        writer.writerow([index, regions[index % 4], (index * 37) % 1000 + (index % 4) * 100])
    return buffer.getvalue().encode()


@pytest.fixture(scope="module")
def datasci(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("datasci"), DATASCI_CONFIG) as running:
        yield running


def assert_png(data: str) -> None:
    png = base64.b64decode(data)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert 5_000 < len(png) < 1_000_000


@pytest.mark.parametrize("pool", POOLS)
def test_a_csv_analysis_returns_its_chart_its_file_and_its_value(
    datasci: Daemon, pool: str
) -> None:
    with datasci.client() as client:
        result = client.run(ANALYSIS, pool=pool, files={"orders.csv": orders_csv()})
    assert (result["exit_code"], result["error"]) == (0, None), result["stderr"]
    assert result["stderr"] == ""  # no font-cache or backend warnings
    types = [item["type"] for item in result["results"]]
    # The figure shown, the final value, then the figure left open.
    assert types == ["image/png", "text/plain", "image/png"]
    assert_png(result["results"][0]["data"])
    assert_png(result["results"][2]["data"])
    assert result["results"][1]["data"] == "'west'"
    (totals,) = result["files"]
    assert totals["path"] == "out/totals.csv"
    assert base64.b64decode(totals["content"]).decode().splitlines()[-1].startswith("west,")


@pytest.mark.parametrize("pool", POOLS)
def test_preloaded_modules_are_already_imported(datasci: Daemon, pool: str) -> None:
    with datasci.client() as client:
        result = client.run(
            "import sys\nsorted(m for m in ('numpy', 'pandas', 'matplotlib.pyplot')"
            " if m in sys.modules)", pool=pool)
    assert result["results"] == [{
        "type": "text/plain", "data": "['matplotlib.pyplot', 'numpy', 'pandas']",
        "truncated": False,
    }]
