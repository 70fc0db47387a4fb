"""Shared state behind one Store interface: SQLite by default, PostgreSQL later."""

from sidecar.state.store import (
    ApprovalEvent,
    ApprovalTransaction,
    DecisionBatch,
    DecisionScope,
    IssuedToken,
    NewApproval,
    StateTransaction,
    Store,
    StoredApproval,
)

__all__ = [
    "ApprovalEvent",
    "ApprovalTransaction",
    "DecisionBatch",
    "DecisionScope",
    "IssuedToken",
    "NewApproval",
    "StateTransaction",
    "Store",
    "StoredApproval",
]
