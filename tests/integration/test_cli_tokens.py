"""`proviso token` as a user runs it: what inspect can and cannot vouch for, and bad lifetimes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from sidecar._proto.proviso.v1 import token_service_pb2 as token_pb
from tests.conftest import BILLING_AGENT, Sidecar
from tests.integration.test_cli import run


async def _issue_and_revoke(sidecar: Sidecar) -> str:
    """A token issued and then revoked through the server's CLI, as an issuer would."""
    server = ["--target", sidecar.target, "--state-dir", str(sidecar.app.settings.state_dir)]
    issued = await asyncio.to_thread(
        run, "token", "issue", "--as", "orchestrator@service", *server,
        "--agent", BILLING_AGENT, "--grant", "requestRefund:invoice_id=in_93K2,amount<=50",
    )  # fmt: skip
    assert issued.returncode == 0, issued.stderr
    token = issued.stdout.strip()
    revoked = await asyncio.to_thread(
        run, "token", "revoke", "--token", token, "--reason", "leaked",
        "--as", "orchestrator@service", *server,
    )  # fmt: skip
    assert revoked.returncode == 0, revoked.stderr
    return token


async def test_inspect_with_remote_keys_says_revocation_was_not_checked(
    sidecar: Sidecar, tmp_path: Path
) -> None:
    """With --target or --jwks, inspect cannot see revocations: a revoked token is not called
    plainly "valid"; the verdict says revocation was not checked and where to ask."""
    token = await _issue_and_revoke(sidecar)
    jwks = tmp_path / "jwks.json"
    jwks.write_text((await sidecar.tokens.GetJwks(token_pb.GetJwksRequest())).jwks_json)
    for keys in (["--target", sidecar.target], ["--jwks", str(jwks)]):
        text = await asyncio.to_thread(run, "token", "inspect", "--token", token, *keys)
        assert text.returncode == 0, text.stderr
        assert "proviso: valid\n" not in text.stdout, keys
        assert "revocation not checked" in text.stdout, text.stdout
        assert "proviso check" in text.stdout
        shown = await asyncio.to_thread(
            run, "token", "inspect", "--token", token, *keys, "--format", "json"
        )
        report = json.loads(shown.stdout)
        assert report["revocation_checked"] is False
        assert report["verdict"].startswith("valid signature and lifetime; revocation not")
    local = await asyncio.to_thread(
        run, "token", "inspect", "--token", token, "--format", "json",
        "--state-dir", str(sidecar.app.settings.state_dir),
    )  # fmt: skip
    assert local.returncode == 1
    report = json.loads(local.stdout)
    assert (report["refusal_code"], report["revocation_checked"]) == ("TOKEN_REVOKED", True)


@pytest.mark.parametrize("ttl", ["0s", "0m", "0d"])
@pytest.mark.parametrize("command", ["issue", "attenuate"])
def test_a_zero_ttl_is_a_usage_error(tmp_path: Path, command: str, ttl: str) -> None:
    """--ttl 0s would mean "the longest lifetime allowed" to the API: the CLI refuses it as a
    usage error naming the flag, before minting or calling anything."""
    parent = ["--agent", BILLING_AGENT] if command == "issue" else ["--token", "x.y.z"]
    result = run(
        "token", command, *parent, "--grant", "requestRefund:invoice_id=in_93K2",
        "--ttl", ttl, "--state-dir", str(tmp_path / "state"),
        *(["--target", "127.0.0.1:9"] if command == "attenuate" else []),
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert "usage: proviso token" in result.stderr
    assert "argument --ttl" in result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "state").exists(), "nothing was minted"


def test_a_malformed_ttl_is_still_a_usage_error() -> None:
    """A --ttl that is not a duration names the flag and how to write one."""
    result = run("token", "issue", "--agent", BILLING_AGENT, "--grant", "t", "--ttl", "soon")
    assert result.returncode == 2
    assert "argument --ttl: invalid duration 'soon'" in result.stderr


def test_local_issue_says_when_it_made_a_new_key(tmp_path: Path) -> None:
    """A mistyped --state-dir must not mint silently with a key no sidecar trusts."""
    state = tmp_path / "typo"
    issue = ["token", "issue", "--agent", BILLING_AGENT, "--grant", "requestRefund:invoice_id=i1"]
    first = run(*issue, "--state-dir", str(state))
    assert first.returncode == 0, first.stderr
    assert f"created a new signing key in {state}" in first.stderr
    again = run(*issue, "--state-dir", str(state))
    assert again.returncode == 0, again.stderr
    assert "signing key" not in again.stderr, "an existing key ring is used without a word"


def test_local_issue_of_grants_too_large_for_a_token_is_refused_plainly(tmp_path: Path) -> None:
    """Grants that would make a token over 8 KiB are refused with one line, not a traceback."""
    pins = ",".join(f"x{i}=" + "y" * 40 for i in range(200))
    result = run(
        "token", "issue", "--agent", BILLING_AGENT, "--state-dir", str(tmp_path / "state"),
        "--grant", f"getInvoice:invoice_id=in_1,{pins}",
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "refused: grants: token would be" in result.stderr
    assert "MAX_TOKEN_BYTES" in result.stderr
