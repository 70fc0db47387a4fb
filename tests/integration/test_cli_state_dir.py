"""Commands that only read --state-dir never create it: a typo is an error, not a new state."""

from __future__ import annotations

import json
import time
from pathlib import Path

from sidecar.keystore import load_or_create
from tests.conftest import BILLING_AGENT, REFUND_GRANT
from tests.integration.test_cli import run
from tokens import issue


def _missing(result_stderr: str, path: Path) -> bool:
    return (
        f"no state directory at {path} (start `proviso serve --state-dir {path}` "
        "or pass the right --state-dir)"
    ) in result_stderr


def test_keys_list_with_a_wrong_state_dir_creates_nothing(tmp_path: Path) -> None:
    """`keys list --state-dir TYPO` says there is no state directory there and exits 1."""
    typo = tmp_path / "typo"
    result = run("keys", "list", "--state-dir", str(typo))
    assert result.returncode == 1, result.stdout + result.stderr
    assert _missing(result.stderr, typo), result.stderr
    assert result.stdout == ""
    assert not typo.exists()


def test_keys_list_of_a_state_dir_without_keys_creates_no_key_directory(tmp_path: Path) -> None:
    """An existing state directory with no keys lists none and is left as it was."""
    listed = run("keys", "list", "--state-dir", str(tmp_path), "--format", "json")
    assert (listed.returncode, json.loads(listed.stdout)) == (0, [])
    assert list(tmp_path.iterdir()) == []


def test_keys_rotate_still_creates_a_state_dir(tmp_path: Path) -> None:
    """rotate writes keys, so it makes the state directory on first use."""
    state = tmp_path / "new"
    rotated = run("keys", "rotate", "--state-dir", str(state), "--format", "json")
    assert rotated.returncode == 0, rotated.stderr
    assert list((state / "keys").glob("*.pem"))


def test_token_inspect_with_a_wrong_state_dir_creates_nothing(tmp_path: Path) -> None:
    """`token inspect --state-dir TYPO` fails on the directory, not as an unknown key, and
    leaves no directory behind."""
    state = tmp_path / "state"
    token = issue(
        load_or_create(state).active, issuer="proviso", subject=BILLING_AGENT,
        audience="proviso", grants=(REFUND_GRANT,), ttl_seconds=600,
        now=int(time.time()),
    )  # fmt: skip
    typo = tmp_path / "stat"
    result = run("token", "inspect", "--token", token, "--state-dir", str(typo))
    assert result.returncode == 1, result.stdout + result.stderr
    assert _missing(result.stderr, typo), result.stderr
    assert "TOKEN_UNKNOWN_KEY" not in result.stdout + result.stderr
    assert not typo.exists()
    right = run("token", "inspect", "--token", token, "--state-dir", str(state))
    assert right.returncode == 0, right.stderr
    assert "proviso: valid" in right.stdout
