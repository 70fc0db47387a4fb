"""Audit: one durable JSON line per decision, written before the answer leaves."""
