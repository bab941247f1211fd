"""Benchmarks: python -m qshield_dist.bench [quantum|models|draws|dispatch|summary|all] (JSON lines)."""
