"""The IdP's JWKS from an https URL: fetched, cached, re-fetched on rotation, failing closed."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Final

import pytest

from sidecar.errors import UnauthenticatedError
from sidecar.identity import IdentityVerifier, RemoteJwks
from tests.jwks_server import IDP_ISSUER, es256_key, idp_token, serve_jwks

ISSUER: Final = IDP_ISSUER
AUDIENCE: Final = "proviso"


class Ticker:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_token_verifies_against_the_jwks_fetched_over_https(tmp_path: Path) -> None:
    """With the IdP's CA trusted, the JWKS is fetched once and tokens verify against it."""
    key, jwk = es256_key("idp-1")
    with serve_jwks(tmp_path, {"keys": [jwk]}) as idp:
        source = RemoteJwks(idp.url, ca_file=idp.ca_file)
        verifier = IdentityVerifier(source, issuer=ISSUER, audience=AUDIENCE)
        for _ in range(3):
            assert verifier.verify(idp_token(key, "idp-1"), time.time()).subject == (
                "orchestrator@service"
            )
        assert idp.requests == ["/jwks.json"], "fetched once, then cached"


def test_a_rotated_idp_key_is_fetched_when_a_token_names_it(tmp_path: Path) -> None:
    """A token with a new kid makes the verifier fetch the JWKS again, at most every 30 s."""
    ticker = Ticker()
    old_key, old_jwk = es256_key("idp-1")
    new_key, new_jwk = es256_key("idp-2")
    with serve_jwks(tmp_path, {"keys": [old_jwk]}) as idp:
        source = RemoteJwks(idp.url, ca_file=idp.ca_file, monotonic=ticker)
        verifier = IdentityVerifier(source, issuer=ISSUER, audience=AUDIENCE)
        assert verifier.verify(idp_token(old_key, "idp-1"), time.time())
        idp.document["keys"] = [old_jwk, new_jwk]
        ticker.now += 5
        with pytest.raises(UnauthenticatedError, match="unknown key"):
            verifier.verify(idp_token(new_key, "idp-2"), time.time())
        assert len(idp.requests) == 1, "unknown kids cannot make it fetch more than every 30 s"
        ticker.now += 30
        assert verifier.verify(idp_token(new_key, "idp-2"), time.time()).subject
        assert len(idp.requests) == 2


def test_an_idp_certificate_not_trusted_verifies_nothing(tmp_path: Path) -> None:
    """Without the IdP's CA the TLS handshake fails, no keys are known, callers are refused."""
    key, jwk = es256_key("idp-1")
    with serve_jwks(tmp_path, {"keys": [jwk]}) as idp:
        verifier = IdentityVerifier(RemoteJwks(idp.url), issuer=ISSUER, audience=AUDIENCE)
        with pytest.raises(UnauthenticatedError, match="unknown key"):
            verifier.verify(idp_token(key, "idp-1"), time.time())
        assert idp.requests == [], "the handshake failed before any request"


def test_a_failed_refetch_keeps_the_last_good_keys(tmp_path: Path) -> None:
    """When the IdP serves garbage later, the keys fetched before keep working."""
    ticker = Ticker()
    key, jwk = es256_key("idp-1")
    with serve_jwks(tmp_path, {"keys": [jwk]}) as idp:
        source = RemoteJwks(idp.url, ca_file=idp.ca_file, monotonic=ticker, max_age_seconds=60)
        verifier = IdentityVerifier(source, issuer=ISSUER, audience=AUDIENCE)
        assert verifier.verify(idp_token(key, "idp-1"), time.time())
        idp.document["keys"] = "not a list"
        ticker.now += 120
        assert verifier.verify(idp_token(key, "idp-1"), time.time())
        assert len(idp.requests) == 2, "stale keys were re-fetched, and the failure tolerated"


@pytest.mark.parametrize(
    "url",
    ["http://idp.example.com/jwks.json", "ftp://127.0.0.1/jwks.json", "file:///etc/jwks.json"],
)
def test_only_https_is_accepted_except_http_on_loopback(url: str) -> None:
    """A JWKS URL must be https; plain http only on loopback; other schemes never."""
    with pytest.raises(ValueError, match="https"):
        RemoteJwks(url)
    assert RemoteJwks("http://127.0.0.1:8080/jwks.json").url.startswith("http://127.0.0.1")
