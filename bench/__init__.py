"""Benchmark scripts run by ``make bench``; shared helpers live in common.py."""
