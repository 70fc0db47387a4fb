"""The pure decision engine: ``evaluate(policy, call, token) -> Decision``. No I/O, no clock."""

from sidecar.engine.decision import (
    ApprovalRequirement,
    Decision,
    Outcome,
    Reason,
    ReasonCode,
    ToolCall,
)
from sidecar.engine.evaluate import decide, evaluate
from sidecar.engine.state import (
    NO_STATE,
    ApprovalRecord,
    ApprovalStatus,
    Evaluation,
    RateBucket,
    Revocation,
    RunUsage,
    StateChanges,
    StateView,
    StoredDecision,
    Verdict,
    ttl_run_out,
)

__all__ = [
    "NO_STATE",
    "ApprovalRecord",
    "ApprovalRequirement",
    "ApprovalStatus",
    "Decision",
    "Evaluation",
    "Outcome",
    "RateBucket",
    "Reason",
    "ReasonCode",
    "Revocation",
    "RunUsage",
    "StateChanges",
    "StateView",
    "StoredDecision",
    "ToolCall",
    "Verdict",
    "decide",
    "evaluate",
    "ttl_run_out",
]
