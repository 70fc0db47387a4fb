"""Shadow evaluation: a candidate bundle beside the active one, which alone decides."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from sidecar._proto.proviso.v1 import admin_service_pb2 as admin_pb
from sidecar._proto.proviso.v1 import admin_service_pb2_grpc as admin_grpc
from sidecar._proto.proviso.v1 import authorization_service_pb2 as pb
from sidecar._proto.proviso.v1 import token_service_pb2 as token_pb
from sidecar.app import App
from sidecar.errors import ShadowPolicyLoadError
from sidecar.policy.model import Policy
from tests.conftest import Sidecar, make_settings
from tests.integration.test_check import check, refund
from tests.integration.test_reload import copy_bundle, set_variant
from tests.integration.test_server import identity, scrape


def audit_records(sidecar: Sidecar) -> list[dict[str, Any]]:
    """Every decision record written so far."""
    lines = sidecar.app.settings.audit_path.read_text().splitlines()
    return [json.loads(line) for line in lines]


def disagreements(sidecar: Sidecar, active: str, shadow: str) -> float:
    labels = (("active", active), ("shadow", shadow), ("tool", "requestRefund"))
    return scrape(sidecar).get(("proviso_shadow_disagreements_total", labels), 0.0)


@pytest.fixture
async def shadowed(tmp_path: Path) -> AsyncIterator[Sidecar]:
    """The examples active, and a candidate that lowers the auto-approve limit to 20 in shadow."""
    candidate = copy_bundle(tmp_path / "candidate")
    set_variant(candidate, auto_limit=20, label="candidate-auto-20")
    settings = make_settings(
        tmp_path / "state", shadow_policies=candidate, watch_interval_seconds=0
    )
    running = Sidecar.connect(await App.start(settings))
    try:
        yield running
    finally:
        await running.close()


async def test_a_lower_threshold_in_shadow_is_counted_and_audited(shadowed: Sidecar) -> None:
    """A 30 refund: the active policy allows it; the shadow's NEEDS_APPROVAL is only counted."""
    assert shadowed.app.shadow is not None
    shadow_version = shadowed.app.shadow.current.version
    active_version = shadowed.app.policy.current.version
    response = await check(shadowed, shadowed.token(), "requestRefund", refund("30"))
    assert (response.decision, response.matched_tier) == (pb.DECISION_ALLOW, "auto")
    assert response.policy_version == active_version
    assert disagreements(shadowed, "ALLOW", "NEEDS_APPROVAL") == 1
    [record] = audit_records(shadowed)
    assert record["decision"] == "ALLOW"
    assert record["policy_version"] == active_version
    assert record["shadow"] == {
        "policy_version": shadow_version,
        "decision": "NEEDS_APPROVAL",
        "reason": "APPROVAL_REQUIRED",
        "tier": "supervisor",
        "agrees": False,
    }


async def test_agreement_is_recorded_but_not_counted(shadowed: Sidecar) -> None:
    """A 10 refund is auto-approved by both: the record says so and no disagreement is counted."""
    response = await check(shadowed, shadowed.token(), "requestRefund", refund("10"))
    assert response.decision == pb.DECISION_ALLOW
    [record] = audit_records(shadowed)
    assert record["shadow"]["agrees"] is True
    assert record["shadow"]["decision"] == "ALLOW"
    samples = scrape(shadowed)
    assert not any(name == "proviso_shadow_disagreements_total" for name, _ in samples)


async def test_get_policy_describes_the_shadow(shadowed: Sidecar) -> None:
    """GetPolicy names the candidate beside the active version, and both are metric info."""
    stub = admin_grpc.AdminServiceStub(shadowed.channel)
    response = await stub.GetPolicy(
        admin_pb.GetPolicyRequest(), metadata=identity(shadowed, "olivia@example.com")
    )
    assert response.shadow_policy.label == "candidate-auto-20"
    assert response.shadow_policy.version != response.policy.version
    info = (("label", "candidate-auto-20"), ("version", response.shadow_policy.version))
    assert scrape(shadowed)[("proviso_shadow_policy_info", info)] == 1


async def test_the_shadow_reloads_on_its_own(shadowed: Sidecar) -> None:
    """Editing the candidate and reloading it changes the shadow, never the active version."""
    assert shadowed.app.shadow is not None
    assert shadowed.app.shadow_reloader is not None
    active = shadowed.app.policy.current.version
    set_variant(shadowed.app.shadow_reloader.directory, auto_limit=5, label="candidate-auto-5")
    loaded, changed = await shadowed.app.shadow_reloader.reload("test")
    assert changed
    assert shadowed.app.shadow.current.label == "candidate-auto-5"
    assert shadowed.app.policy.current.version == active
    reloads = (("bundle", "shadow"), ("result", "success"))
    assert scrape(shadowed)[("proviso_policy_reload_total", reloads)] == 1
    await check(shadowed, shadowed.token(), "requestRefund", refund("10"))
    [record] = audit_records(shadowed)
    assert record["shadow"]["policy_version"] == loaded.policy.version
    assert record["shadow"]["decision"] == "NEEDS_APPROVAL"


async def test_a_failing_shadow_never_fails_the_check(
    tmp_path: Path, example_policy: Policy
) -> None:
    """A shadow whose evaluation raises is logged and counted; the Check is answered as usual."""
    tools = dict(example_policy.tools)
    tools["requestRefund"] = None  # type: ignore[assignment]  # a corrupt candidate
    broken = dataclasses.replace(example_policy, version="broken", tools=MappingProxyType(tools))
    settings = make_settings(tmp_path / "state", watch_interval_seconds=0)
    sidecar = Sidecar.connect(await App.start(settings, shadow_policy=broken))
    try:
        response = await check(sidecar, sidecar.token(), "requestRefund", refund("10"))
        assert (response.decision, response.matched_tier) == (pb.DECISION_ALLOW, "auto")
        assert scrape(sidecar)[("proviso_shadow_errors_total", ())] == 1
        [record] = audit_records(sidecar)
        assert record["shadow"] == {"policy_version": "broken", "error": "AttributeError"}
    finally:
        await sidecar.close()


async def test_without_a_shadow_the_record_has_no_shadow(sidecar: Sidecar) -> None:
    """The shadow object appears only when a shadow bundle is configured."""
    await check(sidecar, sidecar.token(), "requestRefund", refund("10"))
    [record] = audit_records(sidecar)
    assert "shadow" not in record


async def test_a_broken_shadow_bundle_refuses_to_start(tmp_path: Path) -> None:
    """A candidate with errors is reported at start as the shadow's, and nothing is served."""
    candidate = tmp_path / "candidate"
    candidate.mkdir()
    (candidate / "bad.yaml").write_text("agents:\n  x@service:\n    rolez: [r]\n")
    with pytest.raises(ShadowPolicyLoadError):
        await App.start(make_settings(tmp_path / "state", shadow_policies=candidate))


async def test_the_shadow_sees_the_same_state(shadowed: Sidecar) -> None:
    """A revoked token is denied by both: the shadow reads the Check's state, not none."""
    token = shadowed.token()
    claims = shadowed.app.tokens.verify(token, time.time())
    assert not isinstance(claims, Exception)
    assert claims is not None
    await shadowed.tokens.RevokeToken(
        token_pb.RevokeTokenRequest(token_id=claims.token_id, reason="leaked"),
        metadata=identity(shadowed, "olivia@example.com"),
    )
    response = await check(shadowed, token, "requestRefund", refund("10"))
    assert response.decision == pb.DECISION_DENY
    record = [r for r in audit_records(shadowed) if r.get("kind") == "decision"][-1]
    assert record["shadow"]["decision"] == "DENY"
    assert record["shadow"]["agrees"] is True
