"""Command-line tools (benchmarks, accounting)."""
