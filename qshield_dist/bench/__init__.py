"""Benchmarks: python -m qshield_dist.bench [quantum|models|dispatch|summary|all] (JSON lines)."""
