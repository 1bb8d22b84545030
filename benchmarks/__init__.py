"""Speed and memory benchmarks: ``python -m benchmarks`` (see __main__.py)."""
