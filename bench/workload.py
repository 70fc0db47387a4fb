"""The one call every figure measures, shared by the server, the load clients and the engine bench.

``requestRefund`` for 49.00 USD is allowed by the ``auto`` tier, so every Check runs the whole
path, including the durable (fsynced) audit write, and every answer must be DECISION_ALLOW.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

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
H2LOAD_RUN_ID = "run_bench_h2load"
CALLS_PER_RUN = 10
"""Each run of the Python clients makes this many refunds, so every call reads and updates a
run's budget the way a real agent run does."""

UNLIMITED = 1_000_000_000
"""The bench bundle's run budgets: counted and checked on every call, never reached."""


def bench_bundle(destination: Path, source: Path = EXAMPLE_POLICIES) -> Path:
    """Copy the example bundle, changed only so that a repeated request body stays a full Check.

    h2load sends the same bytes on every call, so two things of the example bundle would turn
    the measurement into something else: ``requestRefund`` writes (an idempotency key is
    required, and a repeated key *replays* the stored decision, a cheaper path), and the run
    budgets (20 refunds a run) would deny after the 20th call. So here ``requestRefund`` has
    ``writes: false`` and the budgets are ``UNLIMITED``: the schema, both rules, the four tiers,
    the kill switches, the budget counters (read and incremented in the state transaction on
    every call), the audit record and its fsync are all still there. The policy tests
    (``*_test.yaml``) are left out: they describe the original limits.
    """
    if destination.exists():
        shutil.rmtree(destination)
    destination.mkdir(parents=True)
    for path in sorted(source.glob("*.yaml")):
        if not path.name.endswith("_test.yaml"):
            shutil.copyfile(path, destination / path.name)
    billing = _load(destination / "billing.yaml")
    billing["tools"][TOOL]["writes"] = False
    _dump(destination / "billing.yaml", billing)
    common = _load(destination / "common.yaml")
    budget = common["controls"]["run_budget"]
    budget["max_calls"] = UNLIMITED
    budget["max_cost"] = UNLIMITED
    budget["max_calls_per_tool"] = dict.fromkeys(budget.get("max_calls_per_tool", {}), UNLIMITED)
    _dump(destination / "common.yaml", common)
    return destination


def _load(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return loaded


def _dump(path: Path, document: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")


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


def h2load_request(token: str) -> bytes:
    """The request h2load repeats: the same call, one run, no idempotency key (see bench_bundle)."""
    return base_request(token) + authz_pb.CheckRequest(run_id=H2LOAD_RUN_ID).SerializeToString()


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: not compressed (0), 4-byte big-endian length, bytes."""
    return b"\x00" + struct.pack(">I", len(message)) + message
