"""Benchmarks of kvstore's hot paths; each module runs with ``python -m benchmarks.<name>``."""
