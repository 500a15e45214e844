"""Benchmarks of nas-janitor on the real btrfs + Docker lab (see BENCHMARKS.md).

Run each from the repository root as ``python -m bench.b1_scan`` (and ``b2_reclaim``,
``b3_fleet``, ``b4_footprint``), or all of them with ``make bench``.
"""
