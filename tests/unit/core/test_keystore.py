"""The sidecar's signing keys on disk: created once, private, reloaded by kid."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from sidecar.keystore import load_or_create, write_private
from tokens import Grant, SigningKey, issue, verify


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_first_use_creates_a_private_key_and_names_it_active(tmp_path: Path) -> None:
    """A fresh state dir gets one key file (0600) in a 0700 dir and an ``active`` file naming it."""
    ring = load_or_create(tmp_path / "state")
    keys = tmp_path / "state" / "keys"
    assert ring.keys == (ring.active,)
    assert (keys / "active").read_text() == ring.active.kid
    assert sorted(p.name for p in keys.iterdir()) == sorted([f"{ring.active.kid}.pem", "active"])
    assert _mode(keys) == 0o700
    assert _mode(keys / f"{ring.active.kid}.pem") == 0o600
    assert _mode(keys / "active") == 0o600


def test_a_second_load_returns_the_same_key(tmp_path: Path) -> None:
    """Reloading gives the same kid, and tokens signed before still verify after."""
    first = load_or_create(tmp_path)
    token = issue(
        first.active,
        issuer="proviso",
        subject="a@s",
        audience="proviso",
        grants=[Grant("t")],
        ttl_seconds=60,
        now=1_000,
    )
    second = load_or_create(tmp_path)
    assert second.active.kid == first.active.kid
    assert len(second.keys) == 1
    claims = verify(
        token, second.verification_keys(), audience="proviso", issuer="proviso", now=1_010
    )
    assert claims.key_id == first.active.kid


def test_an_active_file_naming_a_missing_key_raises(tmp_path: Path) -> None:
    """If ``active`` names no key on disk, loading refuses rather than minting a new key."""
    ring = load_or_create(tmp_path)
    (tmp_path / "keys" / "active").write_text("no-such-kid")
    with pytest.raises(FileNotFoundError, match="does not name one of the keys"):
        load_or_create(tmp_path)
    assert sorted(p.name for p in (tmp_path / "keys").glob("*.pem")) == [f"{ring.active.kid}.pem"]


def test_a_missing_active_file_with_keys_on_disk_raises(tmp_path: Path) -> None:
    """Keys without an ``active`` file is an inconsistent state, not a fresh start."""
    load_or_create(tmp_path)
    (tmp_path / "keys" / "active").unlink()
    with pytest.raises(FileNotFoundError):
        load_or_create(tmp_path)


def test_every_key_on_disk_verifies_but_only_the_active_one_signs(tmp_path: Path) -> None:
    """An older key stays in the ring for verification; the active file picks the signer."""
    ring = load_or_create(tmp_path)
    older = SigningKey.generate(kid="old-key")
    write_private(tmp_path / "keys" / "old-key.pem", older.to_pem())
    reloaded = load_or_create(tmp_path)
    assert reloaded.active.kid == ring.active.kid
    assert {k.kid for k in reloaded.keys} == {ring.active.kid, "old-key"}
    assert set(reloaded.verification_keys().kids()) == {ring.active.kid, "old-key"}


def test_the_active_file_may_end_with_a_newline(tmp_path: Path) -> None:
    """An ``active`` file edited by hand (trailing newline) still names its key."""
    ring = load_or_create(tmp_path)
    (tmp_path / "keys" / "active").write_text(ring.active.kid + "\n")
    assert load_or_create(tmp_path).active.kid == ring.active.kid


def test_write_private_replaces_atomically_with_mode_0600(tmp_path: Path) -> None:
    """write_private leaves only the final file, readable by its owner only."""
    path = tmp_path / "secret" / "x.pem"
    write_private(path, b"one")
    write_private(path, b"two")
    assert path.read_bytes() == b"two"
    assert _mode(path) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["x.pem"]
