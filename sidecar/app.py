"""The composition root: build every component from Settings, start, stop. No globals."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health

from sidecar.audit.redaction import Redactor
from sidecar.audit.writer import AuditLog
from sidecar.authorizer import Authorizer, PolicyHolder, TokenVerifier
from sidecar.clock import Clock, SystemClock
from sidecar.config import Settings
from sidecar.identity import DevIdentityProvider, IdentityVerifier
from sidecar.keystore import KeyRing, load_or_create
from sidecar.observability import tracing
from sidecar.observability.metrics import Metrics
from sidecar.policy.loader import load_policy
from sidecar.policy.model import Policy
from sidecar.server import grpc_server
from sidecar.server.services import AdminService, AuthorizationService, TokenService
from sidecar.web.http import HttpApp, HttpServer

log = logging.getLogger("proviso.app")


def identity_verifier(settings: Settings, dev_idp: DevIdentityProvider | None) -> IdentityVerifier:
    """The company IdP's verifier, or the dev IdP's in dev mode."""
    if settings.idp_jwks is None:
        if dev_idp is None:
            raise ValueError("dev mode needs the dev IdP")
        return dev_idp.verifier(settings.groups_claim)
    jwks = json.loads(settings.idp_jwks.read_text())
    return IdentityVerifier(
        jwks,
        issuer=settings.idp_issuer,
        audience=settings.idp_audience,
        groups_claim=settings.groups_claim,
    )


@dataclass
class App:
    """A running sidecar."""

    settings: Settings
    policy: PolicyHolder
    keys: KeyRing
    metrics: Metrics
    audit: AuditLog
    grpc_server: grpc.aio.Server
    grpc_port: int
    health: health.aio.HealthServicer
    http: HttpServer
    dev_idp: DevIdentityProvider | None
    traces: tracing.Tracing | None = None

    @classmethod
    async def start(
        cls,
        settings: Settings,
        *,
        clock: Clock | None = None,
        policy: Policy | None = None,
        extra_handlers: Sequence[grpc.GenericRpcHandler] = (),
        traces: tracing.Tracing | None = None,
    ) -> App:
        """Load the policy and keys, open the audit log, and start both listeners.

        ``traces`` replaces the tracing the settings ask for (tests pass an in-memory one).

        Raises:
            PolicyLoadError: the policy bundle has errors (nothing is started).
            AuditLogCorruptError: the existing audit log does not verify at its end.
            TracingConfigError: tracing is asked for but cannot be set up.
        """
        clock = clock or SystemClock()
        holder = PolicyHolder(
            policy if policy is not None else load_policy(settings.policies), clock.now()
        )
        settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        keys = load_or_create(settings.state_dir)
        dev_idp = (
            DevIdentityProvider.load_or_create(settings.state_dir, settings.idp_audience)
            if settings.dev_mode
            else None
        )
        metrics = Metrics()
        metrics.set_policy(holder.current.version, holder.current.label)
        audit = AuditLog(
            settings.audit_path,
            signer=keys.active,
            keys=keys.verification_keys(),
            clock=clock,
            checkpoint_every=settings.audit_checkpoint_every,
            checkpoint_seconds=settings.audit_checkpoint_seconds,
            max_file_bytes=settings.audit_max_file_bytes,
            on_commit=metrics.audit_committed,
        )
        try:
            traces = traces or tracing.start(
                settings.trace_exporters, service_name=settings.trace_service_name
            )
        except BaseException:
            audit.close()
            raise
        verifier = TokenVerifier(
            keys.verification_keys(),
            audience=settings.audience,
            issuer=settings.token_issuer,
            leeway_seconds=settings.leeway_seconds,
        )
        authorizer = Authorizer(
            holder,
            verifier,
            audit,
            metrics,
            clock,
            redactor=Redactor.load_or_create(settings.state_dir),
            tracer=traces.tracer if traces else None,
        )
        identities = identity_verifier(settings, dev_idp)
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
            ),
            AdminService(holder, identities, clock, audit_path=settings.audit_path),
        ]
        http = HttpServer(
            HttpApp(metrics.exposition, lambda: keys.verification_keys().to_jwks()),
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
            if traces:
                traces.shutdown()
            raise
        http.start()
        return cls(
            settings=settings,
            policy=holder,
            keys=keys,
            metrics=metrics,
            audit=audit,
            grpc_server=server,
            grpc_port=port,
            health=health_servicer,
            http=http,
            dev_idp=dev_idp,
            traces=traces,
        )

    async def stop(self, grace_seconds: float = 5.0) -> None:
        """Stop taking calls, finish those in flight, then flush and close the audit log."""
        await self.health.enter_graceful_shutdown()
        await self.grpc_server.stop(grace_seconds)
        self.http.stop()
        self.audit.close()
        if self.traces is not None:
            self.traces.shutdown()
