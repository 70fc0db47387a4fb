"""The engine alone, in-process: what one decision costs without gRPC, tokens or audit I/O."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.stats import Summary
from bench.workload import AGENT, ARGUMENTS_JSON, CONTEXT_JSON, GRANT, RUN_ID, TOOL
from sidecar import strictjson
from sidecar.authorizer import TokenVerifier
from sidecar.engine import Outcome, ToolCall, evaluate
from sidecar.keystore import KeyStore
from sidecar.policy.loader import load_policy
from tokens import SigningKey, VerificationKeys, issue, verify

AUDIENCE = "proviso"
ISSUER = "proviso"


class BenchSetupError(RuntimeError):
    """The workload does not behave as the bench assumes (for example, it is not allowed)."""


@dataclass(frozen=True, slots=True)
class InProcess:
    """Per-operation timings of the in-process micro-benchmarks."""

    evaluate: Summary
    verify: Summary
    verify_cached: Summary


def _time(operation: Callable[[], object], warmup: int, iterations: int) -> Summary:
    """Time each call separately, so percentiles (not just a mean) are available."""
    for _ in range(warmup):
        operation()
    samples = []
    clock = time.perf_counter_ns
    for _ in range(iterations):
        start = clock()
        operation()
        samples.append(clock() - start)
    return Summary.of(samples)


def run(policies: Path, iterations: int, verify_iterations: int) -> InProcess:
    """Time ``evaluate`` on the refund call with pre-verified claims, and ``tokens.verify``.

    Raises:
        BenchSetupError: the refund call is not allowed by this policy bundle.
    """
    policy = load_policy(policies)
    key = SigningKey.generate()
    keys = VerificationKeys.from_signing_keys([key])
    now = int(time.time())
    token = issue(
        key,
        issuer=ISSUER,
        subject=AGENT,
        audience=AUDIENCE,
        grants=(GRANT,),
        ttl_seconds=900,
        now=now,
    )
    claims = verify(token, keys, audience=AUDIENCE, issuer=ISSUER, now=now)
    call = ToolCall(
        tool=TOOL,
        arguments=strictjson.parse_object(ARGUMENTS_JSON),
        context=strictjson.parse_object(CONTEXT_JSON),
        run_id=RUN_ID,
        idempotency_key="bench-engine",
    )
    decision = evaluate(policy, call, claims)
    if decision.outcome is not Outcome.ALLOW:
        raise BenchSetupError(f"the refund call is not allowed: {decision}")
    return InProcess(
        evaluate=_time(lambda: evaluate(policy, call, claims), iterations // 10, iterations),
        verify=_time(
            lambda: verify(token, keys, audience=AUDIENCE, issuer=ISSUER, now=now),
            verify_iterations // 10,
            verify_iterations,
        ),
        verify_cached=_cached_verify(verify_iterations),
    )


def _cached_verify(iterations: int) -> Summary:
    """What the server pays for a token it has seen: the TokenVerifier's cache hit."""
    with tempfile.TemporaryDirectory() as state_dir:
        keys = KeyStore(Path(state_dir), retention_seconds=lambda: 930.0)
        verifier = TokenVerifier(keys, audience=AUDIENCE, issuer=ISSUER, leeway_seconds=5)
        now = int(time.time())
        token = issue(
            keys.active, issuer=ISSUER, subject=AGENT, audience=AUDIENCE, grants=(GRANT,),
            ttl_seconds=900, now=now,
        )  # fmt: skip
        return _time(lambda: verifier.verify(token, now), iterations // 10, iterations)
