"""Benchmarks: python -m qshield_dist.bench [quantum|models|draws|dispatch|summary|status|all] (JSON lines)."""
