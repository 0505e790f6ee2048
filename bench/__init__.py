"""Benchmarks: `make bench` (performance ratios), `make bench-quality` (SDR), `make bench-api` (latency)."""
