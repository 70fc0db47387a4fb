"""``make bench``: Check over real gRPC beside a no-op on the same server, then the engine alone.

Starts ``python -m bench.server`` (a real sidecar plus a no-op method, with 1 and then 2 worker
processes), drives each scenario with h2load (a C load generator) at several in-flight levels
for a fixed time, checks on the server's metrics that every Check was answered ALLOW, adds a
second view from Python gRPC clients and a third, open loop (calls at a fixed rate: the latency
a given load sees), prints a table, and writes bench/results.json.
Settings come from flags, then BENCH_* environment variables, then defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import queue
import select
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families

from bench import engine, h2load
from bench.load import SCENARIO_METHODS, Plan, WorkerResult, cpu_seconds, worker_main
from bench.stats import NS_PER_MS, NS_PER_US, Summary
from bench.workload import EXAMPLE_POLICIES, ROOT, bench_bundle, grpc_frame, h2load_request
from sidecar.errors import PolicyLoadError

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
SERVER_START_TIMEOUT_S = 30.0
SERVER_STOP_TIMEOUT_S = 10.0
RESULT_SLACK_S = 60.0
SCENARIOS = ("noop", "check")
LABELS = {"noop": "no-op", "check": "Check"}
MAX_CONNECTIONS = 16
DEFAULT_OUTPUT = ROOT / "bench" / "results.json"


class BenchError(Exception):
    """The benchmark could not run; the message says why."""


@dataclass(frozen=True, slots=True)
class Config:
    """Everything one run needs; recorded in results.json next to the figures."""

    seconds: float
    warmup_s: float
    in_flight: tuple[int, ...]
    workers: tuple[int, ...]
    python_in_flight: int
    open_rates: tuple[int, ...]
    clients: int
    rpc_timeout_s: float
    engine_iterations: int
    verify_iterations: int
    policies: Path
    output: Path

    def split(self, in_flight: int) -> list[int]:
        """In-flight calls per Python client process, summing to ``in_flight``."""
        clients = min(self.clients, in_flight)
        share, extra = divmod(in_flight, clients)
        return [share + (1 if index < extra else 0) for index in range(clients)]


def layout(in_flight: int) -> tuple[int, int]:
    """h2load connections and streams per connection for ``in_flight`` calls in flight.

    Up to MAX_CONNECTIONS connections, one stream each, then more streams per connection: with
    several worker processes the kernel spreads connections (not streams) over them, so a
    handful of connections would leave the load unevenly spread.
    """
    connections = min(in_flight, MAX_CONNECTIONS)
    streams, rest = divmod(in_flight, connections)
    if rest:
        raise ValueError(f"{in_flight} calls in flight do not split over {connections} connections")
    return connections, streams


def _positive(kind: type[int] | type[float]) -> Any:
    """An argparse type that refuses zero and negative numbers."""

    def parse(text: str) -> int | float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above zero, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _levels(text: str) -> tuple[int, ...]:
    """A comma-separated list of positive integers that h2load can lay out."""
    try:
        values = tuple(int(part) for part in text.split(","))
        for value in values:
            if value <= 0:
                raise ValueError
            layout(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected positive integers, comma-separated, each at most {MAX_CONNECTIONS} or "
            f"a multiple of it, got {text!r}"
        ) from None
    return values


def _rates(text: str) -> tuple[int, ...]:
    """A comma-separated list of positive calls-a-second figures, or 'none'."""
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = (0,)
    if any(value <= 0 for value in values):
        raise argparse.ArgumentTypeError(
            f"expected positive integers, comma-separated, or 'none', got {text!r}"
        )
    return values


def parse_config(argv: Sequence[str] | None, env: Mapping[str, str]) -> Config:
    """Flags win over BENCH_* variables, which win over the defaults."""
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    pos_int, pos_float = _positive(int), _positive(float)

    bad_env: dict[str, str] = {}  # argparse dest -> problem, reported only if no flag wins

    def option(flag: str, kind: Any, env_name: str, default: str, text: str) -> None:
        value = env.get(env_name, default)
        try:
            initial = kind(value)
        except (ValueError, argparse.ArgumentTypeError):
            bad_env[flag.lstrip("-").replace("-", "_")] = f"{env_name}={value!r}: not valid"
            initial = None
        parser.add_argument(
            flag, type=kind, default=initial, help=f"{text} (${env_name}, default {default})"
        )

    option("--seconds", pos_float, "BENCH_SECONDS", "4", "measured seconds per scenario")
    option("--warmup", pos_float, "BENCH_WARMUP", "1", "discarded seconds before each")
    option("--in-flight", _levels, "BENCH_IN_FLIGHT", "1,16,64", "calls in flight (h2load)")
    option("--workers", _levels, "BENCH_WORKERS", "1,2", "server worker processes to compare")
    option("--python-in-flight", pos_int, "BENCH_PYTHON_IN_FLIGHT", "16", "Python clients' load")
    option("--open-rates", _rates, "BENCH_OPEN_RATES", "300,1000", "open-loop calls/s, or none")
    option("--clients", pos_int, "BENCH_CLIENTS", "2", "Python client processes")
    option("--rpc-timeout", pos_float, "BENCH_RPC_TIMEOUT", "5", "deadline of every call, s")
    option("--engine-iterations", pos_int, "BENCH_ENGINE_ITERATIONS", "20000", "evaluate calls")
    option("--verify-iterations", pos_int, "BENCH_VERIFY_ITERATIONS", "5000", "verify calls")
    parser.add_argument("--policies", type=Path, default=EXAMPLE_POLICIES)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    problems = [problem for dest, problem in bad_env.items() if getattr(args, dest) is None]
    if problems:
        parser.error("; ".join(problems))
    return Config(
        seconds=args.seconds,
        warmup_s=args.warmup,
        in_flight=args.in_flight,
        workers=args.workers,
        python_in_flight=args.python_in_flight,
        open_rates=args.open_rates,
        clients=args.clients,
        rpc_timeout_s=args.rpc_timeout,
        engine_iterations=args.engine_iterations,
        verify_iterations=args.verify_iterations,
        policies=args.policies,
        output=args.output,
    )


# ---------------------------------------------------------------- the server process


@dataclass(frozen=True, slots=True)
class Server:
    """The running server process and what it announced."""

    process: subprocess.Popen[bytes]
    workers: int
    port: int
    token: str
    pids: tuple[int, ...]
    metrics_ports: tuple[int, ...]
    log: Path

    def cpu_seconds(self) -> float | None:
        """CPU used so far by every worker process (None without /proc)."""
        total = 0.0
        for pid in self.pids:
            used = cpu_seconds(pid)
            if used is None:
                return None
            total += used
        return total

    def decisions(self) -> Counter[str]:
        """Decisions so far, by decision (ALLOW, DENY…), summed over every worker."""
        counts: Counter[str] = Counter()
        for port in self.metrics_ports:
            url = f"http://127.0.0.1:{port}/metrics"
            with urllib.request.urlopen(url, timeout=10) as response:
                text = response.read().decode()
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == "proviso_decisions_total":
                        counts[sample.labels["decision"]] += int(sample.value)
                    elif sample.name == "proviso_checks_rejected_total":
                        counts["RESOURCE_EXHAUSTED"] += int(sample.value)
        return counts


def _tail(path: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def _read_ready_line(process: subprocess.Popen[bytes], timeout_s: float) -> bytes:
    """The server's first stdout line, or b"" if it exits or stays silent too long."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout_s
    while (remaining := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([process.stdout], [], [], min(remaining, 0.2))
        if readable:
            return process.stdout.readline()
        if process.poll() is not None:
            return b""
    return b""


@contextlib.contextmanager
def running_server(
    policies: Path, state_dir: Path, token_ttl: int, workers: int
) -> Iterator[Server]:
    """Start the server process and always stop it, whatever happens inside the block.

    Raises:
        BenchError: it did not announce itself within SERVER_START_TIMEOUT_S.
    """
    log = state_dir.parent / f"server-w{workers}.log"
    command = [
        sys.executable,
        "-m",
        "bench.server",
        "--state-dir",
        str(state_dir),
        "--policies",
        str(policies),
        "--token-ttl",
        str(token_ttl),
        "--workers",
        str(workers),
    ]
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdin=subprocess.PIPE,  # closing it tells the server to stop, even if we die
            stdout=subprocess.PIPE,
            stderr=log_file,
        )
    try:
        line = _read_ready_line(process, SERVER_START_TIMEOUT_S)
        try:
            ready = json.loads(line)
            server = Server(
                process,
                workers,
                int(ready["port"]),
                str(ready["token"]),
                tuple(int(pid) for pid in ready["pids"]),
                tuple(int(port) for port in ready["metrics_ports"]),
                log,
            )
        except (ValueError, KeyError, TypeError):
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(SERVER_STOP_TIMEOUT_S)  # closed stdout: it is probably exiting
            status = process.poll()
            why = "timed out" if status is None else f"exited with status {status}"
            raise BenchError(f"the server did not start ({why}):\n{_tail(log)}") from None
        yield server
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Ask politely (close stdin, then SIGTERM), then kill: never leave the server behind."""
    with contextlib.suppress(OSError):
        if process.stdin is not None:
            process.stdin.close()
    for escalate in (None, process.terminate, process.kill):
        if escalate is not None:
            with contextlib.suppress(OSError):
                escalate()
        try:
            process.wait(SERVER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            continue
        break
    if process.stdout is not None:
        process.stdout.close()


# ---------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class ScenarioResult:
    """One scenario at one in-flight level: throughput, latency, CPU, and whether it was right."""

    name: str
    in_flight: int
    calls: int
    window_s: float
    latency: Summary | None
    errors: Counter[str]
    server_cpu_s: float | None
    client_cpu_s: float | None = None
    layout: str = ""
    offered_per_s: int = 0  # an open loop's rate (then ``in_flight`` is 0)

    @property
    def calls_per_s(self) -> float:
        return self.calls / self.window_s

    @property
    def load(self) -> str:
        """The load it ran under, as the report's first column shows it."""
        if self.offered_per_s:
            return f"{self.offered_per_s}/s Poisson"
        return f"{self.in_flight} ({self.layout})"

    def server_us_per_call(self) -> float | None:
        if self.server_cpu_s is None or not self.calls:
            return None
        return self.server_cpu_s / self.calls * 1e6

    def to_json(self) -> dict[str, Any]:
        figures: dict[str, Any] = {
            "in_flight": self.in_flight,
            **({"offered_per_s": self.offered_per_s} if self.offered_per_s else {}),
            "layout": self.layout,
            "calls": self.calls,
            "calls_per_s": round(self.calls_per_s, 1),
            "latency_ms": self.latency.in_units(NS_PER_MS) if self.latency else None,
            "errors": sum(self.errors.values()),
            "error_kinds": dict(self.errors),
            "window_s": round(self.window_s, 3),
            "server_cpu_cores": None
            if self.server_cpu_s is None
            else round(self.server_cpu_s / self.window_s, 3),
            "server_us_per_call": _round(self.server_us_per_call(), 1),
        }
        if self.client_cpu_s is not None:
            figures["clients_cpu_cores"] = round(self.client_cpu_s / self.window_s, 3)
        return figures


@dataclass(slots=True)
class Level:
    """The no-op and Check results at one in-flight level (or one open-loop rate)."""

    in_flight: int
    results: dict[str, ScenarioResult] = field(default_factory=dict)
    offered_per_s: int = 0  # an open loop's rate (then ``in_flight`` is 0)

    @property
    def key(self) -> str:
        """How results.json names it."""
        return f"{self.offered_per_s}/s" if self.offered_per_s else str(self.in_flight)

    def ratios(self) -> dict[str, float | None]:
        """Check relative to the no-op: throughput kept; growth of latency and server CPU/call."""
        check, noop = self.results["check"], self.results["noop"]
        figures: dict[str, float | None] = {
            "throughput": _ratio(check.calls_per_s, noop.calls_per_s),
            "p50": None,
            "p99": None,
            "server_cpu_per_call": _ratio(check.server_us_per_call(), noop.server_us_per_call()),
        }
        if check.latency is not None and noop.latency is not None:
            figures["p50"] = _ratio(check.latency.p50_ns, noop.latency.p50_ns)
            figures["p99"] = _ratio(check.latency.p99_ns, noop.latency.p99_ns)
        return figures


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


# ---------------------------------------------------------------- h2load


def _expected(
    scenario: str, before: Counter[str], after: Counter[str], run: h2load.Run
) -> Counter[str]:
    """What went wrong, judged on the server's own counters.

    Check must add nothing but ALLOW decisions, at least one per answer h2load received, and at
    most one per request it started (the calls still in flight when h2load stops are answered
    by the server but not counted by h2load). The no-op must add nothing at all.
    """
    delta = Counter({key: after[key] - before[key] for key in after if after[key] != before[key]})
    errors: Counter[str] = Counter()
    allowed = delta.pop("ALLOW", 0)
    for kind, count in delta.items():
        errors[f"server counted {kind}"] += count
    if scenario == "check" and not run.succeeded <= allowed <= run.started:
        errors[f"server counted {allowed} ALLOW for {run.succeeded} answers"] += abs(
            run.succeeded - allowed
        )
    if scenario == "noop" and allowed:
        errors["server counted ALLOW during the no-op"] += allowed
    return errors


def h2load_level(
    config: Config, server: Server, tool: str, bodies: Mapping[str, Path], in_flight: int
) -> Level:
    """Both scenarios at one in-flight level: a warm-up run, then the measured run."""
    connections, streams = layout(in_flight)
    level = Level(in_flight)
    for scenario in SCENARIOS:
        url = f"http://127.0.0.1:{server.port}{SCENARIO_METHODS[scenario]}"

        def drive(seconds: float, url: str = url, body: Path = bodies[scenario]) -> h2load.Run:
            return h2load.run(
                tool,
                url,
                body,
                connections=connections,
                streams=streams,
                seconds=seconds,
                timeout_s=config.rpc_timeout_s + 30,
            )

        drive(config.warmup_s)
        before, cpu_before = server.decisions(), server.cpu_seconds()
        measured = drive(config.seconds)
        cpu_after, after = server.cpu_seconds(), server.decisions()
        errors = _expected(scenario, before, after, measured)
        if measured.failed:
            errors["h2load: failed or errored requests"] += measured.failed
        latencies = [micros * NS_PER_US for micros in measured.latencies_us]
        level.results[scenario] = ScenarioResult(
            name=scenario,
            in_flight=in_flight,
            calls=measured.succeeded,
            window_s=config.seconds,
            latency=Summary.of(latencies) if latencies else None,
            errors=errors,
            server_cpu_s=None
            if cpu_before is None or cpu_after is None
            else cpu_after - cpu_before,
            layout=f"{connections}x{streams}",
        )
        print(
            f"  workers={server.workers} in flight {in_flight:>3} {LABELS[scenario]:<6} "
            f"{measured.calls_per_s:8.0f}/s",
            file=sys.stderr,
        )
    return level


# ---------------------------------------------------------------- Python clients


def python_level(config: Config, server: Server, in_flight: int) -> Level:
    """Both scenarios from Python grpc.aio client processes, ``in_flight`` calls at a time.

    Raises:
        BenchError: a client process failed or did not report in time.
    """
    plans = [
        _plan(config, server, index, concurrency=share)
        for index, share in enumerate(config.split(in_flight))
    ]
    level = Level(in_flight)
    for name, parts in _run_clients(config, server, plans).items():
        level.results[name] = merge(name, in_flight, parts)
    return level


def open_level(config: Config, server: Server, rate: int) -> Level:
    """Both scenarios at ``rate`` calls a second (Poisson arrivals, split over the client
    processes): latency at a given load, not the most the server can take.

    Raises:
        BenchError: a client process failed or did not report in time.
    """
    clients = config.clients
    plans = [
        _plan(config, server, index, concurrency=0, rate=rate / clients) for index in range(clients)
    ]
    level = Level(0, offered_per_s=rate)
    for name, parts in _run_clients(config, server, plans).items():
        level.results[name] = merge(name, 0, parts, offered_per_s=rate)
    return level


def _plan(
    config: Config, server: Server, index: int, *, concurrency: int, rate: float = 0.0
) -> Plan:
    return Plan(
        worker=index,
        target=f"127.0.0.1:{server.port}",
        token=server.token,
        scenarios=SCENARIOS,
        concurrency=concurrency,
        warmup_s=config.warmup_s,
        seconds=config.seconds,
        rpc_timeout_s=config.rpc_timeout_s,
        server_pids=server.pids if index == 0 else (),
        rate=rate,
    )


def _run_clients(
    config: Config, server: Server, plans: Sequence[Plan]
) -> dict[str, list[WorkerResult]]:
    """Run one client process per plan, every scenario in step; always stops them.

    Raises:
        BenchError: a client process failed or did not report in time.
    """
    context = multiprocessing.get_context("spawn")  # grpc does not survive fork
    barrier = context.Barrier(len(plans))
    results: Queue[WorkerResult] = context.Queue()
    workers = [
        context.Process(
            target=worker_main,
            args=(plan, barrier, results),
            name=f"bench-client-{plan.worker}",
            daemon=True,
        )
        for plan in plans
    ]
    collected: dict[str, list[WorkerResult]] = {name: [] for name in SCENARIOS}
    expected = len(SCENARIOS) * len(workers)
    per_scenario = config.warmup_s + config.seconds + config.rpc_timeout_s
    deadline = time.monotonic() + len(SCENARIOS) * per_scenario + RESULT_SLACK_S
    try:
        for worker in workers:
            worker.start()
        for received in range(expected):
            result = _next_result(results, workers, server, deadline, received)
            if result.failure:
                raise BenchError(f"client {result.worker} failed: {result.failure}")
            collected[result.scenario].append(result)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
        for worker in workers:
            worker.join(SERVER_STOP_TIMEOUT_S)
            if worker.is_alive():
                worker.kill()
                worker.join()
        results.close()
    return collected


def merge(
    name: str, in_flight: int, parts: Sequence[WorkerResult], *, offered_per_s: int = 0
) -> ScenarioResult:
    """Pool every process's samples: calls/s is the sum, percentiles are over all calls."""
    latencies = [value for part in parts for value in part.latencies_ns]
    errors: Counter[str] = Counter()
    for part in parts:
        errors.update(part.errors)
    server_cpu = [part.server_cpu_s for part in parts if part.server_cpu_s is not None]
    return ScenarioResult(
        name=name,
        in_flight=in_flight,
        calls=len(latencies),
        window_s=max(part.window_ns for part in parts) / 1e9,
        latency=Summary.of(latencies) if latencies else None,
        errors=errors,
        server_cpu_s=server_cpu[0] if server_cpu else None,
        client_cpu_s=sum(part.client_cpu_s for part in parts),
        layout=f"{len(parts)} processes",
        offered_per_s=offered_per_s,
    )


def _next_result(
    results: Queue[WorkerResult],
    workers: Sequence[BaseProcess],
    server: Server,
    deadline: float,
    got: int,
) -> WorkerResult:
    """Wait for the next report, failing fast if a client or the server died, not hanging."""
    while time.monotonic() < deadline:
        with contextlib.suppress(queue.Empty):  # nothing yet: check everyone is alive
            return results.get(timeout=0.5)
        status = server.process.poll()
        if status is not None:
            raise BenchError(f"the server exited with status {status}:\n{_tail(server.log)}")
        dead = [w for w in workers if w.exitcode not in (None, 0)]
        if dead:
            raise BenchError(f"{dead[0].name} exited with status {dead[0].exitcode}")
    raise BenchError(f"timed out waiting for client results ({got} received)")


# ---------------------------------------------------------------- the report


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _header(load: str = "in flight") -> str:
    return (
        f"  {load:<18}{'':<8}{'calls/s':>9}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
        f"{'p99.9 ms':>10}{'server us/call':>16}{'errors':>8}"
    )


HEADER = _header()


def _level_lines(level: Level) -> list[str]:
    lines = []
    for name in SCENARIOS:
        result = level.results[name]
        ms = result.latency.in_units(NS_PER_MS) if result.latency else {}
        lines.append(
            f"  {result.load:<18}{LABELS[name]:<8}{result.calls_per_s:>9.0f}"
            f"{_fmt(ms.get('p50'), '.2f'):>9}{_fmt(ms.get('p90'), '.2f'):>9}"
            f"{_fmt(ms.get('p99'), '.2f'):>9}{_fmt(ms.get('p99.9'), '.2f'):>10}"
            f"{_fmt(result.server_us_per_call(), '.0f'):>16}{sum(result.errors.values()):>8}"
        )
    ratio = level.ratios()
    lines.append(
        f"  {'':<18}Check / no-op: throughput x{_fmt(ratio['throughput'], '.2f')}, "
        f"p50 x{_fmt(ratio['p50'], '.2f')}, p99 x{_fmt(ratio['p99'], '.2f')}, "
        f"server CPU/call x{_fmt(ratio['server_cpu_per_call'], '.2f')}"
    )
    return lines


@dataclass(slots=True)
class Results:
    """Everything measured in one run."""

    h2load_version: str | None
    h2load: dict[int, list[Level]] = field(default_factory=dict)  # by worker count
    python: dict[int, list[Level]] = field(default_factory=dict)
    open_loop: dict[int, list[Level]] = field(default_factory=dict)
    in_process: engine.InProcess | None = None

    def views(self) -> tuple[tuple[str, dict[int, list[Level]]], ...]:
        return (("h2load", self.h2load), ("Python", self.python), ("open loop", self.open_loop))


def report(config: Config, results: Results) -> str:
    """The human-readable table."""
    lines = [
        f"Proviso bench: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"grpcio {grpc.__version__}, load generator "
        f"{'h2load ' + results.h2load_version if results.h2load_version else 'Python clients'}",
        f"{config.warmup_s:g} s warm-up + {config.seconds:g} s measured per scenario; "
        "requestRefund 49.00 USD -> ALLOW (tier auto), durable audit; no-op = same server, "
        "same request bytes",
    ]
    for workers, levels in results.h2load.items():
        lines += ["", f"h2load, workers={workers}", HEADER]
        for level in levels:
            lines += _level_lines(level)
    for workers, levels in results.python.items():
        lines += [
            "",
            f"Python grpc.aio clients ({config.clients} processes, unique idempotency key and "
            f"run per call: the write path), workers={workers}",
            HEADER,
        ]
        for level in levels:
            lines += _level_lines(level)
    for workers, levels in results.open_loop.items():
        lines += [
            "",
            f"Python grpc.aio clients, open loop ({config.clients} processes, Poisson arrivals, "
            f"each call timed from when it is sent; write path), workers={workers}",
            _header("offered"),
        ]
        for level in levels:
            lines += _level_lines(level)
    if results.in_process is not None:
        lines += [
            "",
            f"{'in-process, one call':<40}{'p50 us':>9}{'p99 us':>9}{'mean us':>9}{'n':>8}",
        ]
        for label, summary in (
            ("engine evaluate(policy, call, claims)", results.in_process.evaluate),
            ("tokens.verify (a token not seen before)", results.in_process.verify),
            ("token cache hit (a token reused)", results.in_process.verify_cached),
        ):
            us = summary.in_units(NS_PER_US)
            lines.append(
                f"  {label:<38}{us['p50']:>9.1f}{us['p99']:>9.1f}{us['mean']:>9.1f}"
                f"{summary.count:>8}"
            )
    return "\n".join(lines)


def _levels_json(levels: Sequence[Level]) -> dict[str, Any]:
    return {
        level.key: {
            **{name: result.to_json() for name, result in level.results.items()},
            "ratios_check_over_noop": {
                key: _round(value, 3) for key, value in level.ratios().items()
            },
        }
        for level in levels
    }


def results_json(config: Config, results: Results) -> dict[str, Any]:
    """Everything printed, plus the machine and settings needed to compare runs."""
    settings = {
        "seconds": config.seconds,
        "warmup_s": config.warmup_s,
        "in_flight": list(config.in_flight),
        "h2load_layouts": {str(n): "x".join(map(str, layout(n))) for n in config.in_flight},
        "workers": list(config.workers),
        "python_in_flight": config.python_in_flight,
        "open_rates": list(config.open_rates),
        "python_clients": config.clients,
        "rpc_timeout_s": config.rpc_timeout_s,
        "policies": str(config.policies),
        "scenarios": {name: SCENARIO_METHODS[name] for name in SCENARIOS},
    }
    in_process = results.in_process
    return {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "platform": platform.platform(),
            "grpcio": grpc.__version__,
            "h2load": results.h2load_version,
        },
        "settings": settings,
        "h2load": {
            f"workers={workers}": _levels_json(levels) for workers, levels in results.h2load.items()
        },
        "python_clients": {
            f"workers={workers}": _levels_json(levels) for workers, levels in results.python.items()
        },
        "open_loop": {
            f"workers={workers}": _levels_json(levels)
            for workers, levels in results.open_loop.items()
        },
        "in_process_us": None
        if in_process is None
        else {
            "evaluate": {
                "iterations": in_process.evaluate.count,
                **in_process.evaluate.in_units(NS_PER_US),
            },
            "token_verify": {
                "iterations": in_process.verify.count,
                **in_process.verify.in_units(NS_PER_US),
            },
            "token_cache_hit": {
                "iterations": in_process.verify_cached.count,
                **in_process.verify_cached.in_units(NS_PER_US),
            },
        },
    }


# ---------------------------------------------------------------- main


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM unwinds like Ctrl-C, so every ``finally`` stops the processes we started."""
    raise KeyboardInterrupt


def _warn_no_h2load() -> None:
    print(
        "\n"
        "************************************************************************\n"
        "* WARNING: h2load (Debian package nghttp2-client) is not installed.    *\n"
        "* Falling back to Python gRPC clients for every figure. They cost as   *\n"
        "* much CPU per call as the server, so on a small machine they hide the *\n"
        "* server's own cost: the throughput figures and ratios are NOT         *\n"
        "* comparable with h2load runs. `make bench` installs it when it can.   *\n"
        "************************************************************************",
        file=sys.stderr,
    )


def bench(config: Config) -> int:
    """Run everything; return the exit status."""
    tool = h2load.find()
    results = Results(h2load_version=h2load.version(tool) if tool else None)
    if tool is None:
        _warn_no_h2load()
    print("engine, in-process ...", file=sys.stderr)
    results.in_process = engine.run(
        config.policies, config.engine_iterations, config.verify_iterations
    )
    per_level = len(SCENARIOS) * (2 * config.warmup_s + config.seconds)
    levels = len(config.workers) * len(config.in_flight) + len(config.open_rates)
    planned_s = levels * per_level
    token_ttl = max(900, int(planned_s) + 600)  # outlive the run: expiry would read as errors
    logs: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="proviso-bench-") as scratch:
        bundle = bench_bundle(Path(scratch) / "policies", config.policies)
        for workers in config.workers:
            print(f"starting the server (workers={workers}) ...", file=sys.stderr)
            state_dir = Path(scratch) / f"state-w{workers}"
            with running_server(bundle, state_dir, token_ttl, workers) as server:
                logs.append(server.log)
                if tool is not None:
                    body = Path(scratch) / "request.bin"
                    body.write_bytes(grpc_frame(h2load_request(server.token)))
                    bodies = dict.fromkeys(SCENARIOS, body)
                    results.h2load[workers] = [
                        h2load_level(config, server, tool, bodies, in_flight)
                        for in_flight in config.in_flight
                    ]
                    if workers == config.workers[0]:
                        print("  Python clients ...", file=sys.stderr)
                        results.python[workers] = [
                            python_level(config, server, config.python_in_flight)
                        ]
                else:
                    results.python[workers] = [
                        python_level(config, server, in_flight) for in_flight in config.in_flight
                    ]
                if workers == config.workers[0] and config.open_rates:
                    print("  open loop ...", file=sys.stderr)
                    results.open_loop[workers] = [
                        open_level(config, server, rate) for rate in config.open_rates
                    ]
        server_logs = {path.name: _tail(path) for path in logs}
    print()
    print(report(config, results))
    config.output.parent.mkdir(parents=True, exist_ok=True)
    config.output.write_text(
        json.dumps(results_json(config, results), indent=2) + "\n", encoding="utf-8"
    )
    print(f"\nwrote {config.output}")
    if tool is None:
        _warn_no_h2load()
    return _check_errors(results, server_logs)


def _check_errors(results: Results, server_logs: Mapping[str, str]) -> int:
    """Warn about every scenario that had wrong answers; fail if one had no right answer."""
    status = 0
    for view, by_workers in results.views():
        for workers, levels in by_workers.items():
            for level in levels:
                for result in level.results.values():
                    if result.errors:
                        print(
                            f"\nWARNING: {view}, workers={workers}, {result.load}, "
                            f"{LABELS[result.name]}: "
                            f"{sum(result.errors.values())} wrong answers:",
                            file=sys.stderr,
                        )
                        for kind, count in result.errors.most_common(5):
                            print(f"  {count} x {kind}", file=sys.stderr)
                        status = EXIT_FAILED
                    if result.calls == 0:
                        status = EXIT_FAILED
    if status:
        for name, tail in server_logs.items():
            if tail:
                print(f"{name} (tail):\n{tail}", file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bench.run``."""
    config = parse_config(argv, os.environ)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return bench(config)
    except (BenchError, engine.BenchSetupError, h2load.H2LoadError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except PolicyLoadError as exc:
        print(f"bench: policy bundle {config.policies} has errors: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("bench: interrupted; server and clients stopped", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
