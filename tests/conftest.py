"""Shared fixtures: the example policy, and a real sidecar on loopback port 0."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import grpc
import pytest

from sidecar._proto.proviso.v1 import authorization_service_pb2_grpc as authz_grpc
from sidecar._proto.proviso.v1 import token_service_pb2_grpc as token_grpc
from sidecar.app import App
from sidecar.config import Address, Settings
from sidecar.policy.loader import load_policy
from sidecar.policy.model import Policy
from tokens import Grant, issue

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_POLICIES = ROOT / "policies"
BILLING_AGENT = "billing-resolution-agent@service"
TRIAGE_AGENT = "support-triage-agent@service"
INCIDENT_AGENT = "incident-assistant@service"
REFUND_GRANT = Grant("requestRefund", MappingProxyType({"invoice_id": "in_93K2"}))


@pytest.fixture(scope="session")
def example_policy() -> Policy:
    """The example bundle, loaded once."""
    return load_policy(EXAMPLE_POLICIES)


def make_settings(state_dir: Path, **overrides: object) -> Settings:
    """Settings for a sidecar on free loopback ports with its own state directory."""
    values: dict[str, object] = {
        "policies": EXAMPLE_POLICIES,
        "listen": Address("127.0.0.1", 0),
        "metrics_listen": Address("127.0.0.1", 0),
        "state_dir": state_dir,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@dataclass
class Sidecar:
    """A running sidecar and stubs connected to it."""

    app: App
    channel: grpc.aio.Channel
    authz: authz_grpc.AuthorizationServiceAsyncStub
    tokens: token_grpc.TokenServiceAsyncStub
    closed: bool = False

    @classmethod
    def connect(cls, app: App) -> Sidecar:
        """Stubs on a new channel to ``app``."""
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}")
        return cls(
            app=app,
            channel=channel,
            authz=authz_grpc.AuthorizationServiceStub(channel),
            tokens=token_grpc.TokenServiceStub(channel),
        )

    async def close(self) -> None:
        """Close the channel and stop the sidecar (once, however often it is called)."""
        if self.closed:
            return
        self.closed = True
        await self.channel.close(grace=None)
        await self.app.stop(grace_seconds=0.5)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.app.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.app.http.port}/metrics"

    def token(
        self,
        agent: str = BILLING_AGENT,
        grants: tuple[Grant, ...] = (
            Grant("requestRefund", MappingProxyType({"invoice_id": "in_93K2"})),
        ),
        *,
        now: float | None = None,
        ttl: int = 900,
        audience: str = "proviso",
        run_id: str | None = None,
    ) -> str:
        """A token signed by the sidecar's own active key (bypassing the mint ceiling)."""
        return issue(
            self.app.keys.active,
            issuer="proviso",
            subject=agent,
            audience=audience,
            grants=grants,
            ttl_seconds=ttl,
            now=int(now if now is not None else time.time()),
            run_id=run_id,
        )


@pytest.fixture
async def sidecar(tmp_path: Path) -> AsyncIterator[Sidecar]:
    """A real sidecar over real gRPC on 127.0.0.1, stopped after the test."""
    running = Sidecar.connect(await App.start(make_settings(tmp_path / "state")))
    try:
        yield running
    finally:
        await running.close()
