"""`proviso serve` flags: each documented flag is accepted and reaches the settings."""

from __future__ import annotations

import json
import time
from pathlib import Path

from sidecar.cli import build_parser, serve_settings
from sidecar.keystore import load_or_create
from tests.conftest import BILLING_AGENT, EXAMPLE_POLICIES, REFUND_GRANT
from tests.integration.serve_process import serve_process
from tests.integration.test_check import INVOICE_CONTEXT, refund
from tests.integration.test_cli import run
from tokens import issue


def test_token_leeway_and_idp_ca_file_reach_the_settings(tmp_path: Path) -> None:
    """--token-leeway and --idp-ca-file (documented, and named in config errors) are serve
    flags, set the same settings as PROVISO_TOKEN_LEEWAY and PROVISO_IDP_CA_FILE, and have
    help."""
    ca = tmp_path / "ca.pem"
    args = build_parser().parse_args(
        ["serve", "--token-leeway", "17", "--idp-ca-file", str(ca), "--workers", "1"]
    )
    settings = serve_settings(args)
    assert (settings.leeway_seconds, settings.idp_ca_file) == (17, ca)
    shown = run("serve", "--help").stdout
    assert "--token-leeway SECONDS" in shown
    assert "--idp-ca-file PEM" in shown


def test_serve_names_a_bad_token_leeway(tmp_path: Path) -> None:
    """An out-of-range --token-leeway is a usage error about the value, not an unknown flag."""
    result = run("serve", "--token-leeway", "31", "--state-dir", str(tmp_path))
    assert result.returncode == 2
    assert "--token-leeway: whole seconds from 0 to 30, got '31'" in result.stderr
    assert "unrecognized arguments" not in result.stderr


def test_serve_names_a_bad_log_level(tmp_path: Path) -> None:
    """An unknown --log-level (or PROVISO_LOG_LEVEL) is a usage error naming the flag and the
    levels, not logging's traceback; a known one is accepted in any case."""
    result = run("serve", "--log-level", "FOO", "--state-dir", str(tmp_path), "--workers", "1")
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        "proviso: --log-level: expected DEBUG, INFO, WARNING, ERROR or CRITICAL, got 'FOO'\n"
    )
    args = build_parser().parse_args(["serve", "--log-level", "debug", "--workers", "1"])
    assert serve_settings(args).log_level == "DEBUG"


def test_a_served_token_leeway_accepts_a_token_just_expired(tmp_path: Path) -> None:
    """`serve --token-leeway 30` runs with that leeway: a token that expired 10 s ago is still
    accepted (with the default 5 s it would be refused as expired)."""
    state = tmp_path / "state"
    with serve_process(
        [
            "--policies", str(EXAMPLE_POLICIES), "--listen", "127.0.0.1:0",
            "--metrics-listen", "127.0.0.1:0", "--state-dir", str(state),
            "--workers", "1", "--watch-interval", "0", "--token-leeway", "30",
        ],
        directory=tmp_path, stop_timeout=20,
    ) as server:  # fmt: skip
        token = issue(
            load_or_create(state).active, issuer="proviso", subject=BILLING_AGENT,
            audience="proviso", grants=(REFUND_GRANT,), ttl_seconds=60,
            now=int(time.time()) - 70,
        )  # fmt: skip
        result = run(
            "check", "--target", server.target, "--token", token, "--tool", "requestRefund",
            "--args", refund("20"), "--context", INVOICE_CONTEXT, "--idempotency-key", "k-1",
        )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["decision"] == "DECISION_ALLOW"
