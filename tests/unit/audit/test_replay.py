"""Replay of recorded token refusals: every TokenError the sidecar can record replays."""

from __future__ import annotations

import inspect
import json
from decimal import Decimal
from pathlib import Path

import pytest

import tokens.errors
from sidecar import strictjson
from sidecar.audit import replay
from sidecar.audit.files import log_files, records
from sidecar.audit.record import AuditRecord
from sidecar.audit.writer import AuditLog
from sidecar.engine import ToolCall, evaluate
from sidecar.policy.model import Policy
from tokens import SigningKey, TokenError, TokenMalformedError

KEY = SigningKey.generate(kid="replay-test")

TOKEN_ERRORS = sorted(
    (
        kind
        for kind in vars(tokens.errors).values()
        if isinstance(kind, type) and issubclass(kind, TokenError) and kind is not TokenError
    ),
    key=lambda kind: kind.__name__,
)
"""Every refusal the tokens library defines."""

EXTRA = {"expired_at": 1795580460, "not_before": 1795580460, "token_id": "t-1", "tool": "x"}
"""Values for the keyword-only arguments some errors require (a new one fails here first)."""

ARGUMENTS = {"invoice_id": "in_93K2", "amount": Decimal(10), "currency": "USD", "reason": "dup"}
CONTEXT = {"invoice": {"amount_due": 100000, "currency": "USD"}}


def raised(kind: type[TokenError]) -> TokenError:
    """``kind`` as the verifier raises it, with every required argument."""
    required = [
        name
        for name, p in inspect.signature(kind).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty
    ]
    return kind(f"refused: {kind.__name__}", **{name: EXTRA[name] for name in required})


async def write_refusal(path: Path, policy: Policy, error: TokenError) -> None:
    """One Check refused for ``error``, recorded by the real writer as the authorizer does."""
    call = ToolCall(
        tool="requestRefund",
        arguments=ARGUMENTS,
        context=CONTEXT,
        run_id="run-1",
        idempotency_key="k-1",
        args_digest=strictjson.digest(ARGUMENTS),
    )
    record = AuditRecord(
        record_id="dec_1",
        time="2026-11-25T10:00:00.000Z",
        decision=evaluate(policy, call, error),
        call=call,
        args_digest=call.args_digest,
        arguments=ARGUMENTS,
        latency_ms=0.5,
        token=None,
    )
    log = AuditLog(path, signer=KEY)
    try:
        await log.append(record.to_body())
    finally:
        log.close()


def test_every_token_error_is_known_to_replay() -> None:
    """Replay finds each refusal by its code."""
    assert len(TOKEN_ERRORS) >= 10
    assert {kind.code for kind in TOKEN_ERRORS} <= set(replay._TOKEN_ERRORS)


@pytest.mark.parametrize("kind", TOKEN_ERRORS, ids=lambda kind: kind.__name__)
async def test_a_recorded_token_refusal_replays(
    kind: type[TokenError], tmp_path: Path, example_policy: Policy
) -> None:
    """A Check refused for any token error replays (as the same DENY), never crashes; a
    revocation is state, so it is counted as not replayable."""
    path = tmp_path / "decisions.jsonl"
    await write_refusal(path, example_policy, raised(kind))
    (recorded,) = [r for r in records(log_files(path)) if r["kind"] == "decision"]
    assert recorded["token"] is None
    assert recorded["reasons"][0]["code"] == kind.code

    report = replay.replay([recorded], example_policy)

    assert report.records == 1
    if kind.code == "TOKEN_REVOKED":
        assert report.replayed == 0
        assert list(report.unreplayable) == [
            "decided by state (budgets, rate limits, kill switches, idempotency, approvals)"
        ]
        return
    assert report.replayed == 1
    assert report.transitions == {("DENY", "DENY"): 1}
    decision = replay.replay_record(recorded, example_policy)
    assert not isinstance(decision, str)
    assert decision.primary_code is not None
    assert decision.primary_code.value == kind.code
    assert decision.reasons[0].message == f"refused: {kind.__name__}"
    assert json.dumps(replay.to_json(report))


def test_an_error_that_cannot_be_rebuilt_still_carries_its_code(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An error whose constructor wants more than a record keeps is built without it."""

    class OddError(TokenMalformedError):  # not under TokenError itself: its tests list those
        code = "TOKEN_ODD"

        def __init__(self, message: str, *, detail: dict[str, int]) -> None:
            super().__init__(message)
            self.detail = detail

    monkeypatch.setitem(replay._TOKEN_ERRORS, "TOKEN_ODD", OddError)
    error = replay.recorded_token_error("TOKEN_ODD", "odd")
    assert isinstance(error, OddError)
    assert (error.code, error.message, str(error)) == ("TOKEN_ODD", "odd", "odd")
    assert replay.recorded_token_error("NOT_A_TOKEN_CODE", "x") is None
