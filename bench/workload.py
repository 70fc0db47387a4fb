"""The one call every figure measures, shared by the server, the load clients and the engine bench.

``requestRefund`` for 49.00 USD is allowed by the ``auto`` tier, so every Check runs the whole
path, including the durable (fsynced) audit write, and every answer must be DECISION_ALLOW.
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

from sidecar._proto.proviso.v1 import authorization_service_pb2 as authz_pb
from tokens import Grant

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_POLICIES = ROOT / "policies"

CHECK_METHOD = "/proviso.v1.AuthorizationService/Check"
NOOP_SERVICE = "proviso.bench.v1.BenchService"
NOOP_METHOD = f"/{NOOP_SERVICE}/Noop"

AGENT = "billing-resolution-agent@service"
TOOL = "requestRefund"
GRANT = Grant(TOOL, MappingProxyType({"invoice_id": "in_93K2"}))
ARGUMENTS_JSON = (
    '{"invoice_id": "in_93K2", "amount": 49.00, "currency": "USD", "reason": "duplicate charge"}'
)
CONTEXT_JSON = '{"invoice": {"amount_due": 120.00, "currency": "USD"}}'
RUN_ID = "run_bench"
CALLS_PER_RUN = 10
"""Each run makes this many refunds: under the example policy's per-run caps, so every call
reads and updates a run's budget the way a real agent run does."""


def base_request(token: str) -> bytes:
    """The Check request without its idempotency key and run, serialized once per client."""
    return authz_pb.CheckRequest(
        token=token, tool=TOOL, arguments_json=ARGUMENTS_JSON, context_json=CONTEXT_JSON
    ).SerializeToString()


def request_bytes(base: bytes, key: str, sequence: int) -> bytes:
    """``base`` with a unique idempotency key and its run, as a real agent sends them.

    Protobuf merges concatenated messages, so appending serialized fields is the same as
    setting them: no per-call re-serialization of the token and arguments.
    """
    run_id = f"{RUN_ID}-{key.rsplit('-', 1)[0]}-{sequence // CALLS_PER_RUN}"
    extra = authz_pb.CheckRequest(idempotency_key=key, run_id=run_id)
    return base + extra.SerializeToString()
