"""The sidecar's signing keys on disk: created once, private, reloaded by kid."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from sidecar.keystore import KeyStore, key_statuses, load_or_create, rotate, write_private
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


# ------------------------------------------------------------------ rotation

RETENTION = 930.0  # 15 minutes of token life plus 30 s of leeway


def test_rotate_makes_a_new_active_key_and_keeps_the_old_one_verifying(tmp_path: Path) -> None:
    """After rotation the new key signs; the old one verifies until its retention ends."""
    first = load_or_create(tmp_path)
    ring, removed = rotate(tmp_path, 10_000.0, RETENTION)
    assert removed == []
    assert ring.active.kid != first.active.kid
    assert {k.kid for k in ring.keys} == {first.active.kid, ring.active.kid}
    assert ring.retired_at == {first.active.kid: 10_000.0}
    assert _mode(tmp_path / "keys" / f"{ring.active.kid}.pem") == 0o600
    assert _mode(tmp_path / "keys" / "retired.json") == 0o600
    later = load_or_create(tmp_path, now=10_000.0 + RETENTION, retention_seconds=RETENTION)
    assert [k.kid for k in later.keys] == [ring.active.kid], "the old key has lapsed"


def test_rotate_deletes_keys_whose_tokens_have_all_expired(tmp_path: Path) -> None:
    """A key retired longer ago than the retention is deleted at the next rotation."""
    first = load_or_create(tmp_path)
    second, _ = rotate(tmp_path, 10_000.0, RETENTION)
    third, removed = rotate(tmp_path, 20_000.0, RETENTION)
    assert removed == [first.active.kid]
    assert not (tmp_path / "keys" / f"{first.active.kid}.pem").exists()
    assert {k.kid for k in third.keys} == {second.active.kid, third.active.kid}


def test_key_statuses_say_until_when_each_key_is_trusted(tmp_path: Path) -> None:
    """keys list shows the active key first, then retired keys with their trust deadline."""
    first = load_or_create(tmp_path)
    second, _ = rotate(tmp_path, 10_000.0, RETENTION)
    statuses = key_statuses(tmp_path, RETENTION)
    assert [(s.kid, s.active, s.trusted_until) for s in statuses] == [
        (second.active.kid, True, None),
        (first.active.kid, False, 10_000.0 + RETENTION),
    ]
    assert statuses[1].trusted(10_000.0)
    assert not statuses[1].trusted(10_000.0 + RETENTION)


def test_the_key_store_follows_a_rotation_on_disk(tmp_path: Path) -> None:
    """A KeyStore sees another process's rotation: at once before signing, else once a second."""
    clock = [10_000.0]
    store = KeyStore(tmp_path, retention_seconds=lambda: RETENTION, clock=lambda: clock[0],
                     refresh_interval=3600)  # fmt: skip
    before = store.active.kid
    ring, _ = rotate(tmp_path, clock[0], RETENTION)
    assert store.refresh() is False, "within the interval, the disk is not looked at"
    assert store.verification_keys().kids() == (before,)
    assert store.signing_key().kid == ring.active.kid, "signing always looks first"
    assert set(store.verification_keys().kids()) == {before, ring.active.kid}
    clock[0] += RETENTION
    assert store.refresh(force=True) is True, "the retired key's trust has ended"
    assert store.verification_keys().kids() == (ring.active.kid,)


def test_a_malformed_retired_file_is_refused(tmp_path: Path) -> None:
    """retired.json must map kids to times; anything else is a loud error, not a guess."""
    load_or_create(tmp_path)
    (tmp_path / "keys" / "retired.json").write_text('{"k": "yesterday"}')
    with pytest.raises(ValueError, match=r"retired\.json"):
        load_or_create(tmp_path)


def test_a_broken_key_directory_keeps_the_last_good_ring(tmp_path: Path) -> None:
    """If the keys cannot be re-read (a bad edit), the running ring stays in force."""
    store = KeyStore(tmp_path, retention_seconds=lambda: RETENTION, refresh_interval=0)
    kid = store.active.kid
    (tmp_path / "keys" / "retired.json").write_text("{not json")
    assert store.refresh(force=True) is False
    assert store.signing_key().kid == kid
    assert store.verification_keys().kids() == (kid,)
