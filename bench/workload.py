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
RUN_ID = "run_bench"


def base_request(token: str) -> bytes:
    """The Check request without its idempotency key, serialized once per client."""
    return authz_pb.CheckRequest(
        token=token, tool=TOOL, arguments_json=ARGUMENTS_JSON, run_id=RUN_ID
    ).SerializeToString()


def request_bytes(base: bytes, key: str) -> bytes:
    """``base`` with a unique idempotency key, as a real agent sends for a write tool.

    Protobuf merges concatenated messages, so appending one serialized field is the same as
    setting it: no per-call re-serialization of the token and arguments.
    """
    return base + authz_pb.CheckRequest(idempotency_key=key).SerializeToString()
