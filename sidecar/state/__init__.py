"""Shared state behind one Store interface: SQLite by default, PostgreSQL later."""

from sidecar.state.store import DecisionScope, StateTransaction, Store

__all__ = ["DecisionScope", "StateTransaction", "Store"]
