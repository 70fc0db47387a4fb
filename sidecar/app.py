"""The composition root: build every component from Settings, start, stop. No globals."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health

from sidecar.audit.writer import AuditLog
from sidecar.authorizer import Authorizer, PolicyHolder, TokenVerifier
from sidecar.clock import Clock, SystemClock
from sidecar.config import Settings
from sidecar.identity import DevIdentityProvider, IdentityVerifier, RemoteJwks
from sidecar.keystore import KeyStore
from sidecar.observability.metrics import Metrics
from sidecar.policy.loader import load_policy
from sidecar.policy.model import Policy
from sidecar.server import grpc_server
from sidecar.server.services import AdminService, AuthorizationService, TokenService
from sidecar.state.sqlite import SQLiteStore
from sidecar.web.http import HttpApp, HttpServer
from tokens import MAX_LEEWAY_SECONDS

log = logging.getLogger("proviso.app")


def identity_verifier(settings: Settings, dev_idp: DevIdentityProvider | None) -> IdentityVerifier:
    """The company IdP's verifier (JWKS from a file or an https URL), or the dev IdP's."""
    if settings.dev_mode:
        if dev_idp is None:
            raise ValueError("dev mode needs the dev IdP")
        return dev_idp.verifier(settings.groups_claim)
    jwks: RemoteJwks | dict[str, object]
    if settings.idp_jwks_url:
        jwks = RemoteJwks(settings.idp_jwks_url, ca_file=settings.idp_ca_file)
    elif settings.idp_jwks is not None:
        jwks = json.loads(settings.idp_jwks.read_text())
    else:  # pragma: no cover - dev_mode covers it
        raise ValueError("no IdP JWKS configured")
    return IdentityVerifier(
        jwks,
        issuer=settings.idp_issuer,
        audience=settings.idp_audience,
        groups_claim=settings.groups_claim,
    )


PRUNE_INTERVAL_SECONDS = 60.0


def _published_jwks(keys: KeyStore) -> dict[str, object]:
    keys.refresh()
    return keys.verification_keys().to_jwks()


async def _prune_forever(store: SQLiteStore, keys: KeyStore, clock: Clock) -> None:
    """Drop expired idempotency keys, stale run counters and revocations of expired tokens,
    and let retired signing keys lapse, off the hot path."""
    while True:
        await asyncio.sleep(PRUNE_INTERVAL_SECONDS)
        with contextlib.suppress(Exception):  # a failed prune is retried next time
            removed = store.prune(clock.now())
            if removed:
                log.info("pruned expired state", extra={"rows": removed})
        with contextlib.suppress(Exception):
            keys.refresh()


def key_retention_seconds(policy: Policy) -> float:
    """How long a retired key must keep verifying: the longest token life, plus leeway."""
    longest = max((role.max_token_ttl_seconds for role in policy.roles.values()), default=0)
    return float(longest + MAX_LEEWAY_SECONDS)


@dataclass
class App:
    """A running sidecar."""

    settings: Settings
    policy: PolicyHolder
    keys: KeyStore
    tokens: TokenVerifier
    metrics: Metrics
    audit: AuditLog
    grpc_server: grpc.aio.Server
    grpc_port: int
    health: health.aio.HealthServicer
    http: HttpServer
    dev_idp: DevIdentityProvider | None
    store: SQLiteStore
    pruner: asyncio.Task[None]

    @classmethod
    async def start(
        cls,
        settings: Settings,
        *,
        clock: Clock | None = None,
        policy: Policy | None = None,
        extra_handlers: Sequence[grpc.GenericRpcHandler] = (),
    ) -> App:
        """Load the policy and keys, open the audit log, and start both listeners.

        Raises:
            PolicyLoadError: the policy bundle has errors (nothing is started).
        """
        clock = clock or SystemClock()
        holder = PolicyHolder(
            policy if policy is not None else load_policy(settings.policies), clock.now()
        )
        settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        keys = KeyStore(
            settings.state_dir,
            retention_seconds=lambda: key_retention_seconds(holder.current),
            clock=clock.now,
            refresh_interval=settings.key_refresh_seconds,
        )
        dev_idp = (
            DevIdentityProvider.load_or_create(settings.state_dir, settings.idp_audience)
            if settings.dev_mode
            else None
        )
        metrics = Metrics()
        metrics.set_policy(holder.current.version, holder.current.label)
        audit = AuditLog(settings.audit_path)
        verifier = TokenVerifier(
            keys,
            audience=settings.audience,
            issuer=settings.token_issuer,
            leeway_seconds=settings.leeway_seconds,
        )
        store = SQLiteStore(settings.state_dir / "state.db")
        authorizer = Authorizer(
            holder, tokens=verifier, store=store, audit=audit, metrics=metrics, clock=clock
        )
        identities = identity_verifier(settings, dev_idp)
        if isinstance(identities.source, RemoteJwks):
            # Fetch once now, off the event loop, so the first issuer call does not wait.
            await asyncio.to_thread(identities.source.refresh)
        services: list[AuthorizationService | TokenService | AdminService] = [
            AuthorizationService(authorizer),
            TokenService(
                holder,
                keys,
                identities,
                metrics,
                clock,
                issuer=settings.token_issuer,
                audience=settings.audience,
                store=store,
                tokens=verifier,
                audit=audit,
            ),
            AdminService(
                holder,
                identities=identities,
                store=store,
                audit=audit,
                metrics=metrics,
                clock=clock,
            ),
        ]
        http = HttpServer(
            HttpApp(metrics.exposition, lambda: _published_jwks(keys)),
            settings.metrics_listen.host,
            settings.metrics_listen.port,
        )
        try:
            server, port, health_servicer = await grpc_server.start(
                [*(s.handler() for s in services), *extra_handlers],
                [s.name for s in services],
                str(settings.listen),
            )
        except BaseException:
            http.stop()
            audit.close()
            store.close()
            raise
        http.start()
        pruner = asyncio.create_task(_prune_forever(store, keys, clock), name="state-pruner")
        return cls(
            settings=settings,
            policy=holder,
            keys=keys,
            tokens=verifier,
            metrics=metrics,
            audit=audit,
            grpc_server=server,
            grpc_port=port,
            health=health_servicer,
            http=http,
            dev_idp=dev_idp,
            store=store,
            pruner=pruner,
        )

    async def stop(self, grace_seconds: float = 5.0) -> None:
        """Stop taking calls, finish those in flight, then flush and close the audit log."""
        await self.health.enter_graceful_shutdown()
        await self.grpc_server.stop(grace_seconds)
        self.pruner.cancel()
        self.http.stop()
        self.audit.close()
        self.store.close()
