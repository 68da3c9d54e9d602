"""Benchmarks that drive whole processes and print JSON: gateway, soak, store, report."""
