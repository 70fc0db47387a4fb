"""The pure decision engine: ``evaluate(policy, call, token) -> Decision``. No I/O, no clock."""

from sidecar.engine.decision import (
    ApprovalRequirement,
    Decision,
    Outcome,
    Reason,
    ReasonCode,
    ToolCall,
)
from sidecar.engine.evaluate import evaluate

__all__ = [
    "ApprovalRequirement",
    "Decision",
    "Outcome",
    "Reason",
    "ReasonCode",
    "ToolCall",
    "evaluate",
]
