"""Benchmarks and soak runs (see bench/README.md)."""
