"""End-to-end latency of one pool through the daemon's Unix socket, at a fixed low rate.

    python -m bench.e2e --socket /run/sandpool/sandpool.sock --pool python -n 300 --rate 5

Requests are paced (open loop at --rate per second) so a single-use pool has
time to refill between them: this measures hand-out latency at low load, not
refill throughput.

Kept for the backend authors' quick checks against a daemon they started; the
benchmark itself (every path side by side, the load test, the result files) is
``python -m bench`` / ``make bench``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from api.client import Client
from bench.stats import percentile


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", default="/run/sandpool/sandpool.sock")
    parser.add_argument("--pool", default="python")
    parser.add_argument("-n", type=int, default=200)
    parser.add_argument("--rate", type=float, default=5.0)
    parser.add_argument("--code", default="print(1)")
    args = parser.parse_args()
    e2e, queued, executed = [], [], []
    with Client(args.socket) as client:
        client.run(args.code, pool=args.pool)  # connect and warm the path
        start = time.perf_counter()
        for i in range(args.n):
            time.sleep(max(0.0, start + i / args.rate - time.perf_counter()))
            began = time.perf_counter()
            result = client.run(args.code, pool=args.pool)
            e2e.append((time.perf_counter() - began) * 1000)
            queued.append(float(result["queued_ms"]))
            executed.append(float(result["duration_ms"]))
            assert result["exit_code"] == 0, result
    report = {
        "pool": args.pool, "n": args.n, "rate_per_s": args.rate,
        **{f"e2e_p{q}_ms": round(percentile(e2e, q), 3) for q in (50, 95, 99)},
        "e2e_mean_ms": round(statistics.fmean(e2e), 3),
        **{f"handout_p{q}_ms": round(percentile(queued, q), 3) for q in (50, 99)},
        **{f"execution_p{q}_ms": round(percentile(executed, q), 3) for q in (50, 99)},
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
