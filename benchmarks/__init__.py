"""Reproducible benchmarks against named baselines; run with ``make bench``, never in tests."""
