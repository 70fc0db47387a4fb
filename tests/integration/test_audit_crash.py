"""The durable log under a real `proviso serve`: killed with SIGKILL mid-load, and a full disk.

The promise checked here is the sidecar's central one: no client ever holds an ALLOW whose
record is not on disk.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from sidecar._proto.proviso.v1 import authorization_service_pb2 as pb
from sidecar._proto.proviso.v1 import authorization_service_pb2_grpc as pb_grpc
from sidecar.audit.chain import parse_line
from sidecar.audit.files import lines, log_files, verify_log
from sidecar.keystore import load_or_create, load_verification_keys
from tests.conftest import BILLING_AGENT, EXAMPLE_POLICIES, REFUND_GRANT
from tests.integration.serve_process import serve_process
from tests.integration.test_check import INVOICE_CONTEXT, refund
from tokens import issue

# Runs the CLI with an optional file-size limit (RLIMIT_FSIZE): a disk that fills up. Python
# ignores SIGXFSZ, so a write past the limit fails with EFBIG instead of killing the process.
LAUNCHER = """
import resource, runpy, sys
limit = int(sys.argv.pop(1))
if limit:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.argv[0] = "proviso"
runpy.run_module("sidecar.cli", run_name="__main__")
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextmanager
def serve(
    state_dir: Path, *, file_limit: int = 0
) -> Iterator[tuple[subprocess.Popen[str], str, int]]:
    """`proviso serve` in its own process: (process, gRPC target, metrics port).

    Its stdout and stderr go to files beside ``state_dir``.
    """
    metrics_port = free_port()
    with serve_process(
        ["--policies", str(EXAMPLE_POLICIES), "--listen", "127.0.0.1:0",
         "--metrics-listen", f"127.0.0.1:{metrics_port}", "--state-dir", str(state_dir),
         "--log-level", "ERROR", "--workers", "1"],
        directory=state_dir.parent, command=[sys.executable, "-c", LAUNCHER, str(file_limit)],
        stop_timeout=30,
    ) as server:  # fmt: skip
        yield server.process, server.target, metrics_port


def token(state_dir: Path) -> str:
    return issue(
        load_or_create(state_dir).active, issuer="proviso", subject=BILLING_AGENT,
        audience="proviso", grants=(REFUND_GRANT,), ttl_seconds=600, now=int(time.time()),
    )  # fmt: skip


async def load(
    target: str, token: str, *, total: int, workers: int, kill: subprocess.Popen[str] | None = None
) -> tuple[set[str], int]:
    """Concurrent Checks (ALLOW and NEEDS_APPROVAL alternating) until ``total`` answers or
    errors stop every worker; with ``kill``, SIGKILL that process after ``total // 2`` answers.

    Returns the decision ids answered ALLOW and the number of failed calls.
    """
    allowed: set[str] = set()
    answered = failed = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.AuthorizationServiceStub(channel)

        async def worker(index: int) -> None:
            nonlocal answered, failed
            while answered < total:
                amount = "10" if (answered + index) % 2 else "120"
                try:
                    response = await stub.Check(
                        pb.CheckRequest(token=token, tool="requestRefund",
                                        arguments_json=refund(amount),
                                        context_json=INVOICE_CONTEXT,
                                        idempotency_key=f"k-{uuid.uuid4().hex}",
                                        run_id=f"load-{index}-{answered // 10}"),
                        timeout=10,
                    )  # fmt: skip
                except grpc.aio.AioRpcError:
                    failed += 1
                    if kill is not None or failed > 50:
                        return
                    continue
                answered += 1
                if response.decision == pb.DECISION_ALLOW:
                    allowed.add(response.decision_id)
                if kill is not None and answered == total // 2:
                    os.kill(kill.pid, signal.SIGKILL)

        await asyncio.gather(*(worker(i) for i in range(workers)))
    return allowed, failed


def verified_prefix(audit: Path, state_dir: Path) -> tuple[set[str], object]:
    """Decision ids of every record before the first break, and the break (or None)."""
    files = log_files(audit)
    result = verify_log(files, load_verification_keys(state_dir))
    ids: set[str] = set()
    for path in files:
        for number, raw, complete in lines(path):
            if result.broken and (str(path), number) == (result.broken.file, result.broken.line):
                return ids, result.broken
            if complete:
                record = parse_line(raw)
                if record["kind"] == "decision":
                    ids.add(str(record["record_id"]))
    return ids, result.broken


def test_kill_9_mid_load_loses_no_allow(tmp_path: Path) -> None:
    """After SIGKILL under load, every ALLOW a client got is in the verified log, and a restart
    continues the chain."""
    state_dir = tmp_path / "state"
    with serve(state_dir) as (process, target, _):
        allowed, failed = asyncio.run(
            load(target, token(state_dir), total=400, workers=8, kill=process)
        )
        assert process.wait(timeout=10) == -signal.SIGKILL
    assert allowed, "the load ran before the kill"
    assert failed > 0, "calls were in flight when the server died"
    audit = state_dir / "audit"
    prefix, broken = verified_prefix(audit, state_dir)
    assert broken is None or broken.problem == "TRUNCATED"  # type: ignore[attr-defined]
    assert allowed <= prefix
    with serve(state_dir) as (_, target, _):  # resumes: cuts a torn line, continues the chain
        again, _ = asyncio.run(load(target, token(state_dir), total=10, workers=2))
    result = verify_log(log_files(audit), load_verification_keys(state_dir))
    assert result.broken is None
    assert result.state.unsealed == 0
    assert (allowed | again) <= verified_prefix(audit, state_dir)[0]


def test_a_full_disk_yields_no_unrecorded_allow(tmp_path: Path) -> None:
    """When the log's file cannot grow, Checks fail UNAVAILABLE, never ALLOW, and errors count.

    The limit holds for every file of the server (RLIMIT_FSIZE), so it is sized for the state
    database and its WAL to fit (the checkpointer starts the WAL over past 1,000 frames, 4 MiB;
    should it fall behind, commits checkpoint themselves at 2,000, 8 MiB): the log fills first.
    """
    state_dir = tmp_path / "state"
    limit = 12 * 1024 * 1024
    with serve(state_dir, file_limit=limit) as (_, target, metrics_port):
        allowed, failed = asyncio.run(load(target, token(state_dir), total=50_000, workers=8))
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as page:
            samples = {
                sample.name: sample.value
                for family in text_string_to_metric_families(page.read().decode())
                for sample in family.samples
                if not sample.labels
            }
    assert failed > 0, "the disk filled up"
    # The metric moves; a call can also fail closed before its audit write once the full disk
    # reaches the state store too (UNAVAILABLE either way), so the two counts need not match.
    assert samples["proviso_audit_write_errors_total"] >= 1
    audit = state_dir / "audit"
    assert sum(path.stat().st_size for path in log_files(audit)) <= limit
    prefix, broken = verified_prefix(audit, state_dir)
    assert broken is None, "a failed batch leaves no partial line behind"
    assert allowed <= prefix
