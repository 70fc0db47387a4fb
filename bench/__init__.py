"""``make bench``: Check over real gRPC next to a no-op on the same server, plus the engine alone.

Not a test: nothing here asserts a budget. Run ``python -m bench.run``; see bench/README.md.
"""
