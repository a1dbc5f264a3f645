"""The benchmarks behind `minlora bench` (minlora.bench.cli names them)."""
