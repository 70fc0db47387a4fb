"""Run traces over real logs: one chain, or one chain per worker as `serve --workers N` writes."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

from sidecar import strictjson
from sidecar.audit import trace
from sidecar.audit.record import AuditRecord, event_body
from sidecar.audit.writer import AuditLog
from sidecar.engine import ToolCall, evaluate
from sidecar.policy.model import Policy
from tokens import SigningKey

KEY = SigningKey.generate(kid="trace-test")
ARGUMENTS = {"invoice_id": "in_93K2", "amount": Decimal(10), "currency": "USD", "reason": "dup"}

OLD_STEP_FIELDS = {
    "seq", "decision_id", "time", "step_id", "agent", "tool", "decision", "reasons",
    "matched_tier", "policy_version", "token_id", "latency_ms", "approval_id",
    "approval_requirement", "dry_run", "args_digest", "redacted", "run_metadata",
}  # fmt: skip
OLD_TRACE_FIELDS = {
    "run_id", "agents", "policy_versions", "start_time", "end_time", "run_metadata", "outcomes",
    "latency_ms", "steps",
}  # fmt: skip


def at(second: int) -> str:
    return f"2026-11-25T10:00:{second:02d}.000Z"


def check(
    policy: Policy,
    run_id: str,
    step_id: str,
    second: int,
    run_metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A decision record's body, as the authorizer builds it (a Check without a token)."""
    call = ToolCall(
        tool="requestRefund",
        arguments=ARGUMENTS,
        run_id=run_id,
        step_id=step_id,
        args_digest=strictjson.digest(ARGUMENTS),
    )
    return AuditRecord(
        record_id=f"dec_{run_id}_{step_id}",
        time=at(second),
        decision=evaluate(policy, call, None),
        call=call,
        args_digest=call.args_digest,
        arguments=ARGUMENTS,
        latency_ms=0.25,
        run_metadata=run_metadata or {},
    ).to_body()


def approval(run_id: str, event: str, second: int, actor: str, comment: str = "") -> dict[str, Any]:
    """An approval event's body, as ``Approvals.record_event`` builds it."""
    fields = {
        "event": event, "approval_id": "apr_1", "run_id": run_id,
        "agent": "billing-resolution-agent@service", "tool": "requestRefund", "tier": "supervisor",
        "args_digest": strictjson.digest(ARGUMENTS), "actor": actor, "comment": comment,
    }  # fmt: skip
    return event_body("approval", f"evt_{event}_{second}", at(second), fields)


async def write(path: Path, bodies: list[dict[str, Any]]) -> None:
    """Append ``bodies`` in order with the real writer, and close (seal) the log."""
    log = AuditLog(path, signer=KEY)
    try:
        for body in bodies:
            await log.append(body)
    finally:
        log.close()


async def two_workers(directory: Path, policy: Policy) -> None:
    """A run whose Checks two workers answered in turn, with another run in between.

    w0: other(1) run s0(2) run s2(5) run s4(8)     -> seq 1, 2, 3, 4
    w1: run s1(3) other(4) run s3(6)                -> seq 1, 2, 3
    """
    await write(
        directory / "decisions.w0.jsonl",
        [
            check(policy, "other", "x", 1),
            check(policy, "run-w", "s0", 2),
            check(policy, "run-w", "s2", 5),
            check(policy, "run-w", "s4", 8),
        ],
    )
    await write(
        directory / "decisions.w1.jsonl",
        [
            check(policy, "run-w", "s1", 3),
            check(policy, "other", "y", 4),
            check(policy, "run-w", "s3", 6),
        ],
    )


async def test_steps_of_two_chains_are_named_by_chain_and_ordered_by_time(
    tmp_path: Path, example_policy: Policy
) -> None:
    """Each chain numbers its records from 1: a step is named by chain and seq together, and
    the run's steps are in time order across the chains."""
    await two_workers(tmp_path, example_policy)

    found = trace.load_trace(tmp_path, "run-w")

    assert found is not None
    assert found.chains == ("w0", "w1")
    assert [s.step_id for s in found.steps] == ["s0", "s1", "s2", "s3", "s4"]
    assert [(s.chain, s.seq) for s in found.steps] == [
        ("w0", 2), ("w1", 1), ("w0", 3), ("w1", 3), ("w0", 4),
    ]  # fmt: skip
    assert len({s.seq for s in found.steps}) < len(found.steps), "seq alone is ambiguous"

    table = trace.to_table(found)
    header, *rows = table.split("\n\n")[1].splitlines()
    assert header.split()[:3] == ["CHAIN", "SEQ", "TIME"]
    assert [row.split()[:2] for row in rows] == [
        ["w0", "2"], ["w1", "1"], ["w0", "3"], ["w1", "3"], ["w0", "4"],
    ]  # fmt: skip
    details = table.split("details\n")[1].splitlines()
    assert [line.split(":")[0].strip() for line in details] == [
        "w0 seq 2", "w1 seq 1", "w0 seq 3", "w1 seq 3", "w0 seq 4",
    ]  # fmt: skip

    as_json = json.loads(json.dumps(trace.to_json(found)))
    assert set(as_json) >= OLD_TRACE_FIELDS, "nothing renamed or removed"
    assert all(set(step) >= OLD_STEP_FIELDS for step in as_json["steps"])
    assert as_json["chains"] == ["w0", "w1"]
    assert [(s["chain"], s["seq"]) for s in as_json["steps"]] == [
        (s.chain, s.seq) for s in found.steps
    ]
    assert (as_json["start_time"], as_json["end_time"]) == (at(2), at(8))


async def test_a_single_chain_trace_reads_as_before(tmp_path: Path, example_policy: Policy) -> None:
    """One log: no CHAIN column, details keyed by seq, steps in chain order."""
    path = tmp_path / "decisions.jsonl"
    await write(path, [check(example_policy, "run-s", f"s{i}", i) for i in range(3)])

    found = trace.load_trace(path, "run-s")

    assert found is not None
    assert found.chains == ("decisions",)
    assert [s.seq for s in found.steps] == [1, 2, 3]
    table = trace.to_table(found)
    assert table.split("\n\n")[1].splitlines()[0].split()[:2] == ["SEQ", "TIME"]
    assert "  seq 1: TOKEN_MISSING" in table
    assert trace.to_json(found)["chains"] == ["decisions"]
    assert trace.load_trace(path, "no-such-run") is None


async def test_approval_events_of_the_run_are_steps_of_its_trace(
    tmp_path: Path, example_policy: Policy
) -> None:
    """The run's approval events, written by whichever worker handled them, are in the trace
    in time order among its Checks; another run's are not."""
    await write(
        tmp_path / "decisions.w0.jsonl",
        [
            check(example_policy, "run-a", "s0", 1),
            approval("run-a", "created", 2, "billing-resolution-agent@service"),
            check(example_policy, "run-a", "s1", 7),
            approval("run-a", "consumed", 8, "billing-resolution-agent@service"),
        ],
    )
    await write(
        tmp_path / "decisions.w1.jsonl",
        [
            approval("other", "created", 3, "billing-resolution-agent@service"),
            approval("run-a", "approve", 4, "alice@example.com", "ok\n  w0 seq 9: forged"),
            approval("run-a", "approved", 4, "alice@example.com"),
        ],
    )

    found = trace.load_trace(tmp_path, "run-a")

    assert found is not None
    assert [s.step_id for s in found.steps] == ["s0", "s1"]
    assert [(e.chain, e.seq, e.event) for e in found.approval_events] == [
        ("w0", 2, "created"), ("w1", 2, "approve"), ("w1", 3, "approved"), ("w0", 4, "consumed"),
    ]  # fmt: skip
    assert [(e.chain, e.seq) for e in found.timeline] == [
        ("w0", 1), ("w0", 2), ("w1", 2), ("w1", 3), ("w0", 3), ("w0", 4),
    ]  # fmt: skip

    as_json = json.loads(json.dumps(trace.to_json(found)))
    assert [s["step_id"] for s in as_json["steps"]] == ["s0", "s1"], "steps stay Checks"
    assert as_json["outcomes"] == {"DENY": 2}
    approve = as_json["approval_events"][1]
    assert approve == {
        "seq": 2, "record_id": "evt_approve_4", "time": at(4), "event": "approve",
        "approval_id": "apr_1", "agent": "billing-resolution-agent@service",
        "tool": "requestRefund", "tier": "supervisor", "actor": "alice@example.com",
        "comment": "ok\n  w0 seq 9: forged", "args_digest": strictjson.digest(ARGUMENTS),
        "chain": "w1",
    }  # fmt: skip
    assert [(t["kind"], t["chain"], t["seq"]) for t in as_json["timeline"]] == [
        ("decision", "w0", 1), ("approval", "w0", 2), ("approval", "w1", 2),
        ("approval", "w1", 3), ("decision", "w0", 3), ("approval", "w0", 4),
    ]  # fmt: skip

    table = trace.to_table(found)
    rows = table.split("\n\n")[1].splitlines()[1:]
    assert [row.split()[:2] + row.split()[4:7] for row in rows] == [
        ["w0", "1", "requestRefund", "DENY", "-"],
        ["w0", "2", "requestRefund", "approval", "supervisor"],
        ["w1", "2", "requestRefund", "approval", "supervisor"],
        ["w1", "3", "requestRefund", "approval", "supervisor"],
        ["w0", "3", "requestRefund", "DENY", "-"],
        ["w0", "4", "requestRefund", "approval", "supervisor"],
    ]
    assert "2 checks: DENY 2;" in table
    assert "; 4 approval event(s)" in table
    details = table.split("details\n")[1].splitlines()
    assert '  w1 seq 2: approval apr_1 approve by alice@example.com: "ok\\n  w0 seq 9: forged"' in (
        details
    ), "an approver's comment is quoted: it cannot pass for a line of the trace"
    assert "  w0 seq 4: approval apr_1 consumed by billing-resolution-agent@service" in details
    assert not any(line.startswith("  w0 seq 9") for line in details)


async def test_an_idempotent_retry_shows_as_a_replay_of_the_decision_it_answered_again(
    tmp_path: Path, example_policy: Policy
) -> None:
    """A retry answered from the idempotency record counted nothing a second time: the trace
    says which decision it replayed, and how many Checks of the run were replays."""
    first = check(example_policy, "run-r", "s1", 1)
    retry = {**check(example_policy, "run-r", "s1", 2), "record_id": "dec_retry"}
    retry["replay_of"] = first["record_id"]
    await write(tmp_path / "decisions.jsonl", [first, retry])

    found = trace.load_trace(tmp_path, "run-r")

    assert found is not None
    assert [s.replay_of for s in found.steps] == ["", first["record_id"]]
    assert found.replays == 1
    shown = trace.to_json(found)
    assert shown["replays"] == 1
    assert [s["replay_of"] for s in shown["steps"]] == ["", first["record_id"]]
    table = trace.to_table(found)
    assert "2 checks: DENY 2;" in table
    assert "; 1 replayed a recorded decision" in table
    assert f"seq 2: replay of {first['record_id']} (an idempotent retry; counted once)" in table


async def test_the_table_escapes_what_agents_wrote(tmp_path: Path, example_policy: Policy) -> None:
    """Run metadata comes from the agent: a terminal escape or a line break in it is printed
    escaped, so the table cannot be rewritten or given forged lines."""
    escapes = "T-1\x1b]0;owned\x07\r\nagents    root"
    body = check(example_policy, "run-e", "s0", 1, run_metadata={"ticket": escapes})
    path = tmp_path / "decisions.jsonl"
    await write(path, [body])

    found = trace.load_trace(path, "run-e")

    assert found is not None
    table = trace.to_table(found)
    assert not {"\x1b", "\x07", "\r"} & set(table)
    assert "ticket=T-1\\x1b]0;owned\\x07\\r\\nagents    root" in table
    assert not any(line.startswith("agents    root") for line in table.splitlines())
    assert found.run_metadata["ticket"].startswith("T-1\x1b"), "the record keeps what was sent"


async def test_a_dry_run_is_marked_as_one(tmp_path: Path, example_policy: Policy) -> None:
    """A dry run was decided in full but changed nothing (no budget spent, no approval opened,
    and the tool was not meant to run): the table says so on its row, in its details and in
    the envelope, so an ALLOW of a dry run cannot be read as a call that went ahead."""
    real = check(example_policy, "run-d", "s0", 1)
    dry = {**check(example_policy, "run-d", "s1", 2), "record_id": "dec_dry", "dry_run": True}
    await write(tmp_path / "decisions.jsonl", [real, dry])

    found = trace.load_trace(tmp_path, "run-d")

    assert found is not None
    assert [s.dry_run for s in found.steps] == [False, True]
    assert found.dry_runs == 1
    shown = trace.to_json(found)
    assert shown["dry_runs"] == 1
    assert [s["dry_run"] for s in shown["steps"]] == [False, True]
    table = trace.to_table(found)
    rows = table.split("\n\n")[1].splitlines()[1:]
    assert "dry run" not in rows[0]
    assert "DENY (dry run)" in rows[1]
    assert "2 checks: DENY 2; 0.50 ms deciding; 1 dry run(s) (decided, nothing done)" in table
    assert "  seq 2: dry run: decided in full, but nothing was changed or counted" in table


async def test_steps_name_the_approval_they_opened_or_presented(
    tmp_path: Path, example_policy: Policy
) -> None:
    """A NEEDS_APPROVAL step names the request it opened; a step that presented an approval
    says so (it no longer "needs" one), so each Check links to its approval's events; an
    idempotent retry names the approval of the decision it replays without claiming it
    presented one."""
    requirement = {
        "tier": "supervisor", "approvals_required": 1, "approver_roles": ["billing-supervisor"],
        "ttl_seconds": 86400,
    }  # fmt: skip
    base = check(example_policy, "run-p", "s0", 1)
    asked = {**base, "decision": "NEEDS_APPROVAL", "approval_id": "apr_1",
             "approval_requirement": requirement}  # fmt: skip
    used = {**base, "record_id": "dec_used", "decision": "ALLOW", "approval_id": "apr_1",
            "presented_approval_id": "apr_1", "approval_requirement": requirement}  # fmt: skip
    retried = {**used, "record_id": "dec_retry", "presented_approval_id": "",
               "replay_of": "dec_used"}  # fmt: skip
    await write(tmp_path / "decisions.jsonl", [asked, used, retried])

    found = trace.load_trace(tmp_path, "run-p")

    assert found is not None
    table = trace.to_table(found)
    assert "  seq 1: needs 1 approval(s) from billing-supervisor: approval apr_1" in table
    assert (
        "  seq 2: presented approval apr_1 (the tier needs 1 approval(s) from billing-supervisor)"
    ) in table
    assert "seq 2: needs" not in table
    assert "  seq 3: approval apr_1 (the tier needs" in table, "a retry presented none"
