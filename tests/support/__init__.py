"""The one copy of each test helper (start a worker process, collect results, free ports)."""
