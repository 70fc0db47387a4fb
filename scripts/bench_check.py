"""Check latency and throughput over real gRPC against a real `proviso serve` process.

A stop-gap until `make bench` lands: it starts the server on loopback with a fresh state
directory (so the audit log is a real file with a real fsync), mints a token with the CLI, then
drives Check from one client process at several concurrency levels for a fixed time and prints
throughput and latency percentiles. It uses only the CLI and the public gRPC API, so the same
script measures any commit.

    .venv/bin/python scripts/bench_check.py [--seconds 5] [--concurrency 1,8,32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from sidecar._proto.proviso.v1 import authorization_service_pb2 as pb
from sidecar._proto.proviso.v1 import authorization_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
PROVISO = [sys.executable, "-m", "sidecar.cli"]
ARGUMENTS = '{"invoice_id": "in_93K2", "amount": 49.00, "currency": "USD", "reason": "bench"}'


def start_server(state_dir: Path) -> tuple[subprocess.Popen[str], str, str]:
    """`proviso serve` on free loopback ports: the process, its gRPC target, its /metrics URL."""
    with socket.socket() as probe:  # the printed metrics address would say port 0
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    process = subprocess.Popen(
        [*PROVISO, "serve", "--policies", str(ROOT / "policies"), "--listen", "127.0.0.1:0",
         "--metrics-listen", f"127.0.0.1:{metrics_port}", "--state-dir", str(state_dir),
         "--log-level", "ERROR"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert process.stdout is not None
    match = re.search(r"serving gRPC on (\S+)", process.stdout.readline())
    metrics = re.search(r"metrics on (\S+)", process.stdout.readline())
    if not match or not metrics:
        process.kill()
        raise SystemExit("the server did not start")
    return process, match.group(1), metrics.group(1)


def audit_share(metrics_url: str) -> dict[str, float]:
    """Mean Check latency and mean audit write latency, from the server's own histograms."""
    with urllib.request.urlopen(metrics_url, timeout=5) as response:  # noqa: S310
        text = response.read().decode()
    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }
    check = (
        values["proviso_check_duration_seconds_sum"]
        / values["proviso_check_duration_seconds_count"]
    )
    audit = (
        values["proviso_audit_write_duration_seconds_sum"]
        / values["proviso_audit_write_duration_seconds_count"]
    )
    return {
        "server_check_mean_ms": round(check * 1000, 3),
        "server_audit_write_mean_ms": round(audit * 1000, 3),
    }


def mint(state_dir: Path) -> str:
    result = subprocess.run(
        [*PROVISO, "token", "issue", "--agent", "billing-resolution-agent@service",
         "--grant", "requestRefund:invoice_id=in_93K2", "--ttl", "15m",
         "--state-dir", str(state_dir)],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return result.stdout.strip()


async def drive(target: str, token: str, concurrency: int, seconds: float) -> list[float]:
    """Latencies (seconds) of every Check answered within the time budget."""
    latencies: list[float] = []
    request = pb.CheckRequest(
        token=token, tool="requestRefund", arguments_json=ARGUMENTS, run_id="bench"
    )
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.AuthorizationServiceStub(channel)
        await stub.Check(request)  # warm up
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                response = await stub.Check(request)
                latencies.append(time.perf_counter() - started)
                assert response.decision == pb.DECISION_ALLOW

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", default="1,8,32")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        state_dir = Path(tmp) / "state"
        process, target, metrics_url = start_server(state_dir)
        try:
            token = mint(state_dir)
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                latencies = sorted(asyncio.run(drive(target, token, concurrency, args.seconds)))
                ms = [x * 1000 for x in latencies]
                results.append(
                    {
                        "concurrency": concurrency,
                        "checks": len(ms),
                        "per_second": round(len(ms) / args.seconds),
                        "p50_ms": round(statistics.median(ms), 3),
                        "p99_ms": round(ms[int(len(ms) * 0.99) - 1], 3),
                    }
                )
                print(json.dumps(results[-1]), flush=True)
            print(json.dumps(audit_share(metrics_url)))
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
        audit = list((state_dir / "audit").glob("*.jsonl"))
        size = sum(path.stat().st_size for path in audit)
        lines = sum(len(path.read_bytes().splitlines()) for path in audit)
        print(json.dumps({"audit_lines": lines, "audit_bytes_per_line": round(size / lines)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
