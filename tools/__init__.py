"""Developer tools: random stand-in models for tests and benchmarks."""
