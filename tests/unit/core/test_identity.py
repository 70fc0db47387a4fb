"""Caller identities: IdP JWT verification, the bearer header, and the dev IdP's key."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import stat
from pathlib import Path
from typing import Any, Final

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from jwt.algorithms import RSAAlgorithm

from sidecar.errors import UnauthenticatedError
from sidecar.identity import (
    DEV_IDP_ISSUER,
    MAX_IDENTITY_TOKEN_BYTES,
    DevIdentityProvider,
    Identity,
    IdentityVerifier,
    bearer_token,
)
from tokens import SigningKey

NOW: Final = 1_767_225_600
ISSUER: Final = "https://idp.example.com"
AUDIENCE: Final = "proviso"
ED_KEY: Final = SigningKey.generate(kid="ed-1")
_ED_PRIVATE = load_pem_private_key(ED_KEY.to_pem(), password=None)
assert isinstance(_ED_PRIVATE, Ed25519PrivateKey)
ED_PRIVATE: Final = _ED_PRIVATE
RSA_PRIVATE: Final = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA: Final = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _rsa_jwk(kid: str) -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(RSA_PRIVATE.public_key()))
    jwk["kid"] = kid
    return jwk


JWKS: Final = {"keys": [ED_KEY.public_jwk(), _rsa_jwk("rsa-1")]}


def _verifier(**overrides: Any) -> IdentityVerifier:
    values: dict[str, Any] = {"issuer": ISSUER, "audience": AUDIENCE}
    values.update(overrides)
    return IdentityVerifier(JWKS, **values)


def _claims(**overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "alice@example.com",
        "aud": AUDIENCE,
        "iat": NOW,
        "nbf": NOW,
        "exp": NOW + 300,
        "groups": ["billing-supervisors", "staff"],
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _ed_token(claims: dict[str, Any] | None = None, kid: str = "ed-1") -> str:
    return jwt.encode(
        claims if claims is not None else _claims(),
        ED_PRIVATE,
        algorithm="EdDSA",
        headers={"kid": kid},
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    return (
        f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}.{_b64(signature)}"
    )


# --- IdentityVerifier ---------------------------------------------------------------------------


def test_a_valid_token_gives_the_identity_with_groups() -> None:
    """A well-signed, in-date token for this audience from the trusted issuer verifies."""
    identity = _verifier().verify(_ed_token(), NOW)
    assert identity == Identity("alice@example.com", ("billing-supervisors", "staff"), ISSUER)


@pytest.mark.parametrize("typ", ["proviso-cap+jwt", "PROVISO-CAP+JWT"])
def test_a_capability_token_is_never_an_identity(typ: str) -> None:
    """A token typed as a capability token (which names an agent) is refused as a caller's
    identity even when everything else verifies, as an IdP on the sidecar's own keys and
    issuer would allow; an ordinary JWT typ is fine."""
    typed = jwt.encode(
        _claims(), ED_PRIVATE, algorithm="EdDSA", headers={"kid": "ed-1", "typ": typ}
    )
    with pytest.raises(UnauthenticatedError, match="capability token is not an identity"):
        _verifier().verify(typed, NOW)
    plain = jwt.encode(
        _claims(), ED_PRIVATE, algorithm="EdDSA", headers={"kid": "ed-1", "typ": "JWT"}
    )
    assert _verifier().verify(plain, NOW).subject == "alice@example.com"


def test_a_token_without_groups_has_none() -> None:
    """An absent groups claim is an empty tuple, not an error."""
    assert _verifier().verify(_ed_token(_claims(groups=None)), NOW).groups == ()


def test_the_groups_claim_name_is_configurable() -> None:
    """groups_claim picks which claim holds the groups."""
    token = _ed_token(_claims(roles=["finance-approvers"]))
    assert _verifier(groups_claim="roles").verify(token, NOW).groups == ("finance-approvers",)


def test_an_audience_list_containing_ours_is_accepted() -> None:
    """``aud`` may be a list; ours must be in it."""
    token = _ed_token(_claims(aud=["other", AUDIENCE]))
    assert _verifier().verify(token, NOW).subject == "alice@example.com"


@pytest.mark.parametrize(
    ("now", "ok"),
    [(NOW + 300 + 4, True), (NOW + 300 + 5, False), (NOW - 5, True), (NOW - 6, False)],
)
def test_lifetime_is_checked_with_a_bounded_leeway(now: int, ok: bool) -> None:
    """exp and nbf are enforced with a five-second leeway, no more."""
    token = _ed_token()
    if ok:
        assert _verifier().verify(token, now).subject == "alice@example.com"
    else:
        with pytest.raises(UnauthenticatedError, match=r"expired|not yet valid"):
            _verifier().verify(token, now)


def test_an_expired_token_is_refused() -> None:
    """A token past its exp is refused as expired."""
    with pytest.raises(UnauthenticatedError, match="expired"):
        _verifier().verify(_ed_token(_claims(exp=NOW - 60)), NOW)


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        (_claims(iss="https://evil.example.com"), "untrusted issuer"),
        (_claims(iss=None), "untrusted issuer"),
        (_claims(aud="someone-else"), "not for this sidecar"),
        (_claims(aud=["a", "b"]), "not for this sidecar"),
        (_claims(aud=None), "not for this sidecar"),
        (_claims(sub=None), "no subject"),
        (_claims(sub=""), "no subject"),
        (_claims(sub=42), "no subject"),
        (_claims(exp=None), "without exp"),
        (_claims(exp=True), "without exp"),
        (_claims(exp=str(NOW + 300)), "without exp"),
        (_claims(nbf=NOW + 60), "not yet valid"),
        (_claims(nbf="0"), "not yet valid"),
        (_claims(groups="admins"), "'groups' is not a list"),
        (_claims(groups=["ok", 1]), "'groups' is not a list"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_claims_are_refused(claims: dict[str, Any], message: str) -> None:
    """Wrong issuer, audience, subject, lifetime or groups: UnauthenticatedError saying which."""
    with pytest.raises(UnauthenticatedError, match=message):
        _verifier().verify(_ed_token(claims), NOW)


def test_an_unknown_kid_is_refused() -> None:
    """A token naming a key the JWKS does not hold is refused."""
    with pytest.raises(UnauthenticatedError, match="unknown key"):
        _verifier().verify(_ed_token(kid="ed-2"), NOW)


def test_a_token_without_kid_is_refused() -> None:
    """A token with no kid cannot be matched to a key."""
    token = jwt.encode(_claims(), ED_PRIVATE, algorithm="EdDSA")
    with pytest.raises(UnauthenticatedError, match="unknown key"):
        _verifier().verify(token, NOW)


def test_a_token_signed_by_another_key_under_a_known_kid_is_refused() -> None:
    """Knowing a kid is not enough: the signature must verify with that key."""
    impostor = Ed25519PrivateKey.generate()
    token = jwt.encode(_claims(), impostor, algorithm="EdDSA", headers={"kid": "ed-1"})
    with pytest.raises(UnauthenticatedError, match="signature does not verify"):
        _verifier().verify(token, NOW)


def test_a_tampered_payload_is_refused() -> None:
    """Changing the payload after signing breaks the signature."""
    header, _, signature = _ed_token().split(".")
    forged = _b64(json.dumps(_claims(sub="admin@example.com")).encode())
    with pytest.raises(UnauthenticatedError, match="signature does not verify"):
        _verifier().verify(f"{header}.{forged}.{signature}", NOW)


@pytest.mark.parametrize("alg", ["none", "None", "NONE", ""])
def test_alg_none_is_refused(alg: str) -> None:
    """An unsigned token (alg none, in any spelling) is refused."""
    token = _unsigned({"alg": alg, "typ": "JWT", "kid": "ed-1"}, _claims())
    with pytest.raises(UnauthenticatedError, match="algorithm not accepted"):
        _verifier().verify(token, NOW)


def test_an_hs256_token_keyed_with_the_public_key_is_refused() -> None:
    """The classic confusion attack (HMAC keyed with the public key) is refused."""
    header = {"alg": "HS256", "typ": "JWT", "kid": "ed-1"}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(_claims()).encode())}"
    public_x = ED_KEY.public_jwk()["x"].encode()
    mac = hmac.new(public_x, signing_input.encode(), hashlib.sha256).digest()
    with pytest.raises(UnauthenticatedError, match="algorithm not accepted"):
        _verifier().verify(f"{signing_input}.{_b64(mac)}", NOW)


def test_an_algorithm_not_matching_the_key_is_refused() -> None:
    """An RS256 header naming the Ed25519 key's kid is refused before any verification."""
    token = jwt.encode(_claims(), RSA_PRIVATE, algorithm="RS256", headers={"kid": "ed-1"})
    with pytest.raises(UnauthenticatedError, match="does not match its key"):
        _verifier().verify(token, NOW)


def test_rs256_tokens_verify_against_an_rsa_jwks() -> None:
    """An IdP publishing an RSA key (no ``alg`` in the JWK) signs RS256 tokens that verify."""
    token = jwt.encode(_claims(), RSA_PRIVATE, algorithm="RS256", headers={"kid": "rsa-1"})
    identity = _verifier().verify(token, NOW)
    assert identity.subject == "alice@example.com"
    assert identity.groups == ("billing-supervisors", "staff")


def test_an_rs256_token_from_another_rsa_key_is_refused() -> None:
    """An RSA signature by a key other than the published one is refused."""
    token = jwt.encode(_claims(), OTHER_RSA, algorithm="RS256", headers={"kid": "rsa-1"})
    with pytest.raises(UnauthenticatedError, match="signature does not verify"):
        _verifier().verify(token, NOW)


@pytest.mark.parametrize(
    "token", ["", "not-a-jwt", "a.b", "a.b.c", "!!!.!!!.!!!", "e30.e30.e30.e30"]
)
def test_malformed_tokens_are_refused(token: str) -> None:
    """Garbage is UnauthenticatedError, never a crash."""
    with pytest.raises(UnauthenticatedError):
        _verifier().verify(token, NOW)


def test_an_oversized_token_is_refused_before_parsing() -> None:
    """A token longer than the limit is refused for its size."""
    with pytest.raises(UnauthenticatedError, match="too large"):
        _verifier().verify("a" * (MAX_IDENTITY_TOKEN_BYTES + 1), NOW)


@pytest.mark.parametrize(
    "jwks",
    [{"keys": [{"kty": "nope"}]}, {"keys": []}, {}, {"keys": [{"kty": "OKP", "x": "AAAA"}]}],
)
def test_an_unusable_jwks_is_a_value_error(jwks: dict[str, Any]) -> None:
    """A JWKS without a usable key is a ValueError ("unusable JWKS") at construction."""
    with pytest.raises(ValueError, match="unusable JWKS"):
        IdentityVerifier(jwks, issuer=ISSUER, audience=AUDIENCE)


def test_jwks_keys_without_kid_are_never_matched() -> None:
    """A JWKS key without a kid is ignored: tokens can only name keys by kid."""
    anonymous = {k: v for k, v in ED_KEY.public_jwk().items() if k != "kid"}
    verifier = IdentityVerifier(
        {"keys": [anonymous, _rsa_jwk("rsa-1")]}, issuer=ISSUER, audience=AUDIENCE
    )
    with pytest.raises(UnauthenticatedError, match="unknown key"):
        verifier.verify(jwt.encode(_claims(), ED_PRIVATE, algorithm="EdDSA"), NOW)


# --- bearer_token -----------------------------------------------------------------------------


def test_a_bearer_header_yields_its_token() -> None:
    """``authorization: Bearer <jwt>`` yields the JWT."""
    assert bearer_token({"authorization": "Bearer aa.bb-_.cc"}) == "aa.bb-_.cc"


def test_a_missing_authorization_header_is_unauthenticated() -> None:
    """No header (or an empty one) asks for credentials."""
    for metadata in ({}, {"authorization": ""}, {"x-other": "Bearer a.b.c"}):
        with pytest.raises(UnauthenticatedError, match="no credentials"):
            bearer_token(metadata)


@pytest.mark.parametrize(
    "header",
    ["Basic dXNlcjpwdw==", "Bearer", "Bearer ", "Bearer  a.b.c", "Bearer a.b.c d", "Token a.b.c",
     "Bearer a+b/c=", " Bearer a.b.c"],
)  # fmt: skip
def test_a_malformed_authorization_header_is_unauthenticated(header: str) -> None:
    """Anything but exactly ``Bearer`` and one base64url-dotted token is refused."""
    with pytest.raises(UnauthenticatedError, match="not 'Bearer <JWT>'"):
        bearer_token({"authorization": header})


# --- DevIdentityProvider ----------------------------------------------------------------------


def test_the_dev_idp_mints_tokens_its_verifier_accepts(tmp_path: Path) -> None:
    """A dev identity carries the subject and groups and the dev issuer."""
    idp = DevIdentityProvider.load_or_create(tmp_path, "proviso")
    token = idp.mint("alice@example.com", ("billing-supervisors",), now=NOW)
    identity = idp.verifier().verify(token, NOW + 10)
    assert identity == Identity("alice@example.com", ("billing-supervisors",), DEV_IDP_ISSUER)


def test_dev_idp_tokens_expire(tmp_path: Path) -> None:
    """A dev identity token lives ttl_seconds (plus leeway), no longer."""
    idp = DevIdentityProvider.load_or_create(tmp_path, "proviso")
    token = idp.mint("alice@example.com", (), now=NOW, ttl_seconds=60)
    with pytest.raises(UnauthenticatedError, match="expired"):
        idp.verifier().verify(token, NOW + 65)


def test_dev_idp_tokens_are_for_its_audience_only(tmp_path: Path) -> None:
    """A dev token minted for one audience does not verify for another."""
    idp = DevIdentityProvider.load_or_create(tmp_path, "proviso-a")
    token = idp.mint("alice@example.com", (), now=NOW)
    other = IdentityVerifier(idp.jwks(), issuer=DEV_IDP_ISSUER, audience="proviso-b")
    with pytest.raises(UnauthenticatedError, match="not for this sidecar"):
        other.verify(token, NOW)


def test_the_dev_idp_key_is_private_and_reused(tmp_path: Path) -> None:
    """The key file is 0600 in a 0700 directory, and a second load reuses the same key."""
    first = DevIdentityProvider.load_or_create(tmp_path, "proviso")
    path = tmp_path / "dev-idp" / "signing-key.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    second = DevIdentityProvider.load_or_create(tmp_path, "proviso")
    assert second.jwks() == first.jwks()
    token = first.mint("bob@example.com", ("g",), now=NOW)
    assert second.verifier().verify(token, NOW).subject == "bob@example.com"
    assert sorted(p.name for p in path.parent.iterdir()) == ["signing-key.pem"]


def test_two_state_dirs_have_different_dev_keys(tmp_path: Path) -> None:
    """A token from one dev IdP does not verify at another's."""
    one = DevIdentityProvider.load_or_create(tmp_path / "one", "proviso")
    two = DevIdentityProvider.load_or_create(tmp_path / "two", "proviso")
    token = one.mint("alice@example.com", (), now=NOW)
    with pytest.raises(UnauthenticatedError, match="signature does not verify"):
        two.verifier().verify(token, NOW)
