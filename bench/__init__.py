"""Benchmarks and checks; run each as python3 -m bench.SCRIPT from the repository root."""
