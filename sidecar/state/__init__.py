"""Shared state behind one Store interface: SQLite by default, PostgreSQL later."""

from sidecar.state.store import DecisionScope, IssuedToken, StateTransaction, Store

__all__ = ["DecisionScope", "IssuedToken", "StateTransaction", "Store"]
