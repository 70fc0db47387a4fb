"""The proviso command as a user runs it: a real process against a real server."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar._proto.proviso.v1 import authorization_service_pb2 as pb
from tests.conftest import EXAMPLE_POLICIES, ROOT, Sidecar
from tests.integration.serve_process import PROVISO, serve_process
from tests.integration.test_approvals import approve
from tests.integration.test_check import INVOICE_CONTEXT, check, refund


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PROVISO, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize(
    "command",
    [
        (),
        ("serve",),
        ("lint",),
        ("test",),
        ("token",),
        ("token", "issue"),
        ("token", "attenuate"),
        ("token", "revoke"),
        ("token", "inspect"),
        ("keys",),
        ("keys", "list"),
        ("keys", "rotate"),
        ("check",),
        ("kill",),
        ("kill", "engage"),
        ("kill", "release"),
        ("kill", "list"),
        ("approvals",),
        ("approvals", "list"),
        ("approvals", "show"),
        ("approvals", "approve"),
        ("approvals", "reject"),
        ("policy",),
        ("policy", "show"),
        ("policy", "reload"),
        ("audit",),
        ("audit", "verify"),
        ("audit", "trace"),
        ("replay",),
    ],
)
def test_every_command_has_help(command: tuple[str, ...]) -> None:
    """--help works everywhere and exits 0."""
    result = run(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: proviso" in result.stdout


def test_usage_errors_exit_2() -> None:
    """A missing required flag is a usage error (exit 2)."""
    assert run("token", "issue").returncode == 2
    assert run("lint", "/no/such/dir").returncode == 2
    assert run("test", "/no/such/dir").returncode == 2


def test_lint_accepts_the_examples() -> None:
    """The shipped example bundle lints clean of errors."""
    result = run("lint", str(EXAMPLE_POLICIES))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            "tools:\n  a:\n    writes: true\n    writes: false\n",
            r"bad\.yaml:4:\d+: error DUPLICATE_KEY",
        ),
        ("agents:\n  x@service:\n    rolez: [r]\n", r"bad\.yaml:3:\d+: error UNKNOWN_FIELD"),
        (
            "tools:\n  t:\n    arguments: {type: object}\n    tiers:\n"
            "      - name: a\n        when: args.x <=\n        action: allow\n",
            r"bad\.yaml:6:\d+: error CEL_SYNTAX",
        ),
    ],
)
def test_lint_reports_file_and_line(tmp_path: Path, content: str, expected: str) -> None:
    """lint rejects duplicate keys, unknown fields and bad CEL, each with file:line."""
    (tmp_path / "bad.yaml").write_text(content)
    result = run("lint", str(tmp_path))
    assert result.returncode == 1
    assert re.search(expected, result.stdout), result.stdout


def test_lint_json_format(tmp_path: Path) -> None:
    """lint --format json gives editors and CI one object per issue."""
    (tmp_path / "bad.yaml").write_text("agents:\n  x@service:\n    rolez: [r]\n")
    result = run("lint", str(tmp_path), "--format", "json")
    assert result.returncode == 1
    unknown = [i for i in json.loads(result.stdout) if i["code"] == "UNKNOWN_FIELD"]
    assert [(i["file"], i["line"], i["severity"]) for i in unknown] == [("bad.yaml", 3, "error")]
    assert "roles" in unknown[0]["hint"], "a did-you-mean hint names the known field"


async def test_token_issue_then_check(sidecar: Sidecar) -> None:
    """A token minted by the CLI with the local key is accepted by check against the server."""
    state = str(sidecar.app.settings.state_dir)
    issued = await asyncio.to_thread(
        run, "token", "issue", "--agent", "billing-resolution-agent@service",
        "--grant", "requestRefund:invoice_id=in_93K2", "--ttl", "10m", "--state-dir", state,
    )  # fmt: skip
    assert issued.returncode == 0, issued.stderr
    token = issued.stdout.strip()
    arguments = '{"invoice_id": "in_93K2", "amount": 20, "currency": "EUR", "reason": "late"}'
    context = '{"invoice": {"amount_due": 10000, "currency": "EUR"}}'
    common = ["--context", context, "--idempotency-key"]
    allowed = await asyncio.to_thread(
        run, "check", "--target", sidecar.target, "--token", token,
        "--tool", "requestRefund", "--args", arguments, *common, "k-1",
    )  # fmt: skip
    assert allowed.returncode == 0, allowed.stderr
    assert json.loads(allowed.stdout)["decision"] == "DECISION_ALLOW"
    denied = await asyncio.to_thread(
        run, "check", "--target", sidecar.target, "--token", token,
        "--tool", "requestRefund", "--args", arguments.replace("20", "9000"), *common, "k-2",
    )  # fmt: skip
    assert denied.returncode == 1
    assert json.loads(denied.stdout)["decision"] == "DECISION_DENY"
    # For people: the decision and each reason on a line; an agent's escape sequence in an
    # argument key reaches the terminal escaped.
    odd_key = arguments.replace('"reason"', '"reason\\u001b[2J"')
    as_text = await asyncio.to_thread(
        run, "check", "--target", sidecar.target, "--token", token, "--format", "text",
        "--tool", "requestRefund", "--args", odd_key, *common, "k-3",
    )  # fmt: skip
    assert as_text.returncode == 1, as_text.stderr
    assert as_text.stdout.startswith("decision  DENY\n"), as_text.stdout
    assert "  INVALID_ARGUMENTS: " in as_text.stdout
    assert "\\x1b[2J" in as_text.stdout
    assert "\x1b" not in as_text.stdout, as_text.stdout
    # A dry run says so (its ALLOW spent nothing and lets nothing happen); an ALLOW by an
    # approval does not read as still needing one.
    dry = await asyncio.to_thread(
        run, "check", "--target", sidecar.target, "--token", token, "--format", "text",
        "--tool", "requestRefund", "--args", arguments, *common, "k-4", "--dry-run",
    )  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    assert "\ndry run   evaluated only: nothing was spent" in dry.stdout, dry.stdout
    needs = arguments.replace("20", "120")
    needed = await asyncio.to_thread(
        run, "check", "--target", sidecar.target, "--token", token, "--format", "text",
        "--tool", "requestRefund", "--args", needs, *common, "k-5",
    )  # fmt: skip
    assert "\nneeds     1 approval(s) from billing-supervisor\n" in needed.stdout, needed.stdout
    approval_id = next(
        line.split()[1] for line in needed.stdout.splitlines() if line.startswith("approval ")
    )
    await approve(sidecar, approval_id, "alice@example.com")
    granted = await asyncio.to_thread(
        run, "check", "--target", sidecar.target, "--token", token, "--format", "text",
        "--tool", "requestRefund", "--args", needs, *common, "k-5", "--approval-id", approval_id,
    )  # fmt: skip
    assert granted.stdout.startswith("decision  ALLOW\n"), granted.stdout
    assert "  APPROVAL_GRANTED: approved by alice@example.com" in granted.stdout
    assert "needs" not in granted.stdout, granted.stdout
    malformed = await asyncio.to_thread(
        run, "check", "--target", sidecar.target, "--token", token,
        "--tool", "requestRefund", "--args", "[]",
    )  # fmt: skip
    assert malformed.returncode == 1
    assert "INVALID_ARGUMENT" in malformed.stderr


def test_token_issue_refuses_beyond_the_ceiling(tmp_path: Path) -> None:
    """The CLI mints only within the agent's roles and names the refused grant."""
    result = run(
        "token", "issue", "--agent", "support-triage-agent@service",
        "--grant", "requestRefund:invoice_id=in_1", "--state-dir", str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 1
    assert "requestRefund" in result.stderr


def test_serve_starts_answers_health_and_stops(tmp_path: Path) -> None:
    """`proviso serve` prints where it listens, answers health checks, and stops on SIGTERM."""
    with serve_process(
        [
            "--policies", str(EXAMPLE_POLICIES), "--listen", "127.0.0.1:0",
            "--metrics-listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "state"),
        ],
        directory=tmp_path, stop_timeout=20,
    ) as server:  # fmt: skip
        assert re.fullmatch(r"127\.0\.0\.1:\d+", server.target), server.banner
        with grpc.insecure_channel(server.target) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        assert response.status == health_pb2.HealthCheckResponse.SERVING
        assert (tmp_path / "state" / "keys").is_dir()
        key_files = list((tmp_path / "state" / "keys").glob("*.pem"))
        assert key_files
        assert all(f.stat().st_mode & 0o777 == 0o600 for f in key_files)
    stderr = server.stderr
    assert server.returncode == 0, stderr
    assert "WARNING dev mode" in stderr, "dev mode is announced loudly"
    assert "proviso token issue --as orchestrator@service" in server.stdout, "how to get a token"


def test_serve_refuses_a_broken_policy(tmp_path: Path) -> None:
    """A bundle with errors is reported with file:line and nothing is served."""
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "bad.yaml").write_text("agents:\n  x@service:\n    rolez: [r]\n")
    result = run(
        "serve", "--policies", str(tmp_path / "p"), "--listen", "127.0.0.1:0",
        "--metrics-listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "state"),
    )  # fmt: skip
    assert result.returncode == 1
    assert "bad.yaml:3:" in result.stderr


def test_serve_refuses_plaintext_off_loopback(tmp_path: Path) -> None:
    """Plaintext is only served on loopback until TLS is configured."""
    result = run("serve", "--listen", "0.0.0.0:0", "--state-dir", str(tmp_path))
    assert result.returncode == 2
    assert "loopback" in result.stderr


async def test_kill_engage_list_release_as_an_admin(sidecar: Sidecar) -> None:
    """An admin engages, lists and releases a switch from the CLI in dev mode (--as). A release
    says what it released, and warns when another switch still stops those calls."""
    state = str(sidecar.app.settings.state_dir)
    common = ["--target", sidecar.target, "--state-dir", state, "--as", "olivia@example.com"]
    engaged = await asyncio.to_thread(
        run, "kill", "engage", "--tool", "requestRefund", "--reason", "refund storm", *common
    )
    assert engaged.returncode == 0, engaged.stderr
    listed = await asyncio.to_thread(run, "kill", "list", "--format", "json", *common)
    assert [(s["target"], s["reason"]) for s in json.loads(listed.stdout)] == [
        ("requestRefund", "refund storm")
    ]
    everything = await asyncio.to_thread(
        run, "kill", "engage", "--all", "--reason", "incident", *common
    )
    assert everything.returncode == 0, everything.stderr
    released = await asyncio.to_thread(run, "kill", "release", "--tool", "requestRefund", *common)
    assert released.returncode == 0, released.stderr
    assert released.stdout == "released: tool requestRefund\n", "not a row of engaged switches"
    assert "released" in released.stderr
    assert "warning: global (api) still stops these calls: release it too" in released.stderr
    lifted = await asyncio.to_thread(run, "kill", "release", "--all", *common)
    assert (lifted.stdout, lifted.returncode) == ("released: global\n", 0), lifted.stderr
    assert "warning" not in lifted.stderr
    empty = await asyncio.to_thread(run, "kill", "list", *common)
    assert "no kill switches engaged" in empty.stdout


async def test_kill_by_a_non_admin_is_refused(sidecar: Sidecar) -> None:
    """A dev subject who is not an admin gets PERMISSION_DENIED and exit 1."""
    state = str(sidecar.app.settings.state_dir)
    result = await asyncio.to_thread(
        run, "kill", "engage", "--all", "--reason", "x", "--target", sidecar.target,
        "--state-dir", state, "--as", "alice@example.com",
    )  # fmt: skip
    assert result.returncode == 1
    assert "PERMISSION_DENIED" in result.stderr


def test_kill_without_an_identity_is_a_usage_error() -> None:
    """A server command without --identity-token or --as is refused before any call."""
    result = run("kill", "list")
    assert result.returncode == 2
    assert "--identity-token" in result.stderr


async def test_on_call_approves_from_the_cli(sidecar: Sidecar) -> None:
    """A supervisor lists pending requests, approves one, and the agent's call then passes."""
    token = sidecar.token()
    needed = await check(sidecar, token, "requestRefund", refund("120"), key="k-cli")
    state = str(sidecar.app.settings.state_dir)
    common = ["--target", sidecar.target, "--state-dir", state, "--as", "alice@example.com"]
    listed = await asyncio.to_thread(run, "approvals", "list", *common)
    assert listed.returncode == 0, listed.stderr
    assert needed.approval_id in listed.stdout
    assert "supervisor" in listed.stdout
    shown = await asyncio.to_thread(run, "approvals", "show", needed.approval_id, *common)
    assert json.loads(json.loads(shown.stdout)["arguments_json"])["amount"] == 120
    approved = await asyncio.to_thread(
        run, "approvals", "approve", needed.approval_id, "--comment", "ok", *common
    )
    assert approved.returncode == 0, approved.stderr
    assert "approved" in approved.stdout
    request = pb.CheckRequest(
        token=token,
        tool="requestRefund",
        arguments_json=refund("120"),
        context_json=INVOICE_CONTEXT,
        run_id="run-1",
        idempotency_key="k-cli-2",
        approval_id=needed.approval_id,
    )
    assert (await sidecar.authz.Check(request)).decision == pb.DECISION_ALLOW
    again = await asyncio.to_thread(run, "approvals", "reject", needed.approval_id, *common)
    assert again.returncode == 1
    assert "FAILED_PRECONDITION" in again.stderr


def test_policy_tests_pass_on_the_examples(tmp_path: Path) -> None:
    """`proviso test policies/` passes every shipped case, exits 0, and writes JUnit XML."""
    junit = tmp_path / "report.xml"
    result = run("test", str(EXAMPLE_POLICIES), "--junit", str(junit))
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r": \d+ passed, 0 failed$", result.stdout.strip()), result.stdout
    assert "<testsuites" in junit.read_text()


def test_policy_tests_fail_readably_on_a_wrong_expectation(tmp_path: Path) -> None:
    """A deliberately wrong expectation exits 1 with a FAIL row and an expected/got diff."""
    bundle = tmp_path / "bundle"
    shutil.copytree(EXAMPLE_POLICIES, bundle)
    billing = bundle / "billing_test.yaml"
    text = billing.read_text()
    wrong = "expect: {decision: ALLOW, reason: TIER_ALLOWED, tier: auto}  # wrong on purpose"
    right = (
        "expect: {decision: NEEDS_APPROVAL, reason: APPROVAL_REQUIRED, tier: supervisor,"
        " approvals: 1}"
    )
    assert text.count(right) == 2
    billing.write_text(text.replace(right, wrong, 1))
    result = run("test", str(bundle))
    assert result.returncode == 1
    assert re.search(r"^FAIL  billing_test\.yaml:\d+ +a 50\.01 refund", result.stdout, re.M)
    assert "decision: expected ALLOW, got NEEDS_APPROVAL" in result.stdout
    assert "tier:     expected auto, got supervisor" in result.stdout
    assert result.stdout.strip().endswith("passed, 1 failed")


async def test_token_lifecycle_from_the_command_line(sidecar: Sidecar) -> None:
    """issue (as the dev orchestrator) -> attenuate -> inspect -> revoke, as a user runs it:
    the child is allowed its call, then denied as revoked, and inspect says why."""
    state = str(sidecar.app.settings.state_dir)
    server = ["--target", sidecar.target, "--state-dir", state]
    issued = await asyncio.to_thread(
        run, "token", "issue", "--as", "orchestrator@service", *server, "--format", "json",
        "--agent", "billing-resolution-agent@service",
        "--grant", "requestRefund:invoice_id=in_93K2,amount<=50,currency in USD|EUR",
    )  # fmt: skip
    assert issued.returncode == 0, issued.stderr
    parent = json.loads(issued.stdout)
    child = await asyncio.to_thread(
        run, "token", "attenuate", "--token", parent["token"], "--target", sidecar.target,
        "--grant", "requestRefund:invoice_id=in_93K2,amount<=20,currency in USD",
    )  # fmt: skip
    assert child.returncode == 0, child.stderr
    child_token = child.stdout.strip()
    described = await asyncio.to_thread(
        run, "token", "attenuate", "--token", parent["token"], "--target", sidecar.target,
        "--grant", "requestRefund:invoice_id=in_93K2,amount<=20,currency in USD",
        "--format", "json",
    )  # fmt: skip
    assert described.returncode == 0, described.stderr
    shown = json.loads(described.stdout)
    assert set(shown) == {"token", "token_id", "key_id", "expires_at", "parent_token_ids"}
    assert shown["parent_token_ids"] == [parent["token_id"]]
    assert shown["expires_at"] <= parent["expires_at"]
    arguments = '{"invoice_id": "in_93K2", "amount": 30, "currency": "USD", "reason": "dup"}'
    out_of_scope = await asyncio.to_thread(
        run, "token", "inspect", "--token", child_token, "--state-dir", state,
        "--tool", "requestRefund", "--args", arguments,
    )  # fmt: skip
    assert out_of_scope.returncode == 1
    assert "OUT_OF_SCOPE" in out_of_scope.stderr
    assert "amount <= 20" in out_of_scope.stderr
    revoked = await asyncio.to_thread(
        run, "token", "revoke", "--token", parent["token"], "--reason", "run aborted",
        "--as", "orchestrator@service", *server,
    )  # fmt: skip
    assert revoked.returncode == 0, revoked.stderr
    assert "revoked by orchestrator@service" in revoked.stdout
    inspected = await asyncio.to_thread(
        run, "token", "inspect", "--token", child_token, "--state-dir", state, "--format", "json"
    )
    assert inspected.returncode == 1
    report = json.loads(inspected.stdout)
    assert report["refusal_code"] == "TOKEN_REVOKED"
    assert report["claims (unverified)"]["parent"] == [parent["token_id"]]


def test_keys_rotate_and_list(tmp_path: Path) -> None:
    """keys rotate makes a new active key; keys list shows it and the old one still verifying."""
    empty = run("keys", "list", "--state-dir", str(tmp_path), "--format", "json")
    assert (empty.returncode, json.loads(empty.stdout)) == (0, [])
    rotated = run("keys", "rotate", "--state-dir", str(tmp_path), "--format", "json")
    assert rotated.returncode == 0, rotated.stderr
    rows = json.loads(rotated.stdout)
    assert [row["status"] for row in rows] == ["active", "verifying"]
    assert f"new active key {rows[0]['kid']}" in rotated.stderr
    assert rows[1]["trusted_until"] - rows[1]["retired_at"] == 30 * 60 + 30, (
        "the example's longest role TTL (30m) plus the largest leeway"
    )
    listed = run("keys", "list", "--state-dir", str(tmp_path), "--format", "json")
    assert json.loads(listed.stdout) == rows
