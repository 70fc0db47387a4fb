"""The gRPC services: each method converts the request, calls the domain, converts back.

Methods are registered with raw-bytes deserialization so that an undecodable request becomes
INVALID_ARGUMENT (grpc's own deserializer would answer INTERNAL), and every domain exception
goes through status.py to exactly one status.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
from google.protobuf import unknown_fields
from google.protobuf.message import DecodeError, Message
from grpc_status import rpc_status

from sidecar._proto.proviso.v1 import admin_service_pb2 as admin_pb
from sidecar._proto.proviso.v1 import authorization_service_pb2 as authz_pb
from sidecar._proto.proviso.v1 import token_service_pb2 as token_pb
from sidecar.audit.files import AuditLogNotFoundError
from sidecar.audit.trace import load_trace
from sidecar.authorizer import Authorizer, PolicyHolder
from sidecar.clock import Clock
from sidecar.errors import InvalidRequestError, NotFoundError
from sidecar.identity import IdentityVerifier
from sidecar.keystore import KeyRing
from sidecar.minting import authorize_issuer, mint
from sidecar.observability.metrics import Metrics, bounded
from sidecar.server import convert, status
from sidecar.server.auth import caller, require_admin

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


class AuthorizationService:
    """proviso.v1.AuthorizationService."""

    name = "proviso.v1.AuthorizationService"

    def __init__(self, authorizer: Authorizer) -> None:
        self._authorizer = authorizer

    async def check(
        self, request: authz_pb.CheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> authz_pb.CheckResponse:
        result = await self._authorizer.check(convert.check_input(request))
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
        keys: KeyRing,
        identities: IdentityVerifier,
        metrics: Metrics,
        clock: Clock,
        *,
        issuer: str,
        audience: str,
    ) -> None:
        self._policy = policy
        self._keys = keys
        self._identities = identities
        self._metrics = metrics
        self._clock = clock
        self._issuer = issuer
        self._audience = audience

    async def issue_token(
        self, request: token_pb.IssueTokenRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> token_pb.IssueTokenResponse:
        now = self._clock.now()
        issuer = caller(context, self._identities, now)
        policy = self._policy.current
        if not request.agent:
            raise InvalidRequestError("agent", "is required")
        authorize_issuer(policy, issuer.subject, request.agent)
        minted = mint(
            policy,
            self._keys.active,
            agent=request.agent,
            grants=convert.grants(request),
            ttl_seconds=convert.ttl_seconds(request.ttl),
            now=now,
            issuer=self._issuer,
            audience=self._audience,
            run_id=request.run_id or None,
        )
        self._metrics.tokens_issued.labels(bounded(request.agent, policy.agents)).inc()
        return convert.issue_token_response(minted)

    async def get_jwks(
        self, request: token_pb.GetJwksRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> token_pb.GetJwksResponse:
        jwks = self._keys.verification_keys().to_jwks()
        return token_pb.GetJwksResponse(jwks_json=json.dumps(jwks, sort_keys=True))

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            self.name,
            {
                "IssueToken": unary(
                    token_pb.IssueTokenRequest, self.issue_token, f"{self.name}/IssueToken"
                ),
                "GetJwks": unary(token_pb.GetJwksRequest, self.get_jwks, f"{self.name}/GetJwks"),
            },
        )


class AdminService:
    """proviso.v1.AdminService: every method needs an admin identity."""

    name = "proviso.v1.AdminService"

    def __init__(
        self,
        policy: PolicyHolder,
        identities: IdentityVerifier,
        clock: Clock,
        *,
        audit_path: Path | None = None,
    ) -> None:
        self._policy = policy
        self._identities = identities
        self._clock = clock
        self._audit_path = audit_path

    def _admin(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        require_admin(caller(context, self._identities, self._clock.now()), self._policy.current)

    async def get_policy(
        self, request: admin_pb.GetPolicyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb.GetPolicyResponse:
        self._admin(context)
        return admin_pb.GetPolicyResponse(
            policy=convert.policy_info(self._policy.current, self._policy.loaded_at)
        )

    async def get_run_trace(
        self, request: admin_pb.GetRunTraceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb.GetRunTraceResponse:
        self._admin(context)
        run_id = convert.run_id(request.run_id)
        trace = None
        if self._audit_path is not None:
            try:
                trace = await asyncio.to_thread(load_trace, self._audit_path, run_id)
            except AuditLogNotFoundError:
                trace = None
        if trace is None:
            raise NotFoundError(f"the audit log holds no Check of run '{run_id}'")
        return admin_pb.GetRunTraceResponse(trace=convert.run_trace(trace))

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            self.name,
            {
                "GetPolicy": unary(
                    admin_pb.GetPolicyRequest, self.get_policy, f"{self.name}/GetPolicy"
                ),
                "GetRunTrace": unary(
                    admin_pb.GetRunTraceRequest, self.get_run_trace, f"{self.name}/GetRunTrace"
                ),
            },
        )
