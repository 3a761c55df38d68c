"""sandpool's benchmark harness: ``python -m bench`` or ``make bench``.

Runs sandpool beside the alternatives on the same machine, in the same run, and
writes ``bench/results/<date>.json``, ``.md`` and ``.png``. See README, "Benchmarks".
"""
