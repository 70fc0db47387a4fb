"""Thin gRPC adapters: proto in, domain call, proto out. Only convert.py translates."""
