"""caller(): verifying an identity must not hold up the event loop, even when the IdP is slow."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

from sidecar.identity import IdentityVerifier, RemoteJwks
from sidecar.server.auth import caller
from tests.jwks_server import IDP_ISSUER, es256_key, idp_token, serve_jwks


class _Context:
    """What caller() reads of a gRPC servicer context: the invocation metadata."""

    def __init__(self, token: str) -> None:
        self._metadata = (("authorization", f"Bearer {token}"),)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata


async def test_a_slow_idp_refetch_does_not_hold_the_event_loop(tmp_path: Path) -> None:
    """A token naming a new kid makes the verifier refetch the JWKS; the IdP takes 1 s to
    answer. The event loop (every Check on it) runs on meanwhile, and the token verifies."""
    _, old_jwk = es256_key("idp-1")
    new_key, new_jwk = es256_key("idp-2")
    with serve_jwks(tmp_path, {"keys": [old_jwk]}) as idp:
        source = RemoteJwks(idp.url, ca_file=idp.ca_file, min_interval_seconds=0)
        verifier = IdentityVerifier(source, issuer=IDP_ISSUER, audience="proviso")
        await asyncio.to_thread(source.refresh)
        idp.document = {"keys": [old_jwk, new_jwk]}  # the IdP rotated
        idp.delay_seconds = 1.0
        context: Any = _Context(idp_token(new_key, "idp-2"))
        verifying = asyncio.ensure_future(caller(context, verifier, time.time()))
        ticks = [time.monotonic()]
        while not verifying.done():
            await asyncio.sleep(0.01)
            ticks.append(time.monotonic())
        identity = await verifying
    assert identity.subject == "orchestrator@service"
    assert ticks[-1] - ticks[0] >= 0.9, "the refetch took the IdP's second"
    longest = max(b - a for a, b in itertools.pairwise(ticks))
    assert longest < 0.2, f"the event loop was held {longest:.3f} s"
