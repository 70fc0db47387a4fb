"""The gRPC services: each method converts the request, calls the domain, converts back.

Methods are registered with raw-bytes deserialization so that an undecodable request becomes
INVALID_ARGUMENT (grpc's own deserializer would answer INTERNAL), and every domain exception
goes through status.py to exactly one status.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
from google.protobuf import unknown_fields
from google.protobuf.message import DecodeError, Message
from grpc_status import rpc_status

from sidecar._proto.proviso.v1 import admin_service_pb2 as admin_pb
from sidecar._proto.proviso.v1 import approval_service_pb2 as approval_pb
from sidecar._proto.proviso.v1 import authorization_service_pb2 as authz_pb
from sidecar._proto.proviso.v1 import token_service_pb2 as token_pb
from sidecar.approvals import Approvals
from sidecar.audit.files import AuditLogNotFoundError
from sidecar.audit.record import event_body, new_record_id
from sidecar.audit.trace import load_trace
from sidecar.audit.writer import AuditLog
from sidecar.authorizer import Authorizer, PolicyHolder, TokenVerifier
from sidecar.clock import Clock, timestamp
from sidecar.errors import (
    ConflictError,
    DeadlineExceededError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    SidecarError,
    UnauthenticatedError,
)
from sidecar.identity import Identity, IdentityVerifier
from sidecar.keystore import KeyStore
from sidecar.minting import MintedToken, attenuate_token, authorize_issuer, mint
from sidecar.observability.metrics import Metrics, bounded
from sidecar.policy.model import KillScope, KillSwitch, Policy
from sidecar.policy.policy_format import did_you_mean
from sidecar.reloader import PolicyReloader
from sidecar.revocation import MAX_REASON_CHARS, revoke
from sidecar.server import convert, status
from sidecar.server.auth import caller, require_admin, require_approval_reader
from sidecar.state import IssuedToken, Store
from sidecar.state.patience import write_when_free
from tokens import TokenError

log = logging.getLogger("proviso.server")
RequestT = TypeVar("RequestT", bound=Message)
Behaviour = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Message]]


def _decode(request_type: type[RequestT], raw: bytes) -> RequestT:
    """Parse a request; a known field sent with the wrong wire type is refused, not skipped.

    Unknown field numbers (from a newer client) are tolerated, as protobuf intends.

    Raises:
        InvalidRequestError: the bytes are not a valid message of this type.
    """
    try:
        request = request_type.FromString(raw)
    except DecodeError:
        raise InvalidRequestError(
            "request", f"not a valid {request_type.DESCRIPTOR.full_name}"
        ) from None
    known = request_type.DESCRIPTOR.fields_by_number
    for unknown in cast("Iterable[Any]", unknown_fields.UnknownFieldSet(request)):
        if unknown.field_number in known:
            name = known[unknown.field_number].name
            raise InvalidRequestError(name, "has the wrong type")
    return request


def unary(
    request_type: type[RequestT],
    behaviour: Callable[[RequestT, grpc.aio.ServicerContext[Any, Any]], Awaitable[Message]],
    method: str,
) -> grpc.RpcMethodHandler[bytes, bytes]:
    """A unary handler that decodes the request itself and maps exceptions to statuses."""

    async def handle(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        try:
            response = await behaviour(_decode(request_type, raw), context)
        except Exception as exc:
            failure = status.from_exception(exc, method)
        else:
            return response.SerializeToString()
        await context.abort_with_status(rpc_status.to_status(failure.rich_status()))
        raise AssertionError("abort_with_status returned")  # pragma: no cover

    return grpc.unary_unary_rpc_method_handler(handle)


def server_stream(
    request_type: type[RequestT],
    behaviour: Callable[[RequestT, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Message]],
    method: str,
) -> grpc.RpcMethodHandler[bytes, bytes]:
    """A server-streaming handler with the same decoding and status mapping as ``unary``."""

    async def handle(
        raw: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        try:
            async for response in behaviour(_decode(request_type, raw), context):
                yield response.SerializeToString()
        except Exception as exc:
            failure = status.from_exception(exc, method)
            await context.abort_with_status(rpc_status.to_status(failure.rich_status()))

    return grpc.unary_stream_rpc_method_handler(handle)


class AuthorizationService:
    """proviso.v1.AuthorizationService.

    At most ``max_in_flight`` Checks are decided at once in this process; one more is refused
    at once with RESOURCE_EXHAUSTED (the caller retries, with backoff, or fails over), so a
    burst never turns into an unbounded queue whose answers all come too late. A Check whose
    deadline has already passed is not decided at all (DEADLINE_EXCEEDED); one whose deadline
    passes while it is being decided is cancelled by gRPC, and its caller never sees an ALLOW.
    """

    name = "proviso.v1.AuthorizationService"

    def __init__(
        self, authorizer: Authorizer, *, metrics: Metrics, max_in_flight: int = 256
    ) -> None:
        self._authorizer = authorizer
        self._metrics = metrics
        self._max_in_flight = max_in_flight
        self._in_flight = 0

    async def check(
        self, request: authz_pb.CheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> authz_pb.CheckResponse:
        if self._in_flight >= self._max_in_flight:
            self._metrics.checks_rejected.inc()
            raise OverloadedError(f"more than {self._max_in_flight} Checks in flight; retry later")
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceededError("the deadline passed before the Check was decided")
        self._in_flight += 1
        self._metrics.checks_in_flight.set(self._in_flight)
        try:
            result = await self._authorizer.check(partial(convert.check_input, request))
        finally:
            self._in_flight -= 1
            self._metrics.checks_in_flight.set(self._in_flight)
        return convert.check_response(result)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            self.name, {"Check": unary(authz_pb.CheckRequest, self.check, f"{self.name}/Check")}
        )


class TokenService:
    """proviso.v1.TokenService."""

    name = "proviso.v1.TokenService"

    def __init__(
        self,
        policy: PolicyHolder,
        keys: KeyStore,
        identities: IdentityVerifier,
        metrics: Metrics,
        clock: Clock,
        *,
        issuer: str,
        audience: str,
        store: Store,
        tokens: TokenVerifier,
        audit: AuditLog,
    ) -> None:
        self._policy = policy
        self._keys = keys
        self._identities = identities
        self._metrics = metrics
        self._clock = clock
        self._issuer = issuer
        self._audience = audience
        self._store = store
        self._tokens = tokens
        self._audit = audit

    async def _record(
        self, minted: MintedToken, agent: str, issued_by: str, parent: str = ""
    ) -> None:
        """Remember the token, so an issuer can revoke it by id (fails closed: UNAVAILABLE)."""
        issued = IssuedToken(minted.token_id, agent, issued_by, minted.expires_at, parent)
        await write_when_free(self._store, partial(self._store.record_issued, issued))

    async def issue_token(
        self, request: token_pb.IssueTokenRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> token_pb.IssueTokenResponse:
        now = self._clock.now()
        issuer = await caller(context, self._identities, now)
        policy = self._policy.current
        agent = convert.agent_id(request.agent)
        run_id = convert.optional_run_id(request.run_id)
        authorize_issuer(policy, issuer.subject, agent)
        minted = mint(
            policy,
            self._keys.signing_key(),
            agent=agent,
            grants=convert.grants(request.grants),
            ttl_seconds=convert.ttl_seconds(request.ttl),
            now=now,
            issuer=self._issuer,
            audience=self._audience,
            run_id=run_id,
        )
        await self._record(minted, agent, issuer.subject)
        self._metrics.tokens_issued.labels(bounded(agent, policy.agents)).inc()
        return convert.issue_token_response(minted)

    async def get_jwks(
        self, request: token_pb.GetJwksRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> token_pb.GetJwksResponse:
        self._keys.refresh()
        jwks = self._keys.verification_keys().to_jwks()
        return token_pb.GetJwksResponse(jwks_json=json.dumps(jwks, sort_keys=True))

    async def attenuate_token(
        self,
        request: token_pb.AttenuateTokenRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> token_pb.AttenuateTokenResponse:
        """The parent token is the credential: it must verify and be unrevoked."""
        now = self._clock.now()
        if not request.parent_token:
            raise InvalidRequestError("parent_token", "is required")
        grants = convert.grants(request.grants)
        ttl = convert.ttl_seconds(request.ttl)
        run_id = convert.optional_run_id(request.run_id)
        parent = self._tokens.verify(request.parent_token, now)
        if isinstance(parent, TokenError) or parent is None:
            code = parent.code if parent is not None else "TOKEN_MISSING"
            self._metrics.tokens_rejected.labels(code).inc()
            raise UnauthenticatedError(f"the parent token is refused: {code}")
        revoked = self._store.revocation(parent.lineage)
        if revoked is not None:
            self._metrics.tokens_rejected.labels("TOKEN_REVOKED").inc()
            raise UnauthenticatedError(
                f"the parent token is refused: TOKEN_REVOKED ({revoked.token_id})"
            )
        minted = attenuate_token(
            parent, self._keys.signing_key(), grants=grants, ttl_seconds=ttl, now=now,
            run_id=run_id,
        )  # fmt: skip
        await self._record(minted, parent.subject, "attenuation", parent.token_id)
        policy = self._policy.current
        self._metrics.tokens_issued.labels(bounded(parent.subject, policy.agents)).inc()
        return convert.attenuate_token_response(minted, parent.lineage)

    async def revoke_token(
        self, request: token_pb.RevokeTokenRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> token_pb.RevokeTokenResponse:
        now = self._clock.now()
        identity = await caller(context, self._identities, now)
        token_id = convert.token_id(request.token_id)
        revocation, created = await write_when_free(
            self._store,
            partial(
                revoke,
                self._store,
                self._policy.current,
                identity,
                token_id=token_id,
                reason=request.reason,
                now=now,
            ),
        )
        self._tokens.forget({token_id})
        if created:
            self._metrics.tokens_revoked.inc()
            fields = {"token_id": token_id, "reason": revocation.reason, "by": identity.subject}
            await self._audit.append(
                event_body("token_revoked", new_record_id(now, "evt"), timestamp(now), fields)
            )
            log.warning("token revoked", extra=fields)
        return token_pb.RevokeTokenResponse(
            revocation=convert.revocation(revocation), created=created
        )

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            self.name,
            {
                "IssueToken": unary(
                    token_pb.IssueTokenRequest, self.issue_token, f"{self.name}/IssueToken"
                ),
                "GetJwks": unary(token_pb.GetJwksRequest, self.get_jwks, f"{self.name}/GetJwks"),
                "AttenuateToken": unary(
                    token_pb.AttenuateTokenRequest,
                    self.attenuate_token,
                    f"{self.name}/AttenuateToken",
                ),
                "RevokeToken": unary(
                    token_pb.RevokeTokenRequest, self.revoke_token, f"{self.name}/RevokeToken"
                ),
            },
        )


class AdminService:
    """proviso.v1.AdminService: every method needs an admin identity."""

    name = "proviso.v1.AdminService"

    def __init__(
        self,
        policy: PolicyHolder,
        *,
        identities: IdentityVerifier,
        store: Store,
        audit: AuditLog,
        metrics: Metrics,
        clock: Clock,
        reloader: PolicyReloader,
        shadow: PolicyHolder | None = None,
        audit_path: Path | None = None,
        reload_peers: Callable[[], None] | None = None,
    ) -> None:
        self._reload_peers = reload_peers
        self._policy = policy
        self._identities = identities
        self._store = store
        self._audit = audit
        self._metrics = metrics
        self._clock = clock
        self._reloader = reloader
        self._shadow = shadow
        self._audit_path = audit_path

    async def _admin(self, context: grpc.aio.ServicerContext[Any, Any]) -> Identity:
        identity = await caller(context, self._identities, self._clock.now())
        return require_admin(identity, self._policy.current)

    async def set_kill_switch(
        self, request: admin_pb.SetKillSwitchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb.SetKillSwitchResponse:
        admin = await self._admin(context)
        scope, target = convert.kill_switch_target(request)
        now = self._clock.now()
        was_engaged = True  # a release of a switch that is not engaged is NOT_FOUND below
        switch: KillSwitch | None
        if request.engaged:
            if not request.reason.strip():
                raise InvalidRequestError("reason", "say why the switch is engaged")
            if len(request.reason) > MAX_REASON_CHARS:  # told to every call the switch stops
                raise InvalidRequestError("reason", f"at most {MAX_REASON_CHARS} characters")
            _check_known_target(self._policy.current, scope, target)
            switch, was_engaged = await write_when_free(  # again: updates the reason
                self._store,
                partial(
                    self._store.set_kill_switch,
                    KillSwitch(scope, target, request.reason, "api", admin.subject, now),
                ),
            )
        else:
            switch = await write_when_free(
                self._store, partial(self._store.release_kill_switch, scope, target)
            )
            if switch is None:
                raise _not_engaged(self._policy.current, scope, target)
        action = "engage" if request.engaged else "release"
        fields = {
            "action": action,
            "scope": scope.value,
            "target": target,
            "reason": request.reason,
            "by": admin.subject,
            "was_engaged": was_engaged,
        }
        await self._audit.append(
            event_body("kill_switch", new_record_id(now, "evt"), timestamp(now), fields)
        )
        engaged = self._store.kill_switches()
        self._metrics.kill_switches_active.set(
            len(engaged) + len(self._policy.current.kill_switches)
        )
        log.warning("kill switch %s", action, extra={k: str(v) for k, v in fields.items()})
        shown = switch or KillSwitch(scope, target, request.reason, "api", admin.subject, now)
        return admin_pb.SetKillSwitchResponse(
            kill_switch=convert.kill_switch(shown), engaged=request.engaged
        )

    async def list_kill_switches(
        self,
        request: admin_pb.ListKillSwitchesRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> admin_pb.ListKillSwitchesResponse:
        await self._admin(context)
        switches = (*self._policy.current.kill_switches, *self._store.kill_switches())
        return admin_pb.ListKillSwitchesResponse(
            kill_switches=[convert.kill_switch(s) for s in switches]
        )

    async def get_policy(
        self, request: admin_pb.GetPolicyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb.GetPolicyResponse:
        await self._admin(context)
        loaded = self._policy.snapshot()
        response = admin_pb.GetPolicyResponse(
            policy=convert.policy_info(loaded.policy, loaded.loaded_at)
        )
        if self._shadow is not None:
            shadow = self._shadow.snapshot()
            response.shadow_policy.CopyFrom(convert.policy_info(shadow.policy, shadow.loaded_at))
        return response

    async def reload_policy(
        self, request: admin_pb.ReloadPolicyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb.ReloadPolicyResponse:
        """Reload the active bundle; a bundle with errors raises PolicyLoadError (see proto).

        Under ``serve --workers N`` the other workers are told to reload too (they load the
        same directory a moment later, as on SIGHUP).
        """
        await self._admin(context)
        loaded, changed = await self._reloader.reload("admin")
        if self._reload_peers is not None:
            self._reload_peers()
        return admin_pb.ReloadPolicyResponse(
            policy=convert.policy_info(loaded.policy, loaded.loaded_at), changed=changed
        )

    async def get_run_trace(
        self, request: admin_pb.GetRunTraceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb.GetRunTraceResponse:
        await self._admin(context)
        run_id = convert.run_id(request.run_id)
        page_size = _page_size(request.page_size, TRACE_MAX_PAGE_SIZE, TRACE_MAX_PAGE_SIZE)
        steps, events = _decode_trace_page_token(request.page_token)
        trace = None
        if self._audit_path is not None:
            try:
                trace = await asyncio.to_thread(load_trace, self._audit_path, run_id)
            except AuditLogNotFoundError:
                trace = None
        if trace is None:
            raise NotFoundError(f"the audit log holds no Check of run '{run_id}'")
        if steps > len(trace.steps) or events > len(trace.approval_events):
            raise InvalidRequestError("page_token", "not a token from a previous page")
        page, steps, events = convert.run_trace(
            trace, steps=steps, events=events, page_size=page_size, max_bytes=TRACE_PAGE_BYTES
        )
        done = steps == len(trace.steps) and events == len(trace.approval_events)
        return admin_pb.GetRunTraceResponse(
            trace=page, next_page_token="" if done else _encode_page_token(f"{steps}.{events}")
        )

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            self.name,
            {
                "GetPolicy": unary(
                    admin_pb.GetPolicyRequest, self.get_policy, f"{self.name}/GetPolicy"
                ),
                "SetKillSwitch": unary(
                    admin_pb.SetKillSwitchRequest,
                    self.set_kill_switch,
                    f"{self.name}/SetKillSwitch",
                ),
                "ListKillSwitches": unary(
                    admin_pb.ListKillSwitchesRequest,
                    self.list_kill_switches,
                    f"{self.name}/ListKillSwitches",
                ),
                "ReloadPolicy": unary(
                    admin_pb.ReloadPolicyRequest, self.reload_policy, f"{self.name}/ReloadPolicy"
                ),
                "GetRunTrace": unary(
                    admin_pb.GetRunTraceRequest, self.get_run_trace, f"{self.name}/GetRunTrace"
                ),
            },
        )


TRACE_MAX_PAGE_SIZE = 1000
TRACE_PAGE_BYTES = 512 * 1024
"""A GetRunTrace page ends before this, half the largest message a client takes by default."""
LIST_DEFAULT_PAGE_SIZE = 50
LIST_MAX_PAGE_SIZE = 500
WATCH_POLL_SECONDS = 0.25


class ApprovalService:
    """proviso.v1.ApprovalService: people from the IdP judge calls that need approval."""

    name = "proviso.v1.ApprovalService"

    def __init__(
        self,
        policy: PolicyHolder,
        *,
        identities: IdentityVerifier,
        approvals: Approvals,
        clock: Clock,
    ) -> None:
        self._policy = policy
        self._identities = identities
        self._approvals = approvals
        self._clock = clock

    async def _caller(self, context: grpc.aio.ServicerContext[Any, Any]) -> Identity:
        return await caller(context, self._identities, self._clock.now())

    async def _reader(self, context: grpc.aio.ServicerContext[Any, Any]) -> Identity:
        return require_approval_reader(await self._caller(context), self._policy.current)

    async def get_approval(
        self, request: approval_pb.GetApprovalRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> approval_pb.GetApprovalResponse:
        await self._reader(context)
        stored = self._approvals.get(convert.approval_id(request.approval_id))
        return approval_pb.GetApprovalResponse(approval=convert.approval(stored, self._clock.now()))

    async def list_approvals(
        self,
        request: approval_pb.ListApprovalsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> approval_pb.ListApprovalsResponse:
        await self._reader(context)
        size = _page_size(request.page_size, LIST_DEFAULT_PAGE_SIZE, LIST_MAX_PAGE_SIZE)
        after = _decode_page_token(request.page_token)
        found = self._approvals.store.list_approvals(
            status=convert.approval_status(request.state),
            agent=request.agent,
            tool=request.tool,
            limit=size + 1,
            after=after,
        )
        page, more = found[:size], len(found) > size
        now = self._clock.now()
        return approval_pb.ListApprovalsResponse(
            approvals=[convert.approval(a, now) for a in page],
            next_page_token=_encode_page_token(page[-1].record.id) if more else "",
        )

    async def _judge(
        self, approval_id: str, comment: str, context: grpc.aio.ServicerContext[Any, Any], *,
        approve: bool,
    ) -> tuple[approval_pb.Approval, bool]:  # fmt: skip
        person = await self._caller(context)
        change = await self._approvals.judge(
            convert.approval_id(approval_id),
            person,
            self._policy.current,
            approve=approve,
            comment=comment,
        )
        return convert.approval(change.approval, self._clock.now()), change.counted

    async def approve_approval(
        self,
        request: approval_pb.ApproveApprovalRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> approval_pb.ApproveApprovalResponse:
        shown, counted = await self._judge(
            request.approval_id, request.comment, context, approve=True
        )
        return approval_pb.ApproveApprovalResponse(approval=shown, counted=counted)

    async def reject_approval(
        self,
        request: approval_pb.RejectApprovalRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> approval_pb.RejectApprovalResponse:
        shown, counted = await self._judge(
            request.approval_id, request.comment, context, approve=False
        )
        return approval_pb.RejectApprovalResponse(approval=shown, counted=counted)

    async def watch_approvals(
        self,
        request: approval_pb.WatchApprovalsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[approval_pb.WatchApprovalsResponse]:
        """Every change from now on; polls the store so changes by other processes show too.

        The caller's right to read is checked again before every batch of changes, not only
        when the stream opens: once their identity token expires, or a reload takes their
        approver role away, the stream ends (UNAUTHENTICATED, PERMISSION_DENIED) instead of
        going on sending the calls' arguments.
        """
        identity = await self._reader(context)
        expires_at = identity.claims.get("exp")
        if isinstance(expires_at, int | float):
            expires_at += self._identities.leeway_seconds  # as verify() accepts it
        seen = self._approvals.store.last_approval_event()
        while True:
            # Not the whole verification again (it may fetch the IdP's keys): the token's
            # expiry, and the reader's rights under the policy in force.
            if isinstance(expires_at, int | float) and self._clock.now() >= expires_at:
                raise UnauthenticatedError("the identity token expired: watch with a fresh one")
            require_approval_reader(identity, self._policy.current)
            for event in self._approvals.events_after(seen):
                seen = event.seq
                stored = self._approvals.store.get_approval(event.approval_id)
                if stored is not None:
                    yield convert.watch_response(event, stored, self._clock.now())
            await self._approvals.feed.wait(WATCH_POLL_SECONDS)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            self.name,
            {
                "GetApproval": unary(
                    approval_pb.GetApprovalRequest, self.get_approval, f"{self.name}/GetApproval"
                ),
                "ListApprovals": unary(
                    approval_pb.ListApprovalsRequest,
                    self.list_approvals,
                    f"{self.name}/ListApprovals",
                ),
                "ApproveApproval": unary(
                    approval_pb.ApproveApprovalRequest,
                    self.approve_approval,
                    f"{self.name}/ApproveApproval",
                ),
                "RejectApproval": unary(
                    approval_pb.RejectApprovalRequest,
                    self.reject_approval,
                    f"{self.name}/RejectApproval",
                ),
                "WatchApprovals": server_stream(
                    approval_pb.WatchApprovalsRequest,
                    self.watch_approvals,
                    f"{self.name}/WatchApprovals",
                ),
            },
        )


def _check_known_target(policy: Policy, scope: KillScope, target: str) -> None:
    """A switch on a tool or agent the policy in force does not define would stop nothing (a
    typo, a wrong case): refused, so an operator is never told "engaged" for a switch that
    does not hold. Switches for tools or agents still to come ship with that policy.

    Raises:
        InvalidRequestError: the target is unknown (``target``), with a near miss if any.
    """
    if scope is KillScope.GLOBAL:
        return
    known = policy.tools if scope is KillScope.TOOL else policy.agents
    if target in known:
        return
    hint = did_you_mean(target, known)
    raise InvalidRequestError(
        "target",
        f"the policy in force ({policy.version}) defines no {scope} '{target}', so the switch "
        f"would stop nothing{f'; {hint}' if hint else ''} (a switch for one still to come "
        "ships in that policy's kill_switches)",
    )


def _not_engaged(policy: Policy, scope: KillScope, target: str) -> SidecarError:
    """Why releasing this switch changed nothing (so the caller does not think it did)."""
    label = "the global switch" if scope is KillScope.GLOBAL else f"switch {scope}:{target}"
    if any((s.scope, s.target) == (scope, target) for s in policy.kill_switches):
        return ConflictError(
            f"{label} is engaged by the policy ({policy.version}): release it by changing the "
            "policy"
        )
    return NotFoundError(f"{label} is not engaged")


def _page_size(requested: int, default: int, maximum: int) -> int:
    """AIP-158: 0 asks for the default, more than the maximum gets the maximum.

    Raises:
        InvalidRequestError: a negative size (``page_size``).
    """
    if requested < 0:
        raise InvalidRequestError("page_size", "must not be negative")
    return min(requested or default, maximum)


def _encode_page_token(last_id: str) -> str:
    return base64.urlsafe_b64encode(last_id.encode()).decode().rstrip("=")


def _decode_page_token(token: str) -> str:
    if not token:
        return ""
    try:
        return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("ascii")
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequestError("page_token", "not a token from a previous page") from None


def _decode_trace_page_token(token: str) -> tuple[int, int]:
    """Where a GetRunTrace page starts: the steps and approval events already sent."""
    if not token:
        return 0, 0
    steps, dot, events = _decode_page_token(token).partition(".")
    if not (
        dot
        and all(part.isascii() and part.isdigit() and len(part) <= 9 for part in (steps, events))
    ):
        raise InvalidRequestError("page_token", "not a token from a previous page")
    return int(steps), int(events)
