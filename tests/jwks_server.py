"""An IdP for identity tests: ES256 keys and tokens, and a JWKS served over https from
127.0.0.1 as Okta, Entra ID or Auth0 publish one.

The certificate is self-signed for IP 127.0.0.1 and written next to the key as a CA bundle,
so a client trusts it only when told to (the ``idp_ca_file`` setting).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm

IDP_ISSUER = "https://idp.example.test/"


def es256_key(kid: str) -> tuple[ec.EllipticCurvePrivateKey, dict[str, Any]]:
    """An ES256 key and its public JWK, as the IdP publishes it."""
    key = ec.generate_private_key(ec.SECP256R1())
    jwk: dict[str, Any] = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwk.update(kid=kid, alg="ES256", use="sig")
    return key, jwk


def idp_token(
    key: ec.EllipticCurvePrivateKey,
    kid: str,
    subject: str = "orchestrator@service",
    audience: str = "proviso",
) -> str:
    """An identity token for ``subject`` signed by the IdP key ``kid``, valid five minutes."""
    now = int(time.time())
    claims = {"iss": IDP_ISSUER, "sub": subject, "aud": audience, "iat": now, "exp": now + 300}
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid})


@dataclass
class JwksServer:
    """The running server: its URL, the CA file to trust it, and the document it serves."""

    url: str
    ca_file: Path
    document: dict[str, Any]
    requests: list[str] = field(default_factory=list)
    delay_seconds: float = 0.0
    """How long each answer takes (an IdP that is slow to answer)."""


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "idp-cert.pem", directory / "idp-key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


@contextmanager
def serve_jwks(directory: Path, document: dict[str, Any]) -> Iterator[JwksServer]:
    """Serve ``document`` (mutable: change it to rotate the IdP's keys) at /jwks.json."""
    cert_file, key_file = _self_signed(directory)
    state = JwksServer(url="", ca_file=cert_file, document=document)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.requests.append(self.path)
            time.sleep(state.delay_seconds)
            body = json.dumps(state.document).encode()
            self.send_response(200 if self.path == "/jwks.json" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: tests read the request list instead."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    state.url = f"https://127.0.0.1:{server.server_address[1]}/jwks.json"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
