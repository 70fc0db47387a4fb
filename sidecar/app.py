"""The composition root: build every component from Settings, start, stop. No globals."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import grpc
from grpc_health.v1 import health, health_pb2

from sidecar.approvals import ApprovalFeed, Approvals
from sidecar.audit.redaction import Redactor
from sidecar.audit.writer import AuditLog
from sidecar.authorizer import Authorizer, PolicyHolder, TokenVerifier
from sidecar.clock import Clock, SystemClock
from sidecar.config import Settings
from sidecar.errors import PolicyLoadError, ShadowPolicyLoadError, StoreUnavailableError
from sidecar.identity import DevIdentityProvider, IdentityVerifier, RemoteJwks
from sidecar.keystore import KeyStore
from sidecar.observability import tracing
from sidecar.observability.metrics import Metrics
from sidecar.policy.loader import load_policy
from sidecar.policy.model import Policy
from sidecar.reloader import PolicyReloader
from sidecar.server import grpc_server
from sidecar.server.services import (
    AdminService,
    ApprovalService,
    AuthorizationService,
    TokenService,
)
from sidecar.state.patience import write_when_free
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


def _reloaders(
    settings: Settings,
    holder: PolicyHolder,
    shadow: PolicyHolder | None,
    metrics: Metrics,
    clock: Clock,
    *,
    store: SQLiteStore,
    approvals: Approvals,
) -> tuple[PolicyReloader, PolicyReloader | None]:
    """The active bundle's reloader, and the shadow's when the shadow has a directory."""

    def swapped(policy: Policy) -> None:
        metrics.set_policy(policy.version, policy.label)
        try:  # the policy is in force already: a busy store must not fail the reload
            report_shared_state(store, approvals, policy, metrics)
        except StoreUnavailableError:
            log.exception("reading kill switches and pending approvals failed; retrying")

    reloader = PolicyReloader(settings.policies, holder, metrics, clock, on_swap=swapped)
    if shadow is not None:
        metrics.set_shadow_policy(shadow.current.version, shadow.current.label)
    if shadow is None or settings.shadow_policies is None:
        return reloader, None
    shadow_reloader = PolicyReloader(
        settings.shadow_policies,
        shadow,
        metrics,
        clock,
        bundle="shadow",
        on_swap=lambda p: metrics.set_shadow_policy(p.version, p.label),
    )
    return reloader, shadow_reloader


PRUNE_INTERVAL_SECONDS = 60.0


def report_shared_state(
    store: SQLiteStore, approvals: Approvals, policy: Policy, metrics: Metrics
) -> None:
    """Set the gauges of what the store holds for every process sharing it: the kill switches
    engaged (with the policy's) and the approval requests pending.

    Check, SetKillSwitch and approval events set them as they happen, but only in the process
    that handled them; this (at start, on each policy swap and every minute) makes a restarted
    process, and the other workers of ``serve --workers N``, report them too, and every
    approval tier of the policy shows, at 0 when nothing waits in it.
    """
    metrics.kill_switches_active.set(len(store.kill_switches()) + len(policy.kill_switches))
    approvals.refresh_pending(policy.approval_tiers())


def _published_jwks(keys: KeyStore) -> dict[str, object]:
    keys.refresh()
    return keys.verification_keys().to_jwks()


async def _prune_forever(
    store: SQLiteStore,
    approvals: Approvals,
    keys: KeyStore,
    policy: PolicyHolder,
    clock: Clock,
    *,
    metrics: Metrics,
) -> None:
    """Expire approval requests (past their time, or made under approval rules the policy in
    force no longer has); drop expired idempotency keys, stale run counters and revocations of
    expired tokens; let retired signing keys lapse; report what the store holds for every
    worker (``report_shared_state``). All off the hot path."""
    while True:
        await asyncio.sleep(PRUNE_INTERVAL_SECONDS)
        # Each step on its own, and a failure logged: it is retried next time, and one failing
        # (a busy store, a bad key file) must neither stop the others nor go unnoticed.
        expired = removed = 0
        try:
            loaded = policy.snapshot()
            expired = await approvals.sweep(loaded.policy, loaded.loaded_at)
        except Exception:
            log.exception("expiring approval requests failed; retrying in a minute")
        try:
            removed = await write_when_free(store, partial(store.prune, clock.now()))
        except Exception:
            log.exception("pruning the state store failed; retrying in a minute")
        if removed or expired:
            log.info("pruned state", extra={"rows": removed, "expired_approvals": expired})
        try:
            keys.refresh()
        except Exception:
            log.exception("re-reading the signing keys failed; retrying in a minute")
        try:
            report_shared_state(store, approvals, policy.current, metrics)
        except Exception:
            log.exception("reading kill switches and pending approvals failed; retrying")


HEALTH_POLL_SECONDS = 1.0


async def _report_broken_audit(
    audit: AuditLog, servicer: health.aio.HealthServicer, services: list[str]
) -> None:
    """Once the audit log refuses every record (until a restart), say NOT_SERVING on the
    health service, so that load balancers and orchestrators stop sending Checks that can only
    be refused, and restart the process; ``/healthz`` answers 503 likewise."""
    while not audit.broken:
        await asyncio.sleep(HEALTH_POLL_SECONDS)
    log.error("the audit log is broken; reporting NOT_SERVING", extra={"why": audit.broken})
    for name in ("", *services):
        await servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)


def freeze_startup_heap() -> None:
    """Take what start-up built (modules, the compiled policy) out of the collector's sight.

    Those ~50,000 objects live as long as the process; without this every full collection
    walks them, a ~7 ms pause of the event loop in the middle of Checks. Call it once the
    server is up, in the serving process only (tests start many Apps in one process).
    """
    gc.collect()
    gc.freeze()


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
    authorizer: Authorizer
    metrics: Metrics
    audit: AuditLog
    grpc_server: grpc.aio.Server
    grpc_port: int
    health: health.aio.HealthServicer
    http: HttpServer
    dev_idp: DevIdentityProvider | None
    store: SQLiteStore
    pruner: asyncio.Task[None]
    health_watch: asyncio.Task[None]
    reloader: PolicyReloader
    approvals: Approvals
    shadow: PolicyHolder | None = None
    shadow_reloader: PolicyReloader | None = None
    watchers: list[asyncio.Task[None]] = field(default_factory=list)
    hangup_reloads: set[asyncio.Task[None]] = field(default_factory=set)
    traces: tracing.Tracing | None = None

    @classmethod
    async def start(
        cls,
        settings: Settings,
        *,
        clock: Clock | None = None,
        policy: Policy | None = None,
        shadow_policy: Policy | None = None,
        extra_handlers: Sequence[grpc.GenericRpcHandler] = (),
        traces: tracing.Tracing | None = None,
        reload_peers: Callable[[], None] | None = None,
    ) -> App:
        """Load the policy and keys, open the audit log, and start both listeners.

        ``policy`` and ``shadow_policy`` stand in for loading the directories (tests); the
        watcher still follows ``settings.policies``, so pass ``watch_interval_seconds=0`` with
        a ``policy`` that differs from it. A ``shadow_policy`` without a directory is never
        reloaded. ``traces`` replaces the tracing the settings ask for (tests pass an
        in-memory one). ``reload_peers`` is called after a ReloadPolicy RPC reloaded this
        process, so that the other workers of ``serve --workers N`` reload too.

        Raises:
            PolicyLoadError: the policy bundle has errors (nothing is started).
            ShadowPolicyLoadError: the shadow bundle has errors (nothing is started).
            AuditLogCorruptError: the existing audit log does not verify at its end.
            TracingConfigError: tracing is asked for but cannot be set up.
        """
        clock = clock or SystemClock()
        holder = PolicyHolder(
            policy if policy is not None else load_policy(settings.policies), clock.now()
        )
        shadow: PolicyHolder | None = None
        if shadow_policy is None and settings.shadow_policies is not None:
            try:
                shadow_policy = load_policy(settings.shadow_policies)
            except PolicyLoadError as exc:
                raise ShadowPolicyLoadError(exc.issues) from None
        if shadow_policy is not None:
            shadow = PolicyHolder(shadow_policy, clock.now())
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
        audit = AuditLog(
            settings.audit_path,
            signer=keys.active,
            keys=keys.verification_keys(),
            clock=clock,
            checkpoint_every=settings.audit_checkpoint_every,
            checkpoint_seconds=settings.audit_checkpoint_seconds,
            max_file_bytes=settings.audit_max_file_bytes,
            group_commit_seconds=settings.audit_group_commit_seconds,
            sibling_logs=settings.audit_sibling_logs,
            on_commit=metrics.audit_committed,
        )
        async with contextlib.AsyncExitStack() as undo:  # closes what was opened, should start fail
            undo.callback(audit.close)
            traces = traces or tracing.start(
                settings.trace_exporters, service_name=settings.trace_service_name
            )
            if traces:
                undo.callback(traces.shutdown)
            verifier = TokenVerifier(
                keys,
                audience=settings.audience,
                issuer=settings.token_issuer,
                leeway_seconds=settings.leeway_seconds,
            )
            store = SQLiteStore(settings.state_dir / "state.db", background_checkpoints=True)
            undo.callback(store.close)
            approvals = Approvals(store, audit, metrics, clock, ApprovalFeed())
            report_shared_state(store, approvals, holder.current, metrics)
            reloader, shadow_reloader = _reloaders(
                settings, holder, shadow, metrics, clock, store=store, approvals=approvals
            )
            authorizer = Authorizer(
                holder,
                tokens=verifier,
                store=store,
                approvals=approvals,
                audit=audit,
                metrics=metrics,
                clock=clock,
                shadow=shadow,
                redactor=Redactor.load_or_create(settings.state_dir),
                tracer=traces.tracer if traces else None,
                batch_window_seconds=settings.audit_group_commit_seconds,
            )
            identities = identity_verifier(settings, dev_idp)
            if isinstance(identities.source, RemoteJwks):
                # Fetch once now, off the event loop, so the first issuer call does not wait.
                await asyncio.to_thread(identities.source.refresh)
            services: list[AuthorizationService | TokenService | AdminService | ApprovalService] = [
                AuthorizationService(
                    authorizer, metrics=metrics, max_in_flight=settings.max_in_flight
                ),
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
                    reloader=reloader,
                    shadow=shadow,
                    audit_path=settings.audit_path if settings.workers == 1 else settings.audit_dir,
                    reload_peers=reload_peers,
                ),
                ApprovalService(holder, identities=identities, approvals=approvals, clock=clock),
            ]
            try:
                http = HttpServer(
                    HttpApp(
                        metrics.exposition, lambda: _published_jwks(keys), lambda: audit.broken
                    ),
                    settings.metrics_listen.host,
                    settings.metrics_listen.port,
                )
            except OSError as exc:
                raise OSError(f"--metrics-listen {settings.metrics_listen}: {exc}") from exc
            undo.callback(http.stop)
            try:
                server, port, health_servicer = await grpc_server.start(
                    [*(s.handler() for s in services), *extra_handlers],
                    [s.name for s in services],
                    str(settings.listen),
                    reuse_port=settings.reuse_port,
                )
            except OSError as exc:
                raise OSError(f"--listen {settings.listen}: {exc}") from exc
            undo.push_async_callback(server.stop, None)
            http.start()
            undo.pop_all()
        pruner = asyncio.create_task(
            _prune_forever(store, approvals, keys, holder, clock, metrics=metrics), name="pruner"
        )
        health_watch = asyncio.create_task(
            _report_broken_audit(audit, health_servicer, [s.name for s in services]),
            name="health",
        )
        app = cls(
            settings=settings,
            policy=holder,
            keys=keys,
            tokens=verifier,
            authorizer=authorizer,
            metrics=metrics,
            audit=audit,
            grpc_server=server,
            grpc_port=port,
            health=health_servicer,
            http=http,
            dev_idp=dev_idp,
            store=store,
            pruner=pruner,
            health_watch=health_watch,
            reloader=reloader,
            approvals=approvals,
            shadow=shadow,
            shadow_reloader=shadow_reloader,
            traces=traces,
        )
        if settings.watch_interval_seconds > 0:
            for watched in app.reloaders():
                app.watchers.append(
                    asyncio.create_task(watched.watch(settings.watch_interval_seconds))
                )
        return app

    async def serve_until(self, stop: asyncio.Event) -> str:
        """Serve until ``stop`` is set (returns "") or the audit log refuses every record until
        a restart (returns why): such a process can only refuse Checks, so ``serve`` then
        exits 1 for its process manager to restart it, which resumes the chain from disk;
        under ``--workers N`` that is also how the other workers learn of it."""
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({stopping, self.health_watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        return "" if stop.is_set() else self.audit.broken or "the health watch ended"

    def reloaders(self) -> list[PolicyReloader]:
        """The active bundle's reloader, then the shadow's if there is one."""
        return [self.reloader] + ([self.shadow_reloader] if self.shadow_reloader else [])

    def reload_on_sighup(self) -> None:
        """Reload every bundle when the process gets SIGHUP (call on the running loop)."""
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._reload_all)

    def _reload_all(self) -> None:
        for reloader in self.reloaders():
            task = reloader.request("sighup")
            self.hangup_reloads.add(task)  # held until done: the loop keeps only weak refs
            task.add_done_callback(self.hangup_reloads.discard)

    async def stop(self, grace_seconds: float = 5.0) -> None:
        """Stop taking calls, finish those in flight, then flush and close the audit log."""
        for watcher in self.watchers:
            watcher.cancel()
        for watcher in self.watchers:
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await self.health.enter_graceful_shutdown()
        await self.grpc_server.stop(grace_seconds)
        self.pruner.cancel()
        self.health_watch.cancel()
        self.http.stop()
        self.audit.close()
        self.store.close()
        if self.traces is not None:
            self.traces.shutdown()
