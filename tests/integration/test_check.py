"""Check over real gRPC on loopback, against the example policy."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from types import MappingProxyType

import grpc
import jwt
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from sidecar._proto.proviso.v1 import authorization_service_pb2 as pb
from tests.conftest import BILLING_AGENT, TRIAGE_AGENT, Sidecar
from tokens import Grant, SigningKey, issue

REFUND_PIN = Grant("requestRefund", MappingProxyType({"invoice_id": "in_93K2"}))


def refund(amount: str, *, invoice: str = "in_93K2", **extra: object) -> str:
    """Refund arguments as JSON text, with the amount written exactly as given."""
    fields = {"invoice_id": invoice, "currency": "USD", "reason": "duplicate charge", **extra}
    body = json.dumps(fields)[1:-1]
    return "{" + f'"amount": {amount}, ' + body + "}"


INVOICE_CONTEXT = '{"invoice": {"amount_due": 100000, "currency": "USD"}}'
"""What the agent runtime vouches for about the invoice; the refund rules read it."""


async def check(
    sidecar: Sidecar,
    token: str,
    tool: str,
    arguments: str,
    *,
    context: str = INVOICE_CONTEXT,
    key: str | None = None,
    run_id: str = "run-1",
    dry_run: bool = False,
) -> pb.CheckResponse:
    """One Check; a fresh idempotency key unless one is given."""
    return await sidecar.authz.Check(
        pb.CheckRequest(
            token=token,
            tool=tool,
            arguments_json=arguments,
            context_json=context,
            run_id=run_id,
            idempotency_key=key if key is not None else f"key-{uuid.uuid4().hex}",
            dry_run=dry_run,
        )
    )


def codes(response: pb.CheckResponse) -> list[str]:
    return [pb.ReasonCode.Name(r.code).removeprefix("REASON_CODE_") for r in response.reasons]


async def test_small_refund_is_allowed(sidecar: Sidecar) -> None:
    """A 49.00 refund on the pinned invoice is allowed by the auto tier and recorded."""
    response = await check(sidecar, sidecar.token(), "requestRefund", refund("49.00"))
    assert response.decision == pb.DECISION_ALLOW
    assert response.matched_tier == "auto"
    assert codes(response) == ["TIER_ALLOWED"]
    assert response.decision_id.startswith("dec_")
    assert response.policy_version == sidecar.app.policy.current.version


async def test_supervisor_tier_needs_one_approval(sidecar: Sidecar) -> None:
    """A 120 refund needs one approval from a billing supervisor."""
    response = await check(sidecar, sidecar.token(), "requestRefund", refund("120"))
    assert response.decision == pb.DECISION_NEEDS_APPROVAL
    assert response.matched_tier == "supervisor"
    requirement = response.approval_requirement
    assert (requirement.tier, requirement.approvals_required) == ("supervisor", 1)
    assert list(requirement.approver_roles) == ["billing-supervisor"]
    assert requirement.ttl.seconds == 24 * 3600
    assert codes(response) == ["APPROVAL_REQUIRED"]


async def test_finance_tier_needs_two_approvals(sidecar: Sidecar) -> None:
    """A 900 refund needs two approvals from finance approvers."""
    response = await check(sidecar, sidecar.token(), "requestRefund", refund("900"))
    assert response.decision == pb.DECISION_NEEDS_APPROVAL
    assert response.approval_requirement.approvals_required == 2
    assert list(response.approval_requirement.approver_roles) == ["finance-approver"]


async def test_huge_refund_is_denied(sidecar: Sidecar) -> None:
    """A 9000 refund is over every approval tier and denied."""
    response = await check(sidecar, sidecar.token(), "requestRefund", refund("9000"))
    assert response.decision == pb.DECISION_DENY
    assert response.matched_tier == "over-limit"
    assert codes(response) == ["TIER_DENIED"]


@pytest.mark.parametrize(
    ("amount", "decision", "tier"),
    [
        ("50.00", pb.DECISION_ALLOW, "auto"),
        ("50.01", pb.DECISION_NEEDS_APPROVAL, "supervisor"),
        ("500", pb.DECISION_NEEDS_APPROVAL, "supervisor"),
        ("500.01", pb.DECISION_NEEDS_APPROVAL, "finance"),
        ("5000", pb.DECISION_NEEDS_APPROVAL, "finance"),
        ("5000.01", pb.DECISION_DENY, "over-limit"),
    ],
)
async def test_tier_boundaries(sidecar: Sidecar, amount: str, decision: int, tier: str) -> None:
    """Each tier boundary falls on the documented side, with decimals compared exactly."""
    response = await check(sidecar, sidecar.token(), "requestRefund", refund(amount))
    assert (response.decision, response.matched_tier) == (decision, tier)


async def test_refund_for_another_invoice_is_out_of_scope(sidecar: Sidecar) -> None:
    """A token pinned to one invoice cannot refund another."""
    response = await check(
        sidecar, sidecar.token(), "requestRefund", refund("10", invoice="in_OTHER1")
    )
    assert response.decision == pb.DECISION_DENY
    assert codes(response) == ["OUT_OF_SCOPE"]
    assert response.reasons[0].field == "/invoice_id"


async def test_missing_reason_is_invalid_with_pointer(sidecar: Sidecar) -> None:
    """Arguments without the required reason are denied, naming /reason."""
    arguments = '{"invoice_id": "in_93K2", "amount": 10, "currency": "USD"}'
    response = await check(sidecar, sidecar.token(), "requestRefund", arguments)
    assert response.decision == pb.DECISION_DENY
    assert codes(response) == ["INVALID_ARGUMENTS"]
    assert [r.field for r in response.reasons] == ["/reason"]


async def test_extra_field_is_invalid_with_pointer(sidecar: Sidecar) -> None:
    """An argument the schema does not declare is denied, naming it."""
    response = await check(sidecar, sidecar.token(), "requestRefund", refund("10", note="sneaky"))
    assert codes(response) == ["INVALID_ARGUMENTS"]
    assert [r.field for r in response.reasons] == ["/note"]


async def test_amount_with_three_decimals_is_invalid(sidecar: Sidecar) -> None:
    """Amounts carry at most two decimals, checked exactly (no float rounding)."""
    response = await check(sidecar, sidecar.token(), "requestRefund", refund("10.005"))
    assert codes(response) == ["INVALID_ARGUMENTS"]
    assert response.reasons[0].field == "/amount"
    allowed = await check(sidecar, sidecar.token(), "requestRefund", refund("4.35"))
    assert allowed.decision == pb.DECISION_ALLOW


async def test_triage_agent_cannot_refund_even_with_a_forged_grant(sidecar: Sidecar) -> None:
    """A token granting requestRefund to the triage agent is still denied by its roles."""
    token = sidecar.token(agent=TRIAGE_AGENT)
    response = await check(sidecar, token, "requestRefund", refund("10"))
    assert response.decision == pb.DECISION_DENY
    assert codes(response) == ["NOT_PERMITTED"]


async def test_triage_agent_without_grant_is_out_of_scope(sidecar: Sidecar) -> None:
    """The triage agent's own token does not grant requestRefund."""
    token = sidecar.token(
        agent=TRIAGE_AGENT, grants=(Grant("tagTicket", MappingProxyType({"ticket_id": "T-1"})),)
    )
    response = await check(sidecar, token, "requestRefund", refund("10"))
    assert codes(response) == ["OUT_OF_SCOPE"]


async def test_unknown_tool_is_denied(sidecar: Sidecar) -> None:
    """A granted tool the policy does not define is denied, not allowed by default."""
    token = sidecar.token(grants=(Grant("deleteEverything", MappingProxyType({})),))
    response = await check(sidecar, token, "deleteEverything", "{}")
    assert codes(response) == ["UNKNOWN_TOOL"]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forged(sidecar: Sidecar, header: dict[str, object], signature: bytes = b"") -> str:
    now = int(time.time())
    claims = {
        "iss": "proviso", "sub": BILLING_AGENT, "aud": "proviso", "iat": now, "nbf": now,
        "exp": now + 600, "jti": "forged", "grants": [REFUND_PIN.to_claim()],
    }  # fmt: skip
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{_b64(signature)}"


def _hs256_with_public_key(sidecar: Sidecar) -> str:
    jwk = sidecar.app.keys.active.public_jwk()
    now = int(time.time())
    claims = {
        "iss": "proviso", "sub": BILLING_AGENT, "aud": "proviso", "iat": now, "nbf": now,
        "exp": now + 600, "jti": "hs", "grants": [REFUND_PIN.to_claim()],
    }  # fmt: skip
    secret = base64.urlsafe_b64decode(jwk["x"] + "==")
    return jwt.encode(
        claims, secret, algorithm="HS256", headers={"kid": jwk["kid"], "typ": "proviso-cap+jwt"}
    )


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("expired", "TOKEN_EXPIRED"),
        ("not_yet_valid", "TOKEN_NOT_YET_VALID"),
        ("tampered", "TOKEN_BAD_SIGNATURE"),
        ("wrong_audience", "TOKEN_WRONG_AUDIENCE"),
        ("alg_none", "TOKEN_WRONG_ALGORITHM"),
        ("hs256", "TOKEN_WRONG_ALGORITHM"),
        ("unknown_key", "TOKEN_UNKNOWN_KEY"),
        ("garbage", "TOKEN_MALFORMED"),
        ("missing", "TOKEN_MISSING"),
    ],
)
async def test_bad_tokens_are_denied_with_their_reason(
    sidecar: Sidecar, name: str, expected: str
) -> None:
    """Every way a token can be bad yields DENY with the matching token reason."""
    now = time.time()
    kid = sidecar.app.keys.active.kid
    good = sidecar.token()
    header, payload, signature = good.split(".")
    flipped = payload[:-2] + ("A" if payload[-2] != "A" else "B") + payload[-1]
    tokens: dict[str, Callable[[], str]] = {
        "expired": lambda: sidecar.token(now=now - 3600, ttl=60),
        "not_yet_valid": lambda: sidecar.token(now=now + 3600),
        "tampered": lambda: f"{header}.{flipped}.{signature}",
        "wrong_audience": lambda: sidecar.token(audience="another-sidecar"),
        "alg_none": lambda: _forged(sidecar, {"alg": "none", "typ": "proviso-cap+jwt", "kid": kid}),
        "hs256": lambda: _hs256_with_public_key(sidecar),
        "unknown_key": lambda: issue(
            SigningKey.generate(), issuer="proviso", subject=BILLING_AGENT, audience="proviso",
            grants=[REFUND_PIN], ttl_seconds=600, now=int(now),
        ),
        "garbage": lambda: "not.a.token",
        "missing": lambda: "",
    }  # fmt: skip
    response = await check(sidecar, tokens[name](), "requestRefund", refund("10"))
    assert response.decision == pb.DECISION_DENY
    assert codes(response) == [expected]


def _bad_request_field(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    return str(bad_request.field_violations[0].field)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("arguments_json", "[1, 2]"),
        ("arguments_json", "not json"),
        ("arguments_json", '{"amount": 1, "amount": 2}'),
        ("arguments_json", '{"amount": NaN}'),
        ("arguments_json", '{"a": "\\ud800"}'),
        ("arguments_json", '{"a":' * 100 + "1" + "}" * 100),
        ("arguments_json", '{"a": "' + "x" * 70_000 + '"}'),
        ("arguments_json", '{"amount": 1e99999999999999999999}'),  # beyond Decimal's exponents
        ("context_json", "42"),
        ("context_json", '{"invoice": {"amount_due": -1e-99999999999999999999}}'),
        ("tool", "requestRefünd"),
        ("tool", ""),
        ("run_id", "run with spaces"),
    ],
)
async def test_malformed_requests_are_invalid_argument(
    sidecar: Sidecar, field: str, value: str
) -> None:
    """A malformed request is INVALID_ARGUMENT naming the field, never a decision."""
    request = pb.CheckRequest(token=sidecar.token(), tool="requestRefund", arguments_json="{}")
    setattr(request, field, value)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await sidecar.authz.Check(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _bad_request_field(caught.value) == field
    assert field in (caught.value.details() or "")


async def test_a_malformed_check_among_others_in_flight_fails_alone(sidecar: Sidecar) -> None:
    """Checks in flight together are parsed and decided in one batch: a malformed one among
    them is INVALID_ARGUMENT, and the others are answered as if it were not there."""
    token = sidecar.token()
    for burst in range(3):  # the first teaches the sidecar how many Checks fly together
        malformed = pb.CheckRequest(token=token, tool="requestRefund", arguments_json="[1]")
        calls: list[Awaitable[pb.CheckResponse]] = [
            check(sidecar, token, "requestRefund", refund("10"), run_id=f"run-{burst}-{i}")
            for i in range(7)  # a run each: the run budget allows only so many refunds
        ]
        calls.insert(3, sidecar.authz.Check(malformed))
        results = await asyncio.gather(*calls, return_exceptions=True)
        failed = results.pop(3)
        assert isinstance(failed, grpc.aio.AioRpcError), f"burst {burst}"
        assert failed.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _bad_request_field(failed) == "arguments_json"
        assert all(isinstance(r, pb.CheckResponse) for r in results), results
        assert [r.decision for r in results if isinstance(r, pb.CheckResponse)] == [
            pb.DECISION_ALLOW
        ] * 7


async def test_undecodable_protobuf_is_invalid_argument(sidecar: Sidecar) -> None:
    """Bytes that are not a CheckRequest get INVALID_ARGUMENT, not INTERNAL."""
    raw: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = sidecar.channel.unary_unary(
        "/proviso.v1.AuthorizationService/Check"
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await raw(b"\x0a\xff\xff\xff\xff\x0f")  # field 1 with an absurd length
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_wrong_wire_type_is_invalid_argument(sidecar: Sidecar) -> None:
    """A known field sent with the wrong wire type is rejected as INVALID_ARGUMENT."""
    valid = pb.CheckRequest(
        token=sidecar.token(),
        tool="requestRefund",
        arguments_json=refund("10"),
        context_json=INVOICE_CONTEXT,
        idempotency_key="key-wire",
    ).SerializeToString()
    raw: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = sidecar.channel.unary_unary(
        "/proviso.v1.AuthorizationService/Check"
    )
    assert pb.CheckResponse.FromString(await raw(valid + b"\xa0\x06\x01")).decision == (
        pb.DECISION_ALLOW
    ), "an unknown field number from a newer client is tolerated"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await raw(valid + b"\x4a\x02\x00\x00")  # dry_run (field 9, a bool) sent as bytes
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _bad_request_field(caught.value) == "dry_run"
