"""`proviso serve --workers 2`: two processes on one port, one state store, one chain each."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from contextlib import AbstractContextManager
from pathlib import Path

import grpc
import pytest

from sidecar._proto.proviso.v1 import admin_service_pb2 as admin_pb
from sidecar._proto.proviso.v1 import admin_service_pb2_grpc as admin_grpc
from sidecar._proto.proviso.v1 import authorization_service_pb2 as pb
from sidecar._proto.proviso.v1 import authorization_service_pb2_grpc as pb_grpc
from sidecar.audit.files import logs, records
from sidecar.config import DEFAULT_AUDIENCE
from sidecar.identity import DevIdentityProvider
from sidecar.keystore import load_or_create
from tests.conftest import BILLING_AGENT, EXAMPLE_POLICIES, ROOT
from tests.integration.serve_process import PROVISO, ServerProcess, serve_process
from tests.integration.test_check import INVOICE_CONTEXT, refund
from tokens import Grant, issue

CHANNELS = 8
CHECKS_PER_CHANNEL = 10


async def _checks(target: str, token: str, run: str = "") -> list[pb.Decision.ValueType]:
    """Checks over several connections (the kernel spreads connections, not calls): a run of
    their own per connection, or all in ``run``."""

    async def one_channel(c: int) -> list[pb.Decision.ValueType]:
        async with grpc.aio.insecure_channel(
            target, options=[("grpc.use_local_subchannel_pool", 1)]
        ) as channel:
            stub = pb_grpc.AuthorizationServiceStub(channel)
            answers = []
            for i in range(CHECKS_PER_CHANNEL):
                response = await stub.Check(
                    pb.CheckRequest(
                        token=token, tool="requestRefund", arguments_json=refund("10"),
                        context_json=INVOICE_CONTEXT, run_id=run or f"run-{c}",
                        idempotency_key=f"k-{run}-{c}-{i}",
                    ),
                    timeout=10,
                )  # fmt: skip
                answers.append(response.decision)
            return answers

    results = await asyncio.gather(*(one_channel(c) for c in range(CHANNELS)))
    return [decision for answers in results for decision in answers]


def _decisions(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("proviso_decisions_total{")
    )


def _two_workers(state: Path, directory: Path) -> AbstractContextManager[ServerProcess]:
    """``serve --workers 2`` on the example policies, on free ports, logging only errors."""
    return serve_process(
        [
            "--policies", str(EXAMPLE_POLICIES), "--listen", "127.0.0.1:0",
            "--metrics-listen", "127.0.0.1:0", "--state-dir", str(state), "--workers", "2",
            "--log-level", "ERROR",
        ],
        directory=directory, banner_lines=3, stop_timeout=60,
    )  # fmt: skip


def _refund_token(state: Path) -> str:
    """A token of the billing agent for refunds of invoice in_93K2, signed with the state's key."""
    return issue(
        load_or_create(state).active, issuer="proviso", subject=BILLING_AGENT,
        audience="proviso", grants=(Grant("requestRefund", {"invoice_id": "in_93K2"}),),
        ttl_seconds=600, now=int(time.time()),
    )  # fmt: skip


def test_two_workers_share_the_port_the_store_and_stop_together(tmp_path: Path) -> None:
    """Both answer on one port, each keeps its own verifiable chain and metrics, SIGHUP reaches
    them, and SIGTERM stops them all cleanly."""
    state = tmp_path / "state"
    with _two_workers(state, tmp_path) as server:
        lines = server.banner.splitlines(keepends=True)
        match = re.search(r"serving gRPC on (\S+) \(2 worker processes", lines[0])
        assert match, "".join(lines) + server.stderr
        metrics_ports = [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)/metrics", "".join(lines))]
        pids = [int(p) for p in re.findall(r"pid (\d+)", "".join(lines))]
        assert len(metrics_ports) == len(pids) == 2
        token = _refund_token(state)
        answers = asyncio.run(_checks(match.group(1), token))
        assert answers == [pb.DECISION_ALLOW] * (CHANNELS * CHECKS_PER_CHANNEL)
        counted = [_decisions(port) for port in metrics_ports]
        assert sum(counted) == CHANNELS * CHECKS_PER_CHANNEL, counted
        shared = asyncio.run(_checks(match.group(1), token, run="run-shared"))
        assert shared.count(pb.DECISION_ALLOW) == 20, "the run's 20 refunds, across processes"
        assert sum(_decisions(port) for port in metrics_ports) == 2 * len(shared)
        server.process.send_signal(signal.SIGHUP)  # forwarded: a policy reload, not a stop
        time.sleep(0.5)
        assert all(_pid_alive(pid) for pid in pids)
        assert asyncio.run(_checks(match.group(1), token))[0] == pb.DECISION_ALLOW
    assert server.returncode == 0, server.stderr
    assert not any(_pid_alive(pid) for pid in pids), "workers stop with their parent"
    chains = logs(state / "audit")
    assert [files[-1].name for files in chains] == ["decisions.w0.jsonl", "decisions.w1.jsonl"]
    decided = [r for files in chains for r in records(files) if r["kind"] == "decision"]
    assert len(decided) == 3 * CHANNELS * CHECKS_PER_CHANNEL
    verify = subprocess.run(
        [*PROVISO, "audit", "verify", "--state-dir", str(state), "--require-sealed",
         "--format", "json"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr
    report = json.loads(verify.stdout)
    assert report["ok"] is True
    assert len(report["logs"]) == 2
    assert [chain["missing_logs"] for chain in report["logs"]] == [[], []]
    _a_deleted_chain_is_missed(state)


def test_a_worker_whose_audit_chain_breaks_stops_them_all_with_status_1(tmp_path: Path) -> None:
    """Each worker has its own health service, and a probe reaches only one of them: a worker
    whose chain refuses every record (here its file deleted while open) would keep taking its
    share of connections and refuse them all. It exits 1 instead, the supervisor stops the
    other and exits 1, and the process manager restarts the sidecar, which resumes from disk."""
    state = tmp_path / "state"
    with _two_workers(state, tmp_path) as server:
        token = _refund_token(state)
        for chain in (state / "audit").glob("decisions.w*.jsonl"):
            chain.unlink()
        with contextlib.suppress(grpc.aio.AioRpcError):
            asyncio.run(_checks(server.target, token))  # refused: UNAVAILABLE
        deadline = time.monotonic() + 20
        while server.process.poll() is None:
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.1)
    assert server.returncode == 1, server.output()
    assert "a worker exited; stopping the others" in server.stderr, server.output()


def _a_deleted_chain_is_missed(state: Path) -> None:
    """Each worker's signed checkpoints name both chains: one deleted whole is reported."""
    w0, w1 = logs(state / "audit")
    for path in w1:
        path.unlink()
    verify = [*PROVISO, "audit", "verify", "--state-dir", str(state)]
    found = subprocess.run(
        [*verify, "--format", "json"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert found.returncode == 1, found.stdout + found.stderr
    report = json.loads(found.stdout)
    assert (report["ok"], report["missing_logs"]) == (False, ["decisions.w1.jsonl"])
    assert report["break"] is None, "what is there still verifies"
    told = subprocess.run(verify, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert "MISSING: decisions.w1.jsonl" in told.stdout, told.stdout
    assert told.stdout.startswith("INCOMPLETE: "), "never 'ok' while a chain is missing"
    alone = subprocess.run(
        [*verify, str(w0[-1])], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert alone.returncode == 0, "one chain named alone is verified alone"


def test_a_reload_rpc_to_one_worker_reloads_every_worker(tmp_path: Path) -> None:
    """ReloadPolicy reaches one worker; it has the supervisor signal every worker, so no
    worker keeps deciding under the old policy."""
    state, bundle = tmp_path / "state", tmp_path / "policies"
    shutil.copytree(EXAMPLE_POLICIES, bundle)
    with serve_process(
        [
            "--policies", str(bundle), "--listen", "127.0.0.1:0", "--metrics-listen",
            "127.0.0.1:0", "--state-dir", str(state), "--workers", "2", "--watch-interval", "0",
            "--log-level", "ERROR",
        ],
        directory=tmp_path, banner_lines=3, stop_timeout=60,
    ) as server:  # fmt: skip
        match = re.search(r"serving gRPC on (\S+) ", server.banner)
        assert match, server.banner + server.stderr
        target = match.group(1)
        admin = DevIdentityProvider.load(state, DEFAULT_AUDIENCE).mint(
            "olivia@example.com", ("admins",), time.time()
        )
        metadata = (("authorization", f"Bearer {admin}"),)
        before = asyncio.run(_versions(target, metadata))
        assert len(before) == 1, before
        common = bundle / "common.yaml"
        common.write_text(common.read_text() + "\n# a reviewed change\n")
        reloaded = asyncio.run(_reload(target, metadata))
        assert reloaded not in before
        deadline = time.monotonic() + 10
        while (versions := asyncio.run(_versions(target, metadata))) != {reloaded}:
            assert time.monotonic() < deadline, f"workers still at {versions}"
            time.sleep(0.2)


async def _versions(target: str, metadata: tuple[tuple[str, str], ...]) -> set[str]:
    """The policy version each of several connections (spread over the workers) reports."""
    found = set()
    for _ in range(CHANNELS):
        async with grpc.aio.insecure_channel(
            target, options=[("grpc.use_local_subchannel_pool", 1)]
        ) as channel:
            stub = admin_grpc.AdminServiceStub(channel)
            got = await stub.GetPolicy(admin_pb.GetPolicyRequest(), metadata=metadata, timeout=10)
            found.add(got.policy.version)
    return found


async def _reload(target: str, metadata: tuple[tuple[str, str], ...]) -> str:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = admin_grpc.AdminServiceStub(channel)
        response = await stub.ReloadPolicy(
            admin_pb.ReloadPolicyRequest(), metadata=metadata, timeout=10
        )
        return response.policy.version


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/status").read_text().count("State:\tZ")


def _serve_on(port: int, workers: int, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *PROVISO, "serve", "--policies", str(EXAMPLE_POLICIES),
            "--listen", f"127.0.0.1:{port}", "--metrics-listen", "127.0.0.1:0",
            "--state-dir", str(tmp_path / f"state-{workers}"), "--workers", str(workers),
            "--log-level", "ERROR",
        ],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip


def test_a_port_held_by_another_sidecars_workers_is_refused(tmp_path: Path) -> None:
    """Another sidecar's workers listen with SO_REUSEPORT, which would let new workers join
    their port and split calls between two servers: serve refuses instead."""
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        result = _serve_on(port, 2, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"127.0.0.1:{port} is in use by another process" in result.stderr
    assert "serving gRPC" not in result.stdout


def test_a_single_worker_on_a_taken_port_exits_instead_of_hanging(tmp_path: Path) -> None:
    """The bind failure stops serve at once (it used to wait forever stopping an HTTP
    server that never started)."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        started = time.monotonic()
        result = _serve_on(port, 1, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert time.monotonic() - started < 30
    assert "serving gRPC" not in result.stdout


def test_a_taken_port_is_named_in_one_line(tmp_path: Path) -> None:
    """A taken gRPC port (one worker: no SO_REUSEPORT) or metrics port stops serve with one
    line naming the flag and the address, not grpc's RuntimeError traceback or a bare
    "Address already in use" that does not say which listener."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        grpc_taken = _serve_on(port, 1, tmp_path)
        metrics_taken = subprocess.run(
            [
                *PROVISO, "serve", "--policies", str(EXAMPLE_POLICIES),
                "--listen", "127.0.0.1:0", "--metrics-listen", f"127.0.0.1:{port}",
                "--state-dir", str(tmp_path / "state-m"), "--workers", "1",
                "--log-level", "ERROR",
            ],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False,
        )  # fmt: skip
    for result, flag in ((grpc_taken, "--listen"), (metrics_taken, "--metrics-listen")):
        assert result.returncode == 1, result.stdout + result.stderr
        assert "Traceback" not in result.stderr, result.stderr
        assert f"proviso: cannot start: {flag} 127.0.0.1:{port}: " in result.stderr, result.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_prints_the_metrics_port_it_bound_and_says_when_it_stopped(
    tmp_path: Path, workers: str
) -> None:
    """With ``--metrics-listen HOST:0`` the banner names the port really bound (one per
    worker), and after SIGTERM the last line says the server stopped, whatever the workers."""
    with serve_process(
        [
            "--policies", str(EXAMPLE_POLICIES), "--listen", "127.0.0.1:0",
            "--metrics-listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "state"),
            "--workers", workers, "--log-level", "ERROR",
        ],
        directory=tmp_path, banner_lines=int(workers) + 1, stop_timeout=60,
    ) as server:  # fmt: skip
        ports = [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)/metrics", server.banner)]
        assert len(ports) == int(workers), server.banner
        assert 0 not in ports, server.banner
        assert all(_decisions(port) == 0 for port in ports)  # each one serves /metrics
    assert server.returncode == 0, server.output()
    assert server.stdout.splitlines()[-1] == "proviso: stopped", server.output()


@pytest.mark.parametrize("chain", ["decisions.w1.jsonl", "decisions.jsonl", "decisions.w3.jsonl"])
def test_workers_refuse_before_touching_the_store_while_another_server_writes_there(
    tmp_path: Path, chain: str
) -> None:
    """Another server writes a chain in the audit directory (worker 1's; a single server's;
    worker 3's of a server with more workers): serve --workers 2 refuses before it migrates
    the state store (that server, maybe an older proviso, could not restart on a store of a
    newer schema)."""
    state = tmp_path / "state-2"
    (state / "audit").mkdir(parents=True)
    holder = os.open(state / "audit" / f"{chain}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        result = _serve_on(port, 2, tmp_path)
    finally:
        os.close(holder)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "not serving" in result.stderr
    assert chain in result.stderr
    assert not (state / "state.db").exists(), "the store was not created (nor migrated)"
