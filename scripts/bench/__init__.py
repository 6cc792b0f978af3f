"""The upload benchmark (entry: scripts/benchmark.py); see docs/performance.md."""
