"""Signing keys (PEM, kid, JWK) and verification key sets (JWKS): formats and refusals."""

from __future__ import annotations

import base64
import json
from typing import Any, Final

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from tokens import (
    ALGORITHM,
    Grant,
    KeyFormatError,
    SigningKey,
    TokenError,
    VerificationKeys,
    issue,
    verify,
)
from tokens.keys import jwk_thumbprint

NOW: Final = 1_767_225_600


def _token(key: SigningKey) -> str:
    return issue(
        key,
        issuer="iss",
        subject="agent@service",
        audience="aud",
        grants=[Grant("t")],
        ttl_seconds=60,
        now=NOW,
    )


def _verifies(token: str, keys: VerificationKeys) -> bool:
    try:
        verify(token, keys, audience="aud", issuer="iss", now=NOW)
    except TokenError:
        return False
    return True


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _pkcs8(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed448.Ed448PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


# ------------------------------------------------------------------------ SigningKey


def test_rfc_8037_thumbprint_vector() -> None:
    """The kid derivation matches the RFC 8037 (appendix A.3) JWK thumbprint example."""
    x = base64.urlsafe_b64decode("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo=")
    public = Ed25519PublicKey.from_public_bytes(x)
    assert jwk_thumbprint(public) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def test_generated_key_defaults_its_kid_to_the_thumbprint() -> None:
    """Without a kid, a generated key is named by its RFC 7638 thumbprint."""
    key = SigningKey.generate()
    assert key.kid == jwk_thumbprint(key.public_key())
    assert SigningKey.generate(kid="chosen").kid == "chosen"


@pytest.mark.parametrize("kid", ["", "../k", "k 1", "k" * 129, "k\n", "k\u00e9"])
def test_signing_key_refuses_an_invalid_kid(kid: str) -> None:
    """A kid that verify would refuse cannot be given to a signing key."""
    with pytest.raises(KeyFormatError, match="kid"):
        SigningKey.generate(kid=kid)


def test_pem_round_trip_keeps_the_key() -> None:
    """to_pem then from_pem gives a key whose tokens the original's public key verifies."""
    original = SigningKey.generate(kid="k1")
    pem = original.to_pem()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    reloaded = SigningKey.from_pem(pem, "k1")
    assert reloaded.public_jwk() == original.public_jwk()
    assert _verifies(_token(reloaded), VerificationKeys.from_signing_keys([original]))


@pytest.mark.parametrize(
    "pem",
    [
        pytest.param(_pkcs8(ec.generate_private_key(ec.SECP256R1())), id="ec-p256"),
        pytest.param(_pkcs8(rsa.generate_private_key(65537, 2048)), id="rsa"),
        pytest.param(_pkcs8(ed448.Ed448PrivateKey.generate()), id="ed448"),
    ],
)
def test_from_pem_refuses_other_key_types(pem: bytes) -> None:
    """Only an Ed25519 private key loads; other PKCS#8 keys are a KeyFormatError."""
    with pytest.raises(KeyFormatError, match="Ed25519"):
        SigningKey.from_pem(pem, "k1")


def test_from_pem_refuses_encrypted_and_garbage_input() -> None:
    """Encrypted PEM, a public key PEM and random bytes are all KeyFormatErrors."""
    private = Ed25519PrivateKey.generate()
    encrypted = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for data in (encrypted, public, b"not a key", b""):
        with pytest.raises(KeyFormatError):
            SigningKey.from_pem(data, "k1")


def test_repr_shows_no_key_material() -> None:
    """repr and str name the kid but contain no encoding of the private key."""
    key = SigningKey.generate(kid="k1")
    pem_body = b"".join(key.to_pem().splitlines()[1:-1]).decode()
    loaded = serialization.load_pem_private_key(key.to_pem(), password=None)
    private = loaded.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    for text in (repr(key), str(key), f"{key!r}"):
        assert "k1" in text
        for secret in (pem_body, _b64url(private), private.hex(), base64.b64encode(private)):
            assert str(secret) not in text
    assert repr(key) == "SigningKey(kid='k1')"


def test_public_jwk_is_an_rfc_8037_public_key() -> None:
    """public_jwk has exactly the public members, with alg and use pinned."""
    key = SigningKey.generate(kid="k1")
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key.public_jwk() == {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": _b64url(raw),
        "kid": "k1",
        "alg": ALGORITHM,
        "use": "sig",
    }


# ------------------------------------------------------------------ VerificationKeys


def test_jwks_round_trip_verifies_the_same_tokens() -> None:
    """to_jwks, through JSON text, then from_jwks, trusts exactly the same keys."""
    first, second = SigningKey.generate(kid="b-key"), SigningKey.generate(kid="a-key")
    keys = VerificationKeys.from_signing_keys([first, second])
    document = keys.to_jwks()
    assert [entry["kid"] for entry in document["keys"]] == ["a-key", "b-key"]
    reloaded = VerificationKeys.from_jwks(json.loads(json.dumps(document)))
    assert reloaded.to_jwks() == document
    assert reloaded.kids() == ("a-key", "b-key")
    assert _verifies(_token(first), reloaded)
    assert _verifies(_token(second), reloaded)
    assert not _verifies(_token(SigningKey.generate(kid="a-key")), reloaded)


def _good_jwk(kid: str = "k1") -> dict[str, Any]:
    return SigningKey.generate(kid=kid).public_jwk()


def _rsa_jwk() -> dict[str, Any]:
    numbers = rsa.generate_private_key(65537, 2048).public_key().public_numbers()
    n = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
    return {"kty": "RSA", "n": _b64url(n), "e": "AQAB", "kid": "rsa-1", "alg": "RS256"}


def _ec_jwk() -> dict[str, Any]:
    numbers = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": _b64url(numbers.x.to_bytes(32, "big")),
        "y": _b64url(numbers.y.to_bytes(32, "big")),
        "kid": "ec-1",
    }


def _with(**changes: object) -> dict[str, Any]:
    jwk = _good_jwk("k2")
    for name, value in changes.items():
        if value is None:
            del jwk[name]
        else:
            jwk[name] = value
    return jwk


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        pytest.param(_rsa_jwk(), "kty", id="rsa"),
        pytest.param(_ec_jwk(), "kty", id="ec-p256"),
        pytest.param(_with(crv="Ed448", x=_b64url(bytes(57))), "crv", id="ed448"),
        pytest.param(_with(crv="X25519"), "crv", id="x25519"),
        pytest.param(_with(kty="oct", k="c2VjcmV0"), "kty", id="symmetric"),
        pytest.param(_with(kid=None), "kid", id="kid-missing"),
        pytest.param(_with(kid="../../etc/passwd"), "kid", id="kid-path"),
        pytest.param(_with(kid=7), "kid", id="kid-number"),
        pytest.param(_with(x=None), "x", id="x-missing"),
        pytest.param(_with(x=_b64url(bytes(31))), "32 bytes", id="x-short"),
        pytest.param(_with(x=_b64url(bytes(32)) + "="), "base64url", id="x-padded"),
        pytest.param(_with(x=7), "x", id="x-number"),
        pytest.param(_with(d=_b64url(bytes(32))), "private", id="private-material"),
        pytest.param(_with(alg="RS256"), "alg", id="alg-other"),
        pytest.param(_with(use="enc"), "use", id="use-enc"),
        pytest.param(_with(kid="k1"), "duplicate", id="duplicate-kid"),
        pytest.param("k1", "object", id="not-an-object"),
    ],
)
def test_from_jwks_refuses_anything_but_ed25519_public_keys(entry: object, match: str) -> None:
    """Any unacceptable entry fails the whole JWKS, with the entry's index in the message."""
    document = {"keys": [_good_jwk("k1"), entry]}
    with pytest.raises(KeyFormatError, match=match) as excinfo:
        VerificationKeys.from_jwks(document)
    assert str(excinfo.value).startswith("keys[1]: ")


@pytest.mark.parametrize("document", [{}, {"keys": {}}, {"keys": "k1"}, []])
def test_from_jwks_refuses_a_document_without_a_keys_list(document: Any) -> None:
    """A JWKS must be an object with a 'keys' list."""
    with pytest.raises(KeyFormatError):
        VerificationKeys.from_jwks(document)


def test_from_jwks_accepts_entries_without_alg_or_use() -> None:
    """alg and use are optional in a JWK; a bare OKP Ed25519 key with a kid is enough."""
    key = SigningKey.generate(kid="k1")
    jwk = {name: value for name, value in key.public_jwk().items() if name not in {"alg", "use"}}
    assert _verifies(_token(key), VerificationKeys.from_jwks({"keys": [jwk]}))


def test_verification_keys_refuse_private_keys_and_bad_kids() -> None:
    """The constructor accepts only Ed25519 public keys under valid kids."""
    private = Ed25519PrivateKey.generate()
    with pytest.raises(KeyFormatError, match="public key"):
        VerificationKeys({"k1": private})  # type: ignore[dict-item]
    with pytest.raises(KeyFormatError, match="kid"):
        VerificationKeys({"../k1": private.public_key()})


def test_from_signing_keys_refuses_two_keys_with_one_kid() -> None:
    """Two different keys under one kid are ambiguous; the same key twice is fine."""
    key = SigningKey.generate(kid="k1")
    assert VerificationKeys.from_signing_keys([key, key]).kids() == ("k1",)
    with pytest.raises(KeyFormatError, match="k1"):
        VerificationKeys.from_signing_keys([key, SigningKey.generate(kid="k1")])


def test_verification_keys_are_a_snapshot() -> None:
    """Changing the mapping a key set was built from does not change whom it trusts."""
    public = SigningKey.generate().public_key()
    source = {"k1": public}
    keys = VerificationKeys(source)
    source["k2"] = public
    assert keys.kids() == ("k1",)
    assert "k1" in keys
    assert "k2" not in keys
    assert 1 not in keys
    assert keys.get("k1") is public
    assert keys.get("k2") is None
    assert len(keys) == 1


def test_sign_makes_an_ed25519_signature_the_public_key_verifies() -> None:
    """SigningKey.sign signs raw bytes (audit checkpoints) without exporting the private key."""
    key = SigningKey.generate()
    signature = key.sign(b"proviso.audit.checkpoint.v1\nhead")
    assert len(signature) == 64
    key.public_key().verify(signature, b"proviso.audit.checkpoint.v1\nhead")
