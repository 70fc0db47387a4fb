"""One load-generator process: a grpc.aio channel, in a closed or an open loop.

Closed loop (``rate`` 0): each of ``concurrency`` coroutines sends a call, waits for the answer
and sends the next, so throughput is what the server sustains at that concurrency. Open loop
(``rate`` above 0): calls are sent at random times, ``rate`` a second on average (Poisson
arrivals, as independent agents make them), whether or not earlier ones were answered: the
latency a given load sees. Only calls that start inside the measured window count; the warm-up
window before it is discarded.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import grpc

from bench.workload import CHECK_METHOD, NOOP_METHOD, base_request, request_bytes
from sidecar._proto.proviso.v1 import authorization_service_pb2 as authz_pb

SCENARIO_METHODS = {"noop": NOOP_METHOD, "check": CHECK_METHOD}
BARRIER_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 10.0
NS_PER_S = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Plan:
    """What one client process does; picklable, so it crosses the process boundary."""

    worker: int
    target: str
    token: str
    scenarios: tuple[str, ...]
    concurrency: int
    warmup_s: float
    seconds: float
    rpc_timeout_s: float
    server_pids: tuple[int, ...] = ()  # set for one client only: it samples the server's CPU
    rate: float = 0.0  # calls a second in an open loop; 0: a closed loop of ``concurrency``


@dataclass(slots=True)
class WorkerResult:
    """One process's measurements for one scenario (latencies of correct answers only)."""

    worker: int
    scenario: str
    latencies_ns: list[int] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    window_ns: int = 0
    client_cpu_s: float = 0.0
    server_cpu_s: float | None = None
    failure: str = ""


def _verdict(scenario: str, response: Any) -> str | None:
    """None when the answer is the expected one, else a short description of what came back."""
    if scenario == "noop":
        return None if response == b"" else "unexpected no-op response"
    decision = response.decision
    if decision == authz_pb.DECISION_ALLOW:
        return None
    codes = ",".join(authz_pb.ReasonCode.Name(r.code) for r in response.reasons)
    return f"{authz_pb.Decision.Name(decision)} ({codes})"


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of a process (all its threads), or None without /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()  # the command name may contain spaces
        ticks = int(fields[11]) + int(fields[12])  # utime and stime, fields 14 and 15
    except (OSError, IndexError, ValueError):
        return None
    return ticks / os.sysconf("SC_CLK_TCK")


def _server_cpu(pids: tuple[int, ...]) -> float | None:
    """CPU used so far by every server process, or None without /proc (or without pids)."""
    if not pids:
        return None
    total = 0.0
    for pid in pids:
        used = cpu_seconds(pid)
        if used is None:
            return None
        total += used
    return total


async def _sample_cpu(plan: Plan, result: WorkerResult, start_ns: int, end_ns: int) -> None:
    """CPU used by this process, and by the server if ours to sample, during the window.

    Throughput alone cannot say who ran out of CPU; these figures can.
    """
    await asyncio.sleep(max(0, start_ns - time.perf_counter_ns()) / NS_PER_S)
    client_before = time.process_time()
    server_before = _server_cpu(plan.server_pids)
    await asyncio.sleep(max(0, end_ns - time.perf_counter_ns()) / NS_PER_S)
    result.client_cpu_s = time.process_time() - client_before
    server_after = _server_cpu(plan.server_pids)
    if server_before is not None and server_after is not None:
        result.server_cpu_s = server_after - server_before


async def drive(plan: Plan, scenario: str) -> WorkerResult:
    """Warm up, then measure one scenario for ``plan.seconds``."""
    result = WorkerResult(worker=plan.worker, scenario=scenario)
    deserialize = (lambda raw: raw) if scenario == "noop" else authz_pb.CheckResponse.FromString
    base = base_request(plan.token)
    async with grpc.aio.insecure_channel(plan.target) as channel:
        try:
            await asyncio.wait_for(channel.channel_ready(), CONNECT_TIMEOUT_S)
        except TimeoutError:
            raise ConnectionError(f"no connection to {plan.target} within 10 s") from None
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, Any] = channel.unary_unary(
            SCENARIO_METHODS[scenario], response_deserializer=deserialize
        )
        started = time.perf_counter_ns()
        measure_from = started + int(plan.warmup_s * NS_PER_S)
        measure_until = measure_from + int(plan.seconds * NS_PER_S)
        result.window_ns = measure_until - measure_from
        prefix = f"bench-{os.getpid()}-{scenario}"

        async def send(key: str, count: int) -> None:
            """One call, timed from when it is sent (counted if sent inside the window)."""
            start = time.perf_counter_ns()
            request = request_bytes(base, key, count)
            try:
                response = await call(request, timeout=plan.rpc_timeout_s)
            except grpc.aio.AioRpcError as exc:
                problem: str | None = f"{exc.code().name}: {exc.details()}"
            else:
                problem = _verdict(scenario, response)
            finished = time.perf_counter_ns()
            if start < measure_from:
                return
            if problem is None:
                result.latencies_ns.append(finished - start)
            else:
                result.errors[problem] += 1

        async def closed_loop(slot: int) -> None:
            sent = 0
            while time.perf_counter_ns() < measure_until:
                sent += 1
                await send(f"{prefix}-{slot}-{sent}", sent)

        loops = (
            [_poisson(send, prefix, plan, started, measure_until)]
            if plan.rate
            else [closed_loop(slot) for slot in range(plan.concurrency)]
        )
        await asyncio.gather(_sample_cpu(plan, result, measure_from, measure_until), *loops)
    return result


async def _poisson(
    send: Callable[[str, int], Awaitable[None]],
    prefix: str,
    plan: Plan,
    start_ns: int,
    until_ns: int,
) -> None:
    """Send calls at random times, ``plan.rate`` a second on average, until ``until_ns``,
    without waiting for answers; then wait for the answers."""
    arrivals = random.Random(plan.worker)  # noqa: S311 - a load schedule, not a secret
    in_flight: set[asyncio.Task[None]] = set()
    due, sent = start_ns, 0
    while True:
        due += int(arrivals.expovariate(plan.rate) * NS_PER_S)
        if due >= until_ns:
            break
        await asyncio.sleep(max(0, due - time.perf_counter_ns()) / NS_PER_S)
        sent += 1
        task = asyncio.create_task(send(f"{prefix}-{sent}", sent))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    await asyncio.gather(*in_flight)


def worker_main(plan: Plan, barrier: Barrier, results: Queue[WorkerResult]) -> None:
    """Run every scenario in order, starting each in step with the other client processes.

    SIGINT is ignored: on Ctrl-C the parent stops us, so there is one shutdown path.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    for scenario in plan.scenarios:
        if parent is not None and not parent.is_alive():
            return  # the parent was killed: no one would read the results
        barrier.wait(BARRIER_TIMEOUT_S)
        try:
            result = asyncio.run(drive(plan, scenario))
        except Exception as exc:  # reported to the parent, which fails the run
            result = WorkerResult(worker=plan.worker, scenario=scenario, failure=repr(exc))
        results.put(result)
        if result.failure:
            return
