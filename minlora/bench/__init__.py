"""Benchmark drivers behind `minlora bench` and the scripts in bench/."""
