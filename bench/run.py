"""``make bench``: Check over real gRPC beside a no-op on the same server, then the engine alone.

Starts ``python -m bench.server`` (a real sidecar plus a no-op method), drives each scenario
from several client processes for a fixed time, prints a table, and writes bench/results.json.
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
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from pathlib import Path
from types import FrameType
from typing import Any

import grpc

from bench import engine
from bench.load import SCENARIO_METHODS, Plan, WorkerResult, worker_main
from bench.stats import NS_PER_MS, NS_PER_US, Summary
from bench.workload import EXAMPLE_POLICIES, ROOT
from sidecar.errors import PolicyLoadError

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
SERVER_START_TIMEOUT_S = 30.0
SERVER_STOP_TIMEOUT_S = 5.0
RESULT_SLACK_S = 60.0
SCENARIOS = ("noop", "check")
LABELS = {"noop": "no-op handler", "check": "Check (requestRefund -> ALLOW)"}
DEFAULT_OUTPUT = ROOT / "bench" / "results.json"


class BenchError(Exception):
    """The benchmark could not run; the message says why."""


@dataclass(frozen=True, slots=True)
class Config:
    """Everything one run needs; recorded in results.json next to the figures."""

    seconds: float
    warmup_s: float
    concurrency: int
    clients: int
    rpc_timeout_s: float
    engine_iterations: int
    verify_iterations: int
    policies: Path
    output: Path

    def split(self) -> list[int]:
        """In-flight calls per client process, summing to ``concurrency``."""
        clients = min(self.clients, self.concurrency)
        share, extra = divmod(self.concurrency, clients)
        return [share + (1 if index < extra else 0) for index in range(clients)]


def _positive(kind: type[int] | type[float]) -> Any:
    """An argparse type that refuses zero and negative numbers."""

    def parse(text: str) -> int | float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above zero, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


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
            bad_env[flag.lstrip("-").replace("-", "_")] = (
                f"{env_name}={value!r}: expected a number above zero"
            )
            initial = None
        parser.add_argument(
            flag, type=kind, default=initial, help=f"{text} (${env_name}, default {default})"
        )

    option("--seconds", pos_float, "BENCH_SECONDS", "5", "measured seconds per scenario")
    option("--warmup", pos_float, "BENCH_WARMUP", "1", "discarded seconds before each")
    option("--concurrency", pos_int, "BENCH_CONCURRENCY", "16", "calls in flight, in total")
    option("--clients", pos_int, "BENCH_CLIENTS", "2", "client processes")
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
        concurrency=args.concurrency,
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
    port: int
    token: str
    pid: int
    log: Path


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
def running_server(config: Config, state_dir: Path, token_ttl: int) -> Iterator[Server]:
    """Start the server process and always stop it, whatever happens inside the block.

    Raises:
        BenchError: it did not announce itself within SERVER_START_TIMEOUT_S.
    """
    log = state_dir.parent / "server.log"
    command = [
        sys.executable,
        "-m",
        "bench.server",
        "--state-dir",
        str(state_dir),
        "--policies",
        str(config.policies),
        "--token-ttl",
        str(token_ttl),
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
                process, int(ready["port"]), str(ready["token"]), int(ready["pid"]), log
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


# ---------------------------------------------------------------- the load


@dataclass(frozen=True, slots=True)
class ScenarioResult:
    """One scenario, merged over every client process."""

    name: str
    calls: int
    calls_per_s: float
    latency: Summary | None
    errors: Counter[str]
    window_s: float
    client_cpu_s: float
    server_cpu_s: float | None

    def cpu(self) -> dict[str, float | None]:
        """CPU in cores busy (1.0 = one core) and in µs per correct answer."""
        figures: dict[str, float | None] = {
            "server_cores": None,
            "server_us_per_call": None,
            "clients_cores": round(self.client_cpu_s / self.window_s, 3),
            "clients_us_per_call": None,
        }
        if self.calls:
            figures["clients_us_per_call"] = round(self.client_cpu_s / self.calls * 1e6, 1)
        if self.server_cpu_s is not None:
            figures["server_cores"] = round(self.server_cpu_s / self.window_s, 3)
            if self.calls:
                figures["server_us_per_call"] = round(self.server_cpu_s / self.calls * 1e6, 1)
        return figures

    def to_json(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "calls_per_s": round(self.calls_per_s, 1),
            "latency_ms": self.latency.in_units(NS_PER_MS) if self.latency else None,
            "errors": sum(self.errors.values()),
            "error_kinds": dict(self.errors),
            "window_s": round(self.window_s, 3),
            "cpu": self.cpu(),
        }


def merge(name: str, parts: Sequence[WorkerResult]) -> ScenarioResult:
    """Pool every process's samples: calls/s is the sum, percentiles are over all calls."""
    latencies = [value for part in parts for value in part.latencies_ns]
    errors: Counter[str] = Counter()
    for part in parts:
        errors.update(part.errors)
    window_s = max(part.window_ns for part in parts) / 1e9
    server_cpu = [part.server_cpu_s for part in parts if part.server_cpu_s is not None]
    return ScenarioResult(
        name=name,
        calls=len(latencies),
        calls_per_s=len(latencies) / window_s,
        latency=Summary.of(latencies) if latencies else None,
        errors=errors,
        window_s=window_s,
        client_cpu_s=sum(part.client_cpu_s for part in parts),
        server_cpu_s=server_cpu[0] if server_cpu else None,
    )


def run_load(config: Config, server: Server) -> dict[str, ScenarioResult]:
    """Drive every scenario from ``config.clients`` processes; always stop them.

    Raises:
        BenchError: a client process failed or did not report in time.
    """
    context = multiprocessing.get_context("spawn")  # grpc does not survive fork
    split = config.split()
    barrier = context.Barrier(len(split))
    results: Queue[WorkerResult] = context.Queue()
    workers = [
        context.Process(
            target=worker_main,
            args=(
                Plan(
                    worker=index,
                    target=f"127.0.0.1:{server.port}",
                    token=server.token,
                    scenarios=SCENARIOS,
                    concurrency=in_flight,
                    warmup_s=config.warmup_s,
                    seconds=config.seconds,
                    rpc_timeout_s=config.rpc_timeout_s,
                    server_pid=server.pid if index == 0 else None,
                ),
                barrier,
                results,
            ),
            name=f"bench-client-{index}",
            daemon=True,
        )
        for index, in_flight in enumerate(split)
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
            print(f"  {result.scenario}: client {result.worker} done", file=sys.stderr)
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
    return {name: merge(name, parts) for name, parts in collected.items()}


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


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def ratios(load: Mapping[str, ScenarioResult]) -> dict[str, float | None]:
    """Check relative to the no-op: throughput kept; growth of latency and server CPU/call."""
    check, noop = load["check"], load["noop"]
    figures: dict[str, float | None] = {
        "throughput": _ratio(check.calls_per_s, noop.calls_per_s),
        "p50": None,
        "p99": None,
        "server_cpu_per_call": None,
    }
    check_cpu, noop_cpu = check.cpu()["server_us_per_call"], noop.cpu()["server_us_per_call"]
    if check_cpu is not None and noop_cpu is not None:
        figures["server_cpu_per_call"] = _ratio(check_cpu, noop_cpu)
    if check.latency is not None and noop.latency is not None:
        figures["p50"] = _ratio(check.latency.p50_ns, noop.latency.p50_ns)
        figures["p99"] = _ratio(check.latency.p99_ns, noop.latency.p99_ns)
    return figures


def _percent(cores: float | None) -> float | None:
    return None if cores is None else cores * 100


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report(
    config: Config,
    load: Mapping[str, ScenarioResult],
    in_process: engine.InProcess,
) -> str:
    """The human-readable table."""
    split = config.split()
    lines = [
        f"Proviso bench: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"grpcio {grpc.__version__}",
        f"load: {len(split)} client processes, {config.concurrency} calls in flight "
        f"({'+'.join(map(str, split))}), {config.warmup_s:g} s warm-up + "
        f"{config.seconds:g} s measured per scenario",
        "",
        f"{'gRPC, same server, same run':<32}{'calls/s':>10}{'p50 ms':>9}{'p90 ms':>9}"
        f"{'p99 ms':>9}{'errors':>8}",
    ]
    for name in SCENARIOS:
        result = load[name]
        ms = result.latency.in_units(NS_PER_MS) if result.latency else {}
        lines.append(
            f"  {LABELS[name]:<30}{result.calls_per_s:>10.0f}{_fmt(ms.get('p50'), '.2f'):>9}"
            f"{_fmt(ms.get('p90'), '.2f'):>9}{_fmt(ms.get('p99'), '.2f'):>9}"
            f"{sum(result.errors.values()):>8}"
        )
    ratio = ratios(load)
    lines += [
        f"  Check / no-op: throughput x{_fmt(ratio['throughput'], '.2f')}, "
        f"p50 x{_fmt(ratio['p50'], '.2f')}, p99 x{_fmt(ratio['p99'], '.2f')}, "
        f"server CPU/call x{_fmt(ratio['server_cpu_per_call'], '.2f')}",
        "",
        f"{'CPU in the measured window':<32}{'server':>10}{'us/call':>9}"
        f"{'clients':>10}{'us/call':>9}",
    ]
    for name in SCENARIOS:
        cpu = load[name].cpu()
        lines.append(
            f"  {LABELS[name]:<30}{_fmt(_percent(cpu['server_cores']), '>9.0f')}%"
            f"{_fmt(cpu['server_us_per_call'], '>9.0f')}"
            f"{_fmt(_percent(cpu['clients_cores']), '>9.0f')}%"
            f"{_fmt(cpu['clients_us_per_call'], '>9.0f')}"
        )
    lines += [
        f"  (100% = one core, of {os.cpu_count()}; server Python is one thread, grpc/audit add)",
        "",
        f"{'in-process, one call':<40}{'p50 us':>9}{'p99 us':>9}{'mean us':>9}{'n':>8}",
    ]
    for label, summary in (
        ("engine evaluate(policy, call, claims)", in_process.evaluate),
        ("tokens.verify (a token not seen before)", in_process.verify),
        ("token cache hit (a token reused)", in_process.verify_cached),
    ):
        us = summary.in_units(NS_PER_US)
        lines.append(
            f"  {label:<38}{us['p50']:>9.1f}{us['p99']:>9.1f}{us['mean']:>9.1f}{summary.count:>8}"
        )
    return "\n".join(lines)


def results_json(
    config: Config,
    load: Mapping[str, ScenarioResult],
    in_process: engine.InProcess,
) -> dict[str, Any]:
    """Everything printed, plus the machine and settings needed to compare runs."""
    settings = asdict(config)
    settings.update(
        policies=str(config.policies),
        output=str(config.output),
        in_flight_per_client=config.split(),
        scenarios={name: SCENARIO_METHODS[name] for name in SCENARIOS},
    )
    return {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "platform": platform.platform(),
            "grpcio": grpc.__version__,
        },
        "settings": settings,
        "grpc": {name: result.to_json() for name, result in load.items()},
        "ratios_check_over_noop": {
            key: None if value is None else round(value, 3) for key, value in ratios(load).items()
        },
        "in_process_us": {
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


def bench(config: Config) -> int:
    """Run everything; return the exit status."""
    print("engine, in-process ...", file=sys.stderr)
    in_process = engine.run(config.policies, config.engine_iterations, config.verify_iterations)
    planned_s = len(SCENARIOS) * (config.warmup_s + config.seconds)
    token_ttl = max(900, int(planned_s) + 300)  # outlive the run: expiry would read as errors
    with tempfile.TemporaryDirectory(prefix="proviso-bench-") as scratch:
        print("starting the server ...", file=sys.stderr)
        with running_server(config, Path(scratch) / "state", token_ttl) as server:
            print(
                f"server on 127.0.0.1:{server.port}; load for about {planned_s:g} s ...",
                file=sys.stderr,
            )
            load = run_load(config, server)
            server_log = _tail(server.log)
    print()
    print(report(config, load, in_process))
    config.output.parent.mkdir(parents=True, exist_ok=True)
    config.output.write_text(
        json.dumps(results_json(config, load, in_process), indent=2) + "\n", encoding="utf-8"
    )
    print(f"\nwrote {config.output}")
    status = 0
    for result in load.values():
        if result.errors:
            print(
                f"\nWARNING: {sum(result.errors.values())} of the {LABELS[result.name]} calls "
                "were not correct answers; their latencies are excluded:",
                file=sys.stderr,
            )
            for kind, count in result.errors.most_common(5):
                print(f"  {count} x {kind}", file=sys.stderr)
            if server_log:
                print(f"server log (tail):\n{server_log}", file=sys.stderr)
        if result.calls == 0:
            status = EXIT_FAILED
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bench.run``."""
    config = parse_config(argv, os.environ)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return bench(config)
    except (BenchError, engine.BenchSetupError) as exc:
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
