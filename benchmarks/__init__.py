"""jbl's benchmark suite: realistic data, baselines in the same run, ratios, a report.

``python -m benchmarks [--quick] [--only NAME…]`` (or ``make bench [QUICK=1]``). Modules:
``series`` (the data), ``measure`` (repeat, stats, cold caches, disk, memory, Figure),
``native`` (baseline steps), ``jblcli`` (the jbl CLI as a subprocess), ``dedupsim`` (the
reference dedup simulation), ``context`` (what a benchmark gets), ``report`` (BENCHMARKS.md and
charts), and one ``bench_<name>.py`` per area exposing ``run(ctx) -> list[Figure]``.
Nothing under ``tests/`` imports this package.
"""
