"""The offline verifier example runs as documented against a real sidecar's JWKS."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

from sidecar._proto.proviso.v1 import token_service_pb2 as token_pb
from tests.conftest import BILLING_AGENT, ROOT, Sidecar
from tests.integration.test_server import identity
from tokens import Grant, SigningKey, issue

EXAMPLE = ROOT / "examples" / "tool_backend.py"
GOOD = '{"invoice_id": "in_93K2", "amount": 49.00, "currency": "USD", "reason": "dup"}'


def _run_example(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLE), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


async def test_the_tool_backend_example_checks_tokens_offline(sidecar: Sidecar) -> None:
    """The example allows the in-scope refund and rejects one over the token's constraint, a
    refund for another invoice, and a token from a key the sidecar never published."""
    request = token_pb.IssueTokenRequest(
        agent=BILLING_AGENT,
        grants=[
            token_pb.Grant(
                tool="requestRefund",
                pins={"invoice_id": "in_93K2"},
                constraints={"amount": token_pb.Constraint(max="50")},
            )
        ],
    )
    token = (
        await sidecar.tokens.IssueToken(request, metadata=identity(sidecar, "orchestrator@service"))
    ).token
    jwks_url = f"http://127.0.0.1:{sidecar.app.http.port}/.well-known/jwks.json"
    common = ["--jwks-url", jwks_url, "--token", token]

    allowed = await asyncio.to_thread(_run_example, *common, "--args", GOOD)
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert allowed.stdout.strip() == f"refund of 49.00 USD on in_93K2 for {BILLING_AGENT}"

    over = await asyncio.to_thread(_run_example, *common, "--args", GOOD.replace("49.00", "60"))
    assert over.returncode == 1
    assert over.stdout.startswith("rejected: OUT_OF_SCOPE: ")
    assert "amount <= 50" in over.stdout

    other = await asyncio.to_thread(
        _run_example, *common, "--args", GOOD.replace("in_93K2", "in_OTHER")
    )
    assert other.returncode == 1
    assert "OUT_OF_SCOPE" in other.stdout

    forged = issue(
        SigningKey.generate(), issuer="proviso", subject=BILLING_AGENT, audience="proviso",
        grants=[Grant("requestRefund", {"invoice_id": "in_93K2"})], ttl_seconds=60,
        now=int(time.time()),
    )  # fmt: skip
    stranger = await asyncio.to_thread(
        _run_example, "--jwks-url", jwks_url, "--token", forged, "--args", GOOD
    )
    assert stranger.returncode == 1
    assert stranger.stdout.startswith("rejected: TOKEN_UNKNOWN_KEY")
