"""Benchmarks (importable as a package so tests can smoke-run them)."""
