"""Benchmarks of moelora: the latency comparison behind `make bench` and the pytest-benchmark suite."""
