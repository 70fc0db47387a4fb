"""The Check path's token cache: results live until the token expires, and no longer."""

from __future__ import annotations

import builtins
import io
import os
from pathlib import Path
from typing import Any, Final

import pytest

from sidecar.authorizer import TokenVerifier
from sidecar.keystore import KeyStore, rotate
from tokens import (
    CapabilityClaims,
    Grant,
    SigningKey,
    TokenExpiredError,
    TokenUnknownKeyError,
    attenuate,
    issue,
)

NOW: Final = 1_767_225_600


def _setup(tmp_path: Path, max_entries: int = 100) -> tuple[KeyStore, TokenVerifier]:
    keys = KeyStore(tmp_path, retention_seconds=lambda: 930.0, clock=lambda: NOW)
    verifier = TokenVerifier(
        keys, audience="proviso", issuer="proviso", leeway_seconds=5, max_entries=max_entries
    )
    return keys, verifier


def _token(keys: KeyStore, ttl: int = 60, token_id: str | None = None) -> str:
    return issue(
        keys.active, issuer="proviso", subject="a@service", audience="proviso",
        grants=[Grant("t")], ttl_seconds=ttl, now=NOW, token_id=token_id,
    )  # fmt: skip


def test_a_verified_token_is_cached_by_its_text(tmp_path: Path) -> None:
    """The second verification of the same text is the cached claims, not a new check."""
    keys, verifier = _setup(tmp_path)
    token = _token(keys)
    first = verifier.verify(token, NOW)
    assert isinstance(first, CapabilityClaims)
    assert verifier.verify(token, NOW + 30) is first
    assert len(verifier) == 1


def test_a_cached_token_still_expires(tmp_path: Path) -> None:
    """Past exp plus leeway the cached entry is not used: the token is refused and dropped."""
    keys, verifier = _setup(tmp_path)
    token = _token(keys, ttl=60)
    assert isinstance(verifier.verify(token, NOW), CapabilityClaims)
    assert isinstance(verifier.verify(token, NOW + 64), CapabilityClaims), "within leeway"
    assert isinstance(verifier.verify(token, NOW + 65), TokenExpiredError)
    assert len(verifier) == 0


def test_forget_drops_a_token_and_its_descendants(tmp_path: Path) -> None:
    """Revoking an id drops the cached results of that token and of every child of it."""
    keys, verifier = _setup(tmp_path)
    parent_token = _token(keys, token_id="root")
    parent = verifier.verify(parent_token, NOW)
    assert isinstance(parent, CapabilityClaims)
    child = attenuate(parent, keys.active, grants=[Grant("t")], now=NOW, token_id="child")
    unrelated = _token(keys, token_id="other")
    for token in (child, unrelated):
        verifier.verify(token, NOW)
    assert verifier.forget({"root"}) == 2
    assert len(verifier) == 1


def test_the_cache_is_bounded(tmp_path: Path) -> None:
    """Beyond max_entries the oldest entry goes, so memory stays bounded."""
    keys, verifier = _setup(tmp_path, max_entries=3)
    for index in range(5):
        verifier.verify(_token(keys, token_id=f"t{index}"), NOW)
    assert len(verifier) == 3


def test_no_token_is_none_and_errors_are_not_cached(tmp_path: Path) -> None:
    """An empty token is 'missing'; a refused token leaves nothing in the cache."""
    _, verifier = _setup(tmp_path)
    assert verifier.verify("", NOW) is None
    assert not isinstance(verifier.verify("garbage", NOW), CapabilityClaims)
    assert len(verifier) == 0


@pytest.mark.parametrize("kid", ["active", "retired", "k9", "ZGV2LWlkcA"])
def test_an_unknown_kid_reads_no_file_it_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kid: str
) -> None:
    """An unknown kid makes the key source look at its own fixed files only (a few stat
    calls), never a path built from the kid, and opens nothing when they did not change."""
    _, verifier = _setup(tmp_path)
    token = issue(
        SigningKey.generate(kid=kid), issuer="proviso", subject="a@service", audience="proviso",
        grants=[Grant("t")], ttl_seconds=60, now=NOW,
    )  # fmt: skip
    looked_at: list[str] = []
    real_stat = os.stat

    def recording_stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        looked_at.append(str(path))
        return real_stat(path, *args, **kwargs)

    def no_open(*args: object, **kwargs: object) -> Any:
        raise AssertionError(f"opened {args!r}")

    monkeypatch.setattr(os, "stat", recording_stat)
    monkeypatch.setattr(builtins, "open", no_open)
    monkeypatch.setattr(io, "open", no_open)
    monkeypatch.setattr(os, "open", no_open)
    assert isinstance(verifier.verify(token, NOW), TokenUnknownKeyError)
    directory = tmp_path / "keys"
    allowed = {str(directory), str(directory / "active"), str(directory / "retired.json")}
    assert looked_at
    assert set(looked_at) <= allowed


def test_a_cached_token_stops_when_its_key_is_removed(tmp_path: Path) -> None:
    """An operator deleting a compromised key ends its tokens at once, cached or not."""
    keys, verifier = _setup(tmp_path)
    token = _token(keys)
    assert isinstance(verifier.verify(token, NOW), CapabilityClaims)
    old = keys.active.kid
    rotate(tmp_path, NOW, 930.0)
    (tmp_path / "keys" / f"{old}.pem").unlink()
    keys.refresh(force=True)
    assert old not in keys.verification_keys()
    assert isinstance(verifier.verify(token, NOW + 1), TokenUnknownKeyError)


def test_a_cached_token_stops_when_its_key_is_removed_without_another_token_missing(
    tmp_path: Path,
) -> None:
    """Only cached tokens arrive (no miss would look at the disk): a deleted key still ends
    them at the next look the key store allows (here at once; in a server, within a second)."""
    keys = KeyStore(
        tmp_path, retention_seconds=lambda: 930.0, clock=lambda: NOW, refresh_interval=0
    )
    verifier = TokenVerifier(keys, audience="proviso", issuer="proviso", leeway_seconds=5)
    token = _token(keys)
    assert isinstance(verifier.verify(token, NOW), CapabilityClaims)
    assert isinstance(verifier.verify(token, NOW), CapabilityClaims)
    old = keys.active.kid
    rotate(tmp_path, NOW, 930.0)
    (tmp_path / "keys" / f"{old}.pem").unlink()
    assert isinstance(verifier.verify(token, NOW + 1), TokenUnknownKeyError)
