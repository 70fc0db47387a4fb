"""Thin HTTP adapters on the metrics listener: /metrics, /.well-known/jwks.json, /healthz."""
